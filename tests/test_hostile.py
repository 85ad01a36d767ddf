"""Hostile input and faults, one test per row of docs/errors.md that the flag tests in test_cli.py do
not already cover: each is one line on stderr, a non-zero exit, no traceback, and finished work kept."""
from __future__ import annotations

import errno

import pytest

from iterkd import checkpoints
from iterkd.arch import VGGSpec
from iterkd.checkpoints import save_checkpoint
from iterkd.lineage import nodes
from iterkd.storage import open_study
from iterkd.models import VGG
from tests.test_cli import one_line_error, run

SMOKE = ["search", "--preset", "smoke", "--max-drop", "60", "--max-generations", "1", "--no-progress"]


def test_truncated_teacher_checkpoint(tmp_path, capsys):
    good = save_checkpoint(tmp_path / "t.safetensors", VGG(VGGSpec(((4,),), in_channels=3, input_size=16)))
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code, _, err = run(capsys, *SMOKE, "--run-dir", str(tmp_path / "r"), "--teacher", str(good))
    one_line_error(code, err, "corrupt or not a safetensors file", str(good))


@pytest.mark.parametrize("text, needle", [
    ("root: {arch: vgg16\noperators: [drop_layer", "not valid YAML"),
    ("root: {arch: vgg16}\noperators: [melt_layer]", "unknown operator 'melt_layer'"),
    ("root: {arch: vgg11}\noperators: [drop_layer]\nmin_model: {params: 999999999}", "larger than the root"),
])
def test_broken_space_file(tmp_path, capsys, text, needle):
    space = tmp_path / "space.yaml"
    space.write_text(text)
    code, _, err = run(capsys, *SMOKE, "--run-dir", str(tmp_path / "r"), "--space", str(space))
    one_line_error(code, err, needle, str(space))


def test_run_dir_that_cannot_be_created(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a run directory below a file: mkdir fails (root ignores permission bits)
    code, _, err = run(capsys, *SMOKE, "--run-dir", str(blocker / "run"))
    one_line_error(code, err, "is not writable", "--run-dir")


def test_dataset_missing_offline(tmp_path, capsys):
    code, _, err = run(capsys, "search", "--preset", "smoke", "--dataset", "cifar10", "--no-download",
                       "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "r"), "--no-progress")
    one_line_error(code, err, str(tmp_path / "data"))


def test_disk_full_while_writing_a_checkpoint_keeps_finished_nodes(tmp_path, capsys, monkeypatch):
    real = checkpoints.save_file
    calls = []

    def full_on_the_child(state, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the root's checkpoint is written; the first child's hits a full disk
            with open(path, "wb") as f:
                f.write(b"\0" * 10)  # half a file was written before the error
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(state, path, metadata=metadata)

    monkeypatch.setattr(checkpoints, "save_file", full_on_the_child)
    run_dir = tmp_path / "r"
    code, _, err = run(capsys, *SMOKE, "--run-dir", str(run_dir))
    one_line_error(code, err, "No space left on device", "free disk space")
    root_ckpt = run_dir / "checkpoints" / "node-0.safetensors"
    before = root_ckpt.read_bytes()
    assert not list((run_dir / "checkpoints").glob("node-1*")) and not list((run_dir / "checkpoints").glob(".*tmp"))
    study = open_study(f"sqlite:///{run_dir}/study.db", "run")
    assert [(n.node, n.state) for n in nodes(study)] == [(0, "COMPLETE"), (1, "FAIL")]

    monkeypatch.setattr(checkpoints, "save_file", real)  # space freed: resume
    code, out, _ = run(capsys, "resume", str(run_dir), "--no-progress")
    assert code == 0
    assert root_ckpt.read_bytes() == before  # the root was not retrained
    assert [(n.node, n.state) for n in nodes(open_study(f"sqlite:///{run_dir}/study.db", "run"))] == \
        [(0, "COMPLETE"), (1, "FAIL"), (2, "COMPLETE")]
