"""Opening a run (iterkd.run.open_run): every command finds a run the same way, asks for --storage in
one line when the saved URL had a password, refuses what is not an iterkd run, and never creates a
study where there was none."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from iterkd.cli import main
from iterkd.errors import IterkdError
from iterkd.run import open_run

REDACTED = "postgresql://iterkd:***@db.example/iterkd"
# Each command that opens an existing run, with the arguments it needs beside RUN.
COMMANDS = {
    "select": lambda run: ["select", run, "--node", "1"],
    "dashboard": lambda run: ["dashboard", run, "--port", "8999"],
    "report": lambda run: ["report", run],
    "export": lambda run: ["export", run, "--format", "safetensors"],
    "compare": lambda run: ["compare", run, "--seeds", "1", "--no-progress"],
    "resume": lambda run: ["resume", run, "--no-progress"],
}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iterkd: error: "), err
    return err[0]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_redacted_storage_url_makes_every_command_ask_for_storage(tmp_path, capsys, command):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"name": "pg", "storage": REDACTED}))
    assert main(COMMANDS[command](str(run))) == 2
    assert "--storage" in _one_error_line(capsys)
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]  # no empty study.db left behind


def test_a_foreign_config_json_is_not_adopted_as_a_run(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"name": "my-app", "version": 3, "debug": True}))
    for command in ("select", "report", "resume"):
        assert main(COMMANDS[command](str(tmp_path))) == 2
        assert "is not an iterkd config (unknown keys: debug, version)" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", '{"name": "x", "epochs": "many", "beam": []}'])
def test_a_config_json_that_is_not_a_config_object_is_one_line(tmp_path, capsys, text):
    (tmp_path / "config.json").write_text(text)
    for command in ("resume", "dashboard", "select"):
        assert main(COMMANDS[command](str(tmp_path))) == 2
        assert "config" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_moved_run_is_opened_where_it_is_now(smoke_run, tmp_path):
    cfg, _ = smoke_run
    moved = Path(shutil.copytree(cfg.run_dir, tmp_path / "elsewhere"))
    run = open_run(moved)
    assert run.run_dir == moved and Path(run.cfg.run_dir) == moved  # not the directory saved in config.json
    assert run.model(run.node()).spec == run.node().spec  # checkpoints are read from the new place


def test_missing_run_directory_and_missing_study_are_one_line(tmp_path):
    with pytest.raises(IterkdError, match="does not exist"):
        open_run(tmp_path / "nope")
    with pytest.raises(IterkdError, match="no config.json and no study.db"):
        open_run(tmp_path)
    assert not (tmp_path / "study.db").exists()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    from iterkd.run import WriterLock

    with WriterLock(tmp_path, "sqlite:///x.db", "run").acquire():
        with pytest.raises(IterkdError, match=rf"already being driven by pid {os.getpid()} on \S+ \(since "):
            WriterLock(tmp_path, "sqlite:///x.db", "run").acquire()
    WriterLock(tmp_path, "sqlite:///x.db", "run").acquire().release()  # free again once released
    assert "taking over" not in capsys.readouterr().out  # a clean release leaves nobody to take over from


def test_a_second_search_on_a_driven_run_refuses_and_a_dead_holder_is_taken_over(tmp_path):
    """The first search stops itself (SIGSTOP at a fault point) while it holds the run; a second one
    is refused; once the first is killed, a resume takes the run over and finishes it."""
    run_dir = tmp_path / "run"
    flags = ["--preset", "smoke", "--max-drop", "60", "--no-progress"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ITERKD_FAULT": "trial-created:2",
        "ITERKD_FAULT_SIGNAL": "STOP",
    }
    first = subprocess.Popen(
        [sys.executable, "-m", "iterkd", "search", "--run-dir", str(run_dir), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)  # returns once it has stopped itself at the point
        assert os.WIFSTOPPED(status)
        second = subprocess.run(
            [sys.executable, "-m", "iterkd", "search", "--run-dir", str(run_dir), *flags],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert second.returncode == 2 and second.stderr.count("\n") == 1
        assert f"is already being driven by pid {first.pid} on " in second.stderr
    finally:
        first.kill()
        first.wait()
    resumed = subprocess.run(
        [sys.executable, "-m", "iterkd", "resume", str(run_dir), "--no-progress"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert resumed.returncode == 0, resumed.stderr[-500:]
    assert f"taking over run {run_dir} from pid {first.pid} on " in resumed.stdout
    assert "which is no longer running" in resumed.stdout


@pytest.mark.parametrize(
    "bad",
    [
        ["--dataset", "mnist", "--data-dir", "EMPTY", "--no-download"],  # data missing, offline
        ["--storage", "postgresql://nobody:secret@127.0.0.1:1/none"],  # storage unreachable
        ["--teacher", "NOT_A_CHECKPOINT"],  # a teacher file that is not a checkpoint
        ["--space", "BROKEN_SPACE"],  # a space file that does not parse
        ["--val-size", "100000"],  # more validation images than the training set has
    ],
)
def test_a_refused_search_records_nothing_and_the_corrected_command_starts_cleanly(tmp_path, capsys, bad):
    (tmp_path / "empty").mkdir()
    (tmp_path / "teacher.safetensors").write_text("not a checkpoint")
    (tmp_path / "space.yaml").write_text("root: [oops\n")
    names = {
        "EMPTY": tmp_path / "empty",
        "NOT_A_CHECKPOINT": tmp_path / "teacher.safetensors",
        "BROKEN_SPACE": tmp_path / "space.yaml",
    }
    run_dir = tmp_path / "run"
    args = [
        "search",
        "--preset",
        "smoke",
        "--run-dir",
        str(run_dir),
        "--max-generations",
        "1",
        "--no-progress",
    ]
    assert main(args + [str(names.get(a, a)) for a in bad]) == 2
    _one_error_line(capsys)
    assert not (run_dir / "config.json").exists() and not (run_dir / "study.db").exists()
    assert main(args) == 0  # the corrected command is a new run, not a resume of a refused one
    out = capsys.readouterr().out
    assert "starting run" in out and "gen 0 node   0  root" in out
