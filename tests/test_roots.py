"""Packaged roots (iterkd/roots.py): a shipped root is the run's root only when it was trained on this
dataset and root architecture and never on this run's validation images; otherwise, or when the
file is absent, the run trains its root and says why."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import iterkd.roots as roots
from iterkd.checkpoints import load_model, save_checkpoint
from iterkd.config import build_config
from iterkd.search import Search
from tests.conftest import smoke_config


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A directory holding one tiny packaged root for the smoke preset's dataset, space and width,
    trained (one epoch) on the training split of --seed 0 and --val-size 400."""
    directory = tmp_path_factory.mktemp("roots")
    cfg = replace(build_config("smoke", {"name": "root", "root_epochs": 1}), train_subset=None)
    path = roots.train_packaged_root(
        cfg, directory / "synthetic-tiny.safetensors", command="test", progress=False, log=lambda _: None
    )
    return directory, path


def search(cfg, monkeypatch, directory):
    """Run a search with the packaged roots in `directory`; its outcome and the lines it logged."""
    monkeypatch.setattr(roots, "ROOTS_DIR", directory)
    lines: list[str] = []
    return Search(cfg, progress=False, log=lines.append).run(), lines


def test_a_matching_packaged_root_is_the_root_and_nothing_trains_it(tmp_path, monkeypatch, shipped):
    directory, path = shipped
    cfg = smoke_config(tmp_path, root="packaged", max_generations=1)
    out, lines = search(cfg, monkeypatch, directory)
    assert out.root.operator == f"packaged:{path.name}" and out.root.seconds == 0
    assert out.root.epochs == 1  # what trained it, from the file's metadata
    assert any(line.startswith(f"root: packaged {path.name}") for line in lines)
    run_root = load_file(f"{cfg.run_dir}/{out.root.checkpoint}")
    assert all(torch.equal(run_root[k], v) for k, v in load_file(str(path)).items())
    assert out.final.generation == 1  # the search went on from it


@pytest.mark.parametrize(
    "other, words",
    [
        (dict(seed=1), "trained with --seed 0 and this run has --seed 1"),
        (dict(val_size=300), "trained with --val-size 400 and this run has --val-size 300"),
        (dict(width=1 / 8), "no packaged root for synthetic with the root"),
        (dict(split_seed=2), "trained with --split-seed 0 and this run has --split-seed 2"),
    ],
)
def test_a_packaged_root_made_for_another_split_or_width_is_not_used(other, words, monkeypatch, shipped):
    monkeypatch.setattr(roots, "ROOTS_DIR", shipped[0])
    packaged, line = roots.packaged_root(build_config("smoke", {"root": "packaged", **other}))
    assert packaged is None
    assert (
        line.startswith("root: ") and words in line and line.endswith("training the root instead (3 epochs)")
    )
    assert "\n" not in line


def test_another_seed_keeps_the_packaged_root_when_the_split_seed_is_the_root_s(monkeypatch, shipped):
    """--split-seed seeds the validation split alone: a run with another --seed but the root's split
    validates on the images the root never trained on, so the packaged root fits it."""
    monkeypatch.setattr(roots, "ROOTS_DIR", shipped[0])
    cfg = build_config("smoke", {"root": "packaged", "seed": 1, "split_seed": 0})
    packaged, line = roots.packaged_root(cfg)
    assert packaged is not None and packaged.path == shipped[1] and line.startswith("root: packaged ")
    same, other = cfg.load_data(), build_config("smoke", {"seed": 1}).load_data()
    root_split = build_config("smoke", {}).load_data()
    assert torch.equal(same.val_y, root_split.val_y) and torch.equal(same.val_x[:], root_split.val_x[:])
    assert not torch.equal(other.val_x[:], root_split.val_x[:])  # --seed alone moves the split


def test_a_packaged_root_of_another_dataset_is_not_used(tmp_path, monkeypatch, shipped):
    """Same architecture and split, but recorded for another dataset: not a root of this one."""
    model = load_model(shipped[1])
    save_checkpoint(tmp_path / "other.safetensors", model, dataset="cifar10", seed=0, val_size=400, epochs=1)
    monkeypatch.setattr(roots, "ROOTS_DIR", tmp_path)
    packaged, line = roots.packaged_root(build_config("smoke", {"root": "packaged"}))
    assert packaged is None and "no packaged root for synthetic" in line


def test_a_run_whose_split_differs_trains_its_root_and_says_why(tmp_path, monkeypatch, shipped):
    cfg = smoke_config(tmp_path, root="packaged", seed=1, max_generations=1)
    out, lines = search(cfg, monkeypatch, shipped[0])
    assert out.root.operator == "root" and out.root.seconds > 0
    assert [line for line in lines if line.startswith("root: ")] == [
        f"root: {shipped[1].name} was trained with --seed 0 and this run has --seed 1, so its training "
        "images would include this run's validation images; training the root instead (3 epochs)"
    ]


def test_without_the_packaged_file_the_run_trains_its_root(tmp_path, monkeypatch):
    cfg = smoke_config(tmp_path / "run", root="packaged", max_generations=1)
    out, lines = search(cfg, monkeypatch, tmp_path / "absent")
    assert out.root.operator == "root" and out.root.seconds > 0 and out.final.generation == 1
    assert any(line.startswith("root: no packaged root in") for line in lines)


def test_root_train_ignores_a_matching_packaged_root(tmp_path, monkeypatch, shipped):
    out, lines = search(smoke_config(tmp_path, max_generations=1), monkeypatch, shipped[0])
    assert out.root.operator == "root" and not any(line.startswith("root: ") for line in lines)


def test_the_readme_job_uses_the_shipped_fashion_mnist_root():
    """The file in the package fits the README job's dataset, space, width and split."""
    cfg = build_config("quick", {"space": "vgg16_blocks", "dataset": "fashion-mnist"})
    assert cfg.root == "packaged"
    packaged, line = roots.packaged_root(cfg)
    assert packaged is not None and packaged.path.parent == roots.ROOTS_DIR, line
    assert packaged.epochs == 30 and line.startswith(
        f"root: packaged {packaged.path.name} (30 epochs on 55,000"
    )
