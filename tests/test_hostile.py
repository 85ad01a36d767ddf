"""Hostile input and faults, one test per row of docs/errors.md that the flag tests in test_cli.py do
not already cover: each is one line on stderr, a non-zero exit, no traceback, and finished work kept."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from iterkd import checkpoints
from iterkd.arch import VGGSpec
from iterkd.checkpoints import save_checkpoint
from iterkd.data import named
from iterkd.lineage import nodes
from iterkd.models import VGG
from iterkd.storage import open_study
from tests.test_cli import one_line_error, run
from tests.test_data import digit_images, digit_labels, idx_images, idx_labels, write_mnist

SMOKE = ["search", "--preset", "smoke", "--max-drop", "60", "--max-generations", "1", "--no-progress"]


def test_truncated_teacher_checkpoint(tmp_path, capsys):
    good = save_checkpoint(tmp_path / "t.safetensors", VGG(VGGSpec(((4,),), in_channels=3, input_size=16)))
    good.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code, _, err = run(capsys, *SMOKE, "--run-dir", str(tmp_path / "r"), "--teacher", str(good))
    one_line_error(code, err, "corrupt or not a safetensors file", str(good))


@pytest.mark.parametrize(
    "text, needle",
    [
        ("root: {arch: vgg16\noperators: [drop_layer", "not valid YAML"),
        ("root: {arch: vgg16}\noperators: [melt_layer]", "unknown operator 'melt_layer'"),
        (
            "root: {arch: vgg11}\noperators: [drop_layer]\nmin_model: {params: 999999999}",
            "larger than the root",
        ),
        ("root: {arch: vgg11}\noperators: [[drop_layer]]", ":2: operators[0] must be an operator name"),
        ("root: [vgg11]\noperators: [drop_layer]", ":1: root must be a mapping"),
        (
            "root: {arch: vgg11}\noperators:\n  - shrink_widths: 0.5",
            ":3: operators[0].shrink_widths must be a mapping",
        ),
        (
            "root: {blocks: [[wide]]}\noperators: [drop_layer]",
            ":1: root.blocks[0][0] must be an integer >= 1",
        ),
        (
            "root: {blocks: [[-8, 8]]}\noperators: [drop_layer]",
            ":1: root.blocks[0][0] must be an integer >= 1",
        ),
        ("root: {blocks: [[1000000000]]}\noperators: [drop_layer]", ":1: root describes an invalid VGG spec"),
        (
            "a: &a [1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b]\n"
            "d: &d [*c, *c, *c, *c, *c, *c, *c, *c]\nroot: {arch: vgg11}\noperators: *d",
            "aliases are expanded",
        ),
        (
            "root: {arch: vgg11}\noperators: [drop_layer]\nkd: {alpha: 2}",
            ":3: kd.alpha must be a number in [0, 1]",
        ),
    ],
)
def test_broken_space_file(tmp_path, capsys, text, needle):
    space = tmp_path / "space.yaml"
    space.write_text(text)
    code, _, err = run(capsys, *SMOKE, "--run-dir", str(tmp_path / "r"), "--space", str(space))
    one_line_error(code, err, needle, str(space))
    assert "--alpha" not in err


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("{blocks: [[4]]}", "is an invalid VGG spec: not JSON"),
        ('{"in_channels": 3, "input_size": 16}', "no 'blocks'"),
        ('{"blocks": [[4]], "input_size": 16, "activation": "gelu"}', "unknown key 'activation'"),
        ('{"blocks": [[1000000, 1000000], [1000000]], "input_size": 16}', "parameters, more than the 2e+09"),
    ],
)
def test_teacher_with_hostile_metadata(tmp_path, capsys, spec, needle):
    good = save_checkpoint(tmp_path / "t.safetensors", VGG(VGGSpec(((4,),), in_channels=3, input_size=16)))
    state = load_file(str(good))
    save_file(state, str(good), metadata={"format": checkpoints.FORMAT, "spec": spec})
    code, _, err = run(capsys, *SMOKE, "--run-dir", str(tmp_path / "r"), "--teacher", str(good))
    one_line_error(code, err, needle, f"checkpoint {good}")


@pytest.fixture
def mnist_dir(tmp_path, monkeypatch):
    """A data directory with tiny MNIST IDX files (50 train, 12 test) and no Debian copy to fall back on."""
    monkeypatch.setattr(named, "DEBIAN_DATASETS", tmp_path / "no-debian")
    write_mnist(tmp_path / "data")
    return tmp_path / "data"


def run_mnist(capsys, tmp_path, data_dir):
    return run(
        capsys,
        *SMOKE,
        "--dataset",
        "mnist",
        "--val-size",
        "10",
        "--no-download",
        "--data-dir",
        str(data_dir),
        "--run-dir",
        str(tmp_path / "r"),
    )


@pytest.mark.parametrize(
    "images, labels, needle",
    [
        (digit_images(50, False), digit_labels(40, False), "holds 50 images but"),  # was an IndexError
        (
            digit_images(20, False),
            digit_labels(50, False),
            "holds 20 images but",
        ),  # trained on misaligned labels
        (
            digit_images(50, False),
            np.full(50, 250),
            "label 250 (sample 0) is not a class",
        ),  # failed mid-training
    ],
)
def test_data_files_that_do_not_fit_together(tmp_path, capsys, mnist_dir, images, labels, needle):
    raw = mnist_dir / "MNIST" / "raw"
    (raw / "train-images-idx3-ubyte").write_bytes(idx_images(images))
    (raw / "train-labels-idx1-ubyte").write_bytes(idx_labels(labels))
    code, _, err = run_mnist(capsys, tmp_path, mnist_dir)
    one_line_error(code, err, needle, str(raw))


def test_data_dir_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "data.zip"
    blocker.write_text("")
    code, _, err = run_mnist(capsys, tmp_path, blocker)
    one_line_error(code, err, f"{blocker} is a file, not a directory")


def test_run_dir_that_cannot_be_created(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a run directory below a file: mkdir fails (root ignores permission bits)
    code, _, err = run(capsys, *SMOKE, "--run-dir", str(blocker / "run"))
    one_line_error(code, err, "is not writable", "--run-dir")


def test_dataset_missing_offline(tmp_path, capsys):
    code, _, err = run(
        capsys,
        "search",
        "--preset",
        "smoke",
        "--dataset",
        "cifar10",
        "--no-download",
        "--data-dir",
        str(tmp_path / "data"),
        "--run-dir",
        str(tmp_path / "r"),
        "--no-progress",
    )
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
    assert not list((run_dir / "checkpoints").glob("node-1*")) and not list(
        (run_dir / "checkpoints").glob(".*tmp")
    )
    study = open_study(f"sqlite:///{run_dir}/study.db", "run")
    assert [(n.node, n.state) for n in nodes(study)] == [(0, "COMPLETE"), (1, "FAIL")]

    monkeypatch.setattr(checkpoints, "save_file", real)  # space freed: resume
    code, out, _ = run(capsys, "resume", str(run_dir), "--no-progress")
    assert code == 0
    assert root_ckpt.read_bytes() == before  # the root was not retrained
    assert [(n.node, n.state) for n in nodes(open_study(f"sqlite:///{run_dir}/study.db", "run"))] == [
        (0, "COMPLETE"),
        (1, "FAIL"),
        (2, "COMPLETE"),
    ]
