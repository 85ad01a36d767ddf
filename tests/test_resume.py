"""kill -9 a real search process at a chosen moment, resume it with `iterkd resume`, and check that
nothing finished was lost or retrained and the lineage is what an uninterrupted run makes."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iterkd import run_search
from iterkd.cli import main
from iterkd.lineage import nodes, open_study, selections
from tests.conftest import lineage_shape, smoke_config

FLAGS = ["--preset", "smoke", "--max-drop", "60", "--max-generations", "2", "--no-progress", "--seed", "0"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    cfg = smoke_config(run_dir, name="run")
    run_search(cfg, progress=False)
    return lineage_shape(open_study(f"sqlite:///{run_dir}/study.db", "run"))


def _trials(db: Path) -> list[tuple[int, str]]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return con.execute("SELECT number, state FROM trials ORDER BY number").fetchall()
    except sqlite3.Error:  # schema not there yet, or busy: ask again
        return []


def _kill_when(run_dir: Path, ready, timeout: float = 300.0) -> list[tuple[int, str]]:
    """Start `iterkd search` on run_dir, SIGKILL it as soon as ready(trials, run_dir) holds."""
    log = run_dir.with_name("search.log")  # a file, not a pipe: a full pipe would block the search
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "iterkd", "search", "--run-dir", str(run_dir), *FLAGS],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            trials = _trials(run_dir / "study.db")
            if ready(trials, run_dir):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return trials
            if proc.poll() is not None:
                pytest.fail(f"the search ended before the kill point: {log.read_text()[-500:]}")
            time.sleep(0.05)
        pytest.fail("the kill point never came")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _running(number: int, for_s: float = 0.0):
    seen: dict[int, float] = {}

    def ready(trials, run_dir):
        if (number, "RUNNING") in trials:
            seen.setdefault(number, time.monotonic())
            return time.monotonic() - seen[number] >= for_s
        return False
    return ready


def _checkpoint_written(number: int):
    def ready(trials, run_dir):  # the checkpoint is on disk, the trial not yet told: between the two
        return (run_dir / "checkpoints" / f"node-{number}.safetensors").exists()
    return ready


KILL_POINTS = {
    "root training": _running(0, 0.5),
    "child training": _running(1, 0.5),
    "right after a checkpoint write": _checkpoint_written(1),
    "between generations": lambda trials, run_dir: (1, "COMPLETE") in trials,
}


@pytest.mark.parametrize("moment", list(KILL_POINTS))
def test_kill_9_then_resume_keeps_finished_nodes_and_makes_the_same_lineage(tmp_path, reference, moment, capsys):
    run_dir = tmp_path / "run"
    at_kill = _kill_when(run_dir, KILL_POINTS[moment])
    finished = {n for n, state in at_kill if state == "COMPLETE"}
    checkpoints = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").glob("*.safetensors")}

    assert main(["resume", str(run_dir), "--no-progress"]) == 0
    study = open_study(f"sqlite:///{run_dir}/study.db", "run")
    assert lineage_shape(study) == reference
    states = {t.number: t.state.name for t in study.trials}
    assert all(states[n] == "COMPLETE" for n in finished)  # finished work kept as it was ...
    for name, mtime in checkpoints.items():  # ... and never retrained (its checkpoint untouched)
        told = int(name.split("-")[1].split(".")[0]) in finished
        if told:
            assert (run_dir / "checkpoints" / name).stat().st_mtime_ns == mtime
    killed = [n for n, state in at_kill if state == "RUNNING"]
    assert all(states[n] == "FAIL" for n in killed)  # the interrupted trial is failed, its candidate retried
    assert "interrupted by a crash" in capsys.readouterr().out or not killed


def test_resume_needs_an_existing_run(tmp_path, capsys):
    assert main(["resume", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run to resume" in err[0]


def test_a_damaged_checkpoint_is_reported_and_its_node_trained_again(tmp_path, reference, capsys):
    run_dir = tmp_path / "run"
    run_search(smoke_config(run_dir, name="run"), progress=False)
    root_ckpt, damaged = (run_dir / "checkpoints" / f"node-{i}.safetensors" for i in (0, 1))
    root_bytes = root_ckpt.read_bytes()
    damaged.write_bytes(damaged.read_bytes()[:200])  # truncated while the run was stopped

    assert main(["resume", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"node 1: checkpoint {damaged} is corrupt" in out and "trained again" in out
    study = open_study(f"sqlite:///{run_dir}/study.db", "run")
    by_id = {n.node: n for n in nodes(study)}
    assert by_id[1].state == "FAIL" and by_id[1].failure == "damaged"  # never used again
    chain = [by_id[0]] + [by_id[ids[0]] for _, ids in sorted(selections(study).items())]
    assert [(n.generation, n.operator, n.spec.to_json()) for n in chain] == [(g, op, spec) for g, _, _, op, spec, _ in reference]
    assert chain[1].node != 1 and chain[1].key == by_id[1].key  # the same candidate, trained again
    assert root_ckpt.read_bytes() == root_bytes  # the root was fine and not retrained


def test_ctrl_c_fails_the_trial_and_says_how_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "search.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "iterkd", "search", "--run-dir", str(run_dir), *FLAGS],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ready, deadline = _running(1, 0.5), time.monotonic() + 300
    while not ready(_trials(run_dir / "study.db"), run_dir) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    assert proc.wait(timeout=120) == 130
    text = log.read_text()
    assert f"Resume with: iterkd resume {run_dir}" in text and "Traceback" not in text
    assert dict(_trials(run_dir / "study.db"))[1] == "FAIL"  # the study is consistent: nothing left RUNNING
    assert "RUNNING" not in dict(_trials(run_dir / "study.db")).values()
