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
import torch

from iterkd import run_search
from iterkd.checkpoints import read_checkpoint
from iterkd.cli import main
from iterkd.config import PRESETS
from iterkd.faults import POINTS
from iterkd.lineage import accepted, node_status, nodes, selections
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


def _search_until(
    run_dir: Path, fault: str, signal: str = "KILL", flags: list[str] = FLAGS
) -> subprocess.CompletedProcess:
    """`iterkd search` on run_dir, stopped by `signal` at the fault point POINT:N."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ITERKD_FAULT": fault, "ITERKD_FAULT_SIGNAL": signal}
    return subprocess.run(
        [sys.executable, "-m", "iterkd", "search", "--run-dir", str(run_dir), *flags],
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


# -- a resumed run takes the uninterrupted run's path ----------------------------------------------
# A budget tight enough that the reference rejects children, so a changed seed would change a
# decision; --final-epochs 1 so there is a polish to interrupt. Every run here uses one thread (the
# killed one by OMP_NUM_THREADS, the in-process ones by torch.set_num_threads): the promise holds
# on one machine at one thread count (docs/usage.md#resume).
TIGHT = ["--preset", "smoke", "--final-epochs", "1", "--no-progress", "--seed", "0"]
VARIANT_FLAGS = {
    "parent-child": [*TIGHT, "--max-drop", "1"],
    "ancestors-child": [*TIGHT, "--max-drop", "0.25", "--variant", "ancestors-child"],
}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _outcome(run_dir: Path) -> tuple[list[tuple], dict]:
    """Every node that did not fail, by its key (its identity, whatever its trial number): place,
    move, accuracies and status; and the tensors of its checkpoint (not the file: its metadata
    names the trial number)."""
    study = open_study(f"sqlite:///{run_dir}/study.db", "run")
    chosen = accepted(study)
    kept = sorted((n for n in nodes(study) if n.state != "FAIL"), key=lambda n: (n.generation, n.key))
    rows = [
        (n.generation, n.key, n.operator, n.spec.to_json(), n.val_acc, n.test_acc, node_status(n, chosen))
        for n in kept
    ]
    weights = {n.key: read_checkpoint(run_dir / n.checkpoint)[1] for n in kept}
    return rows, weights


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The uninterrupted run of each variant's command, at one thread, computed once."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for variant, flags in VARIANT_FLAGS.items():
            run_dir = tmp_path_factory.mktemp(variant) / "run"
            assert main(["search", "--run-dir", str(run_dir), *flags]) == 0
            out[variant] = _outcome(run_dir)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.mark.parametrize(
    "variant, where, signal",
    [
        ("parent-child", "root", "KILL"),
        ("parent-child", "root", "TERM"),
        ("parent-child", "child", "KILL"),
        ("parent-child", "child", "TERM"),
        ("parent-child", "polish", "KILL"),
        ("parent-child", "polish", "TERM"),
        ("ancestors-child", "root", "TERM"),
        ("ancestors-child", "child", "KILL"),
    ],
)
def test_a_resumed_run_takes_the_path_of_an_uninterrupted_one(
    tmp_path, references, one_thread, variant, where, signal
):
    rows, weights = references[variant]
    assert "rejected" in {r[-1] for r in rows}  # the budget decides something a changed seed could flip
    # The mid-epoch point is reached once per epoch: 1 is in the root, the next after the root's and
    # a whole child's epochs is in the second child (its number is the first to shift when a trial
    # before it failed), and the one after every child's epochs is in the polish.
    root_epochs, child_epochs = PRESETS["smoke"]["root_epochs"], PRESETS["smoke"]["epochs"]
    children = sum(r[2] not in ("root", "polish") for r in rows)
    nth = {
        "root": 1,
        "child": root_epochs + child_epochs + 2,
        "polish": root_epochs + children * child_epochs + 1,
    }
    nth = nth[where]
    run_dir = tmp_path / "run"
    proc = _search_until(run_dir, f"mid-epoch:{nth}", signal, VARIANT_FLAGS[variant])
    assert proc.returncode == {"KILL": -9, "TERM": 143}[signal], proc.stderr[-500:]
    at_kill = _trials(run_dir / "study.db")
    assert {"RUNNING", "FAIL"} & set(at_kill.values()), "the kill came inside a node"
    if where == "polish":
        assert len(at_kill) == len(rows)  # every child had finished

    assert main(["resume", str(run_dir), "--no-progress"]) == 0
    got_rows, got_weights = _outcome(run_dir)
    assert got_rows == rows
    assert got_weights.keys() == weights.keys()
    for key, state in weights.items():
        assert state.keys() == got_weights[key].keys()
        for name, tensor in state.items():
            assert torch.equal(tensor, got_weights[key][name]), (key, name)
