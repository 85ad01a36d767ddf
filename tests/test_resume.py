"""Kill a real search process at a named point in the code (iterkd.faults), resume it with
`iterkd resume`, and check that nothing finished was lost or retrained, no trial is left RUNNING,
and the lineage is what an uninterrupted run makes. No sleeps or polling: the process kills itself."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from iterkd import run_search
from iterkd.cli import main
from iterkd.faults import POINTS
from iterkd.lineage import nodes, selections
from iterkd.storage import open_study
from tests.conftest import lineage_shape, smoke_config

FLAGS = ["--preset", "smoke", "--max-drop", "60", "--max-generations", "2", "--no-progress", "--seed", "0"]
# Where each point is reached in a smoke run (root: 3 epochs, then one child per generation): the
# N-th time picks a moment inside a child, so a finished root is there to be kept.
KILLS = {
    "trial-created": 2,
    "mid-epoch": 5,
    "checkpoint-written": 2,
    "trial-told": 2,
    "between-generations": 1,
    "selection": 1,
}
assert set(KILLS) == set(POINTS)  # every point is tested


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    cfg = smoke_config(run_dir, name="run")
    run_search(cfg, progress=False)
    return lineage_shape(open_study(f"sqlite:///{run_dir}/study.db", "run"))


def _trials(db: Path) -> dict[int, str]:
    with sqlite3.connect(db) as con:
        return dict(con.execute("SELECT number, state FROM trials ORDER BY number").fetchall())


def _search_until(run_dir: Path, fault: str, signal: str = "KILL") -> subprocess.CompletedProcess:
    """`iterkd search` on run_dir, stopped by `signal` at the fault point POINT:N."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ITERKD_FAULT": fault, "ITERKD_FAULT_SIGNAL": signal}
    return subprocess.run(
        [sys.executable, "-m", "iterkd", "search", "--run-dir", str(run_dir), *FLAGS],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        # As a terminal's foreground job: a shell starts background jobs (`pytest &`, nohup, some CI
        # runners) with SIGINT ignored, the child inherits that, and Python then installs no Ctrl-C
        # handler, so the INT case would run to the end.
        preexec_fn=_foreground_signals,
    )


def _foreground_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("point", list(KILLS))
def test_kill_9_at_each_point_then_resume_keeps_finished_nodes_and_the_lineage(
    tmp_path, reference, point, capsys
):
    run_dir = tmp_path / "run"
    proc = _search_until(run_dir, f"{point}:{KILLS[point]}")
    assert proc.returncode == -9, proc.stdout[-500:] + proc.stderr[-500:]  # it died at the point, not before
    at_kill = _trials(run_dir / "study.db")
    finished = {n for n, state in at_kill.items() if state == "COMPLETE"}
    assert 0 in finished  # the root was done: the kill came inside a child
    checkpoints = {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (run_dir / "checkpoints").glob("node-*")
    }

    assert main(["resume", str(run_dir), "--no-progress"]) == 0
    study = open_study(f"sqlite:///{run_dir}/study.db", "run")
    assert lineage_shape(study) == reference
    states = {t.number: t.state.name for t in study.trials}
    assert "RUNNING" not in states.values() and "WAITING" not in states.values()
    assert all(states[n] == "COMPLETE" for n in finished)  # finished work kept as it was ...
    for name, (data, mtime) in checkpoints.items():  # ... and never retrained (its checkpoint untouched)
        if int(name.split("-")[1].split(".")[0]) in finished:
            path = run_dir / "checkpoints" / name
            assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime
    killed = [n for n, state in at_kill.items() if state == "RUNNING"]
    assert all(states[n] == "FAIL" for n in killed)  # the interrupted trial is failed, its candidate retried
    assert bool(killed) == (point in ("trial-created", "mid-epoch", "checkpoint-written"))
    assert not killed or "interrupted by a crash" in capsys.readouterr().out


@pytest.mark.parametrize("signal, code, word", [("INT", 130, "interrupted"), ("TERM", 143, "terminated")])
def test_ctrl_c_and_sigterm_fail_the_trial_and_say_how_to_resume(tmp_path, signal, code, word):
    run_dir = tmp_path / "run"
    proc = _search_until(run_dir, f"mid-epoch:{KILLS['mid-epoch']}", signal)
    assert proc.returncode == code
    assert f"iterkd: {word}; finished nodes are kept. Resume with: iterkd resume {run_dir}" in proc.stderr
    assert "Traceback" not in proc.stderr
    states = _trials(run_dir / "study.db")
    assert states[0] == "COMPLETE" and states[1] == "FAIL"  # the child being trained failed, cleanly
    assert "RUNNING" not in states.values()


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
    assert [(n.generation, n.operator, n.spec.to_json()) for n in chain] == [
        (g, op, spec) for g, _, _, op, spec, _ in reference
    ]
    assert chain[1].node != 1 and chain[1].key == by_id[1].key  # the same candidate, trained again
    assert root_ckpt.read_bytes() == root_bytes  # the root was fine and not retrained
