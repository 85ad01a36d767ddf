"""Roots shipped with iterkd (package data in iterkd/roots/): a converged root for one dataset,
architecture and validation split, so that a CPU demo spends its minutes on the search rather than
on training its teacher. `packaged_root` says whether one fits a run (`--root packaged`);
`train_packaged_root` makes one (scripts/train_root.py is the command that reproduces each file).

A packaged root fits only a run whose validation set it never trained on: the split is a seeded
permutation of the training set (data.load_data), so the root's split seed (--split-seed, else
--seed) and --val-size must be the run's. It trained on every other training image; a run's
--train-subset is a part of those."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import read_checkpoint, save_checkpoint
from .config import SearchConfig
from .data import val_images
from .device import resolve_device
from .errors import IterkdError
from .models import VGG
from .spaces import load_space

ROOTS_DIR = Path(__file__).parent / "roots"


def root_spec(cfg: SearchConfig):
    """The root architecture a config's space, dataset and --width make."""
    info = cfg.data_info()
    return load_space(cfg.space).root_spec(info.channels, info.num_classes, info.size, cfg.width)


@dataclass(frozen=True)
class PackagedRoot:
    path: Path
    epochs: int  # what trained it, for the root node's attributes

    @property
    def operator(self) -> str:
        return f"packaged:{self.path.name}"


def packaged_root(cfg: SearchConfig) -> tuple[PackagedRoot | None, str]:
    """The packaged root that fits this run and a line saying so, or None and a line saying why a
    root is trained instead."""
    trained = f"training the root instead ({cfg.root_epochs} epochs)"
    files = sorted(ROOTS_DIR.glob("*.safetensors")) if ROOTS_DIR.is_dir() else []
    if not files:
        return None, f"root: no packaged root in {ROOTS_DIR}; {trained}"
    spec, why = root_spec(cfg), []
    for path in files:
        try:
            ckpt_spec, _, meta = read_checkpoint(path)
        except IterkdError as e:
            why.append(f"{path.name} is unreadable ({e})")
            continue
        if meta.get("dataset") != cfg.dataset or ckpt_spec != spec:
            continue  # made for another dataset or architecture: not a candidate
        val_size = cfg.val_size if cfg.val_size is not None else val_images(None, 0, cfg.dataset)
        split = {"seed": cfg.data_seed, "val_size": val_size}  # the metadata's seed is the split's
        other = {k: meta.get(k) for k in split if meta.get(k) != split[k]}
        if other:
            flag = {"seed": "--seed" if cfg.split_seed is None else "--split-seed", "val_size": "--val-size"}
            was = ", ".join(f"{flag[k]} {v}" for k, v in other.items())
            now = ", ".join(f"{flag[k]} {split[k]}" for k in other)
            why.append(
                f"{path.name} was trained with {was} and this run has {now}, so its training images "
                "would include this run's validation images"
            )
            continue
        return PackagedRoot(path, meta.get("epochs", 0)), (
            f"root: packaged {path.name} ({meta.get('epochs')} epochs on {meta.get('train_images'):,} "
            f"images, val {meta.get('val_acc'):.2f} %, test {meta.get('test_acc'):.2f} %); "
            "--root train trains one instead"
        )
    if not why:
        return None, (
            f"root: no packaged root for {cfg.dataset} with the root {spec.summary()} (space "
            f"{cfg.space}, --width {cfg.width:g}); {trained}"
        )
    return None, f"root: {'; '.join(why)}; {trained}"


def train_packaged_root(
    cfg: SearchConfig, out: Path, *, command: str, progress: bool = True, log: Callable[[str], None] = print
) -> Path:
    """Train the root `cfg` describes on labels, on its training split (every training image but
    the validation set unless --train-subset says otherwise), and write it to `out` with what
    `packaged_root` checks and the figures docs/results.md quotes."""
    from .train import train
    from .trainer import train_settings  # trainer is above this module in the import order

    device = resolve_device(cfg.device)
    data = cfg.load_data(device)
    torch.manual_seed(cfg.seed)
    model = VGG(root_spec(cfg))
    log(
        f"training {model.spec.summary()} ({model.spec.params():,} params) on {len(data.train_x):,} "
        f"{cfg.dataset} images for {cfg.root_epochs} epochs; validation: {len(data.val_x):,} images "
        f"(split seed {cfg.data_seed})"
    )
    start = time.time()

    def on_epoch(epoch: int, val: float) -> None:
        log(f"epoch {epoch + 1}/{cfg.root_epochs}: val {val:.2f} % ({time.time() - start:.0f} s)")

    settings = train_settings(cfg, cfg.root_epochs, cfg.seed)
    result = train(model, data, settings, on_epoch=on_epoch, progress=progress, desc="root")
    save_checkpoint(
        out,
        model,
        dataset=cfg.dataset,
        space=cfg.space,
        width=cfg.width,
        seed=cfg.data_seed,
        val_size=len(data.val_x),
        train_images=len(data.train_x),
        epochs=cfg.root_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        precision=result.precision,
        val_acc=result.val_acc,
        test_acc=result.test_acc,
        history=[round(v, 2) for v in result.history],
        seconds=round(result.seconds, 1),
        command=command,
    )
    log(
        f"wrote {out}: val {result.val_acc:.2f} %, test {result.test_acc:.2f} %, "
        f"{result.seconds:.0f} s of training"
    )
    return out
