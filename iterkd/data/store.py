"""The one decoded copy of a dataset that training, evaluation, the teacher cache and export read,
whatever the source (a named dataset, an image folder, a Python dataset).

A store is a directory under `store_root()` named by a *fingerprint* of its source (file names,
sizes and modification times, and the options that change the pixels): `images.npy` (uint8,
N x C x S x S, already zero-padded to the models' input side), `labels.npy` (int64), one index
array per part the source has (`train.npy`, and `val.npy` / `test.npy` when it has them) and
`meta.json` (classes, channels, sides, normalisation, a sha256 of the content, the source). It is
written under a temporary name and renamed, so a store that exists is whole; it is opened with
numpy's memory map, so a dataset larger than memory trains, paged in by the OS as batches are read.

The fingerprint only decides whether a stored copy can be reused; what a run records, and what a
resume or a worker must match, is the *content hash*."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import IterkdError
from ..files import write_atomic
from .info import DATASETS, DatasetInfo

FORMAT = 1
PARTS = ("train", "val", "test")
MARGIN_BYTES = 64 * 2**20  # kept free beside a new store, for the run's own files
HASH_CHUNK = 64 * 2**20


def store_root() -> Path:
    """$ITERKD_STORE, else ~/.cache/iterkd/stores."""
    env = os.environ.get("ITERKD_STORE")
    return Path(env) if env else Path.home() / ".cache" / "iterkd" / "stores"


def fingerprint(description: dict, files: list[Path], base: Path | None = None) -> str:
    """A key for a stored copy of `files` read with `description` (the source and the options that
    change pixels): each file's path (relative to `base`), size and modification time."""
    h = hashlib.sha256(json.dumps(description, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        name = str(f.relative_to(base)) if base else str(f)
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


class Images:
    """Rows of a store's image array picked by an index array: a split without a copy. Indexing with
    a tensor of positions or a slice reads those images (a uint8 tensor); `to(cuda)` copies the
    split to the GPU once, where the batches are gathered from then on."""

    def __init__(self, base: torch.Tensor, index: torch.Tensor):
        self.base, self.index = base, index

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.base.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def __getitem__(self, i) -> torch.Tensor:
        i, rest = (i[0], i[1:]) if isinstance(i, tuple) else (i, ())
        rows = self.index[i]
        out = self.base[rows.to(self.base.device)]
        if not rest:
            return out
        return out[rest] if rows.ndim == 0 else out[(slice(None), *rest)]

    def materialize(self) -> torch.Tensor:
        return self[:]

    def to(self, device) -> Images | torch.Tensor:
        device = torch.device(device)
        return self if device.type == "cpu" else self.materialize().to(device)

    def cpu(self) -> torch.Tensor:
        return self.materialize()


@dataclass
class Store:
    path: Path
    meta: dict
    images: torch.Tensor  # (N, C, S, S) uint8 over a memory map
    labels: torch.Tensor  # (N,) int64, in memory
    parts: dict[str, torch.Tensor]  # part -> int64 row indices

    @property
    def key(self) -> str:
        return self.path.name

    @property
    def content_hash(self) -> str:
        return self.meta["content_hash"]

    def info(self, flip: bool | None = None) -> DatasetInfo:
        """A named dataset's registry entry (its published statistics), else the store's own."""
        m = self.meta
        if m["name"] in DATASETS:
            info = DATASETS[m["name"]]
            return info if flip is None else replace(info, flip=flip)
        return DatasetInfo(
            m["name"],
            m.get("torchvision_class"),
            m["channels"],
            len(m["classes"]),
            m["size"],
            tuple(m["mean"]),
            tuple(m["std"]),
            m["flip"] if flip is None else flip,
            tuple(m["classes"]) if m.get("named_classes", True) else (),
            m["raw_size"] if m["raw_size"] != m["size"] else None,
        )

    def identity(self) -> dict:
        """What a run records of its data, and what a resume or a worker must match."""
        return {
            "content_hash": self.content_hash,
            "classes": self.meta["classes"],
            "images": len(self.labels),
            "skipped_images": self.meta.get("skipped_images", 0),  # --skip-bad-images left these out
        }


def open_store(key: str, root: Path | None = None) -> Store | None:
    """The store `key`, memory-mapped; None when there is none (or only a damaged one)."""
    path = (root or store_root()) / key
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            return None
        images = np.load(path / "images.npy", mmap_mode="c")  # copy-on-write: never written, no copy
        labels = np.load(path / "labels.npy")
        parts = {
            p: torch.from_numpy(np.load(path / f"{p}.npy")) for p in PARTS if (path / f"{p}.npy").exists()
        }
    except (OSError, ValueError, KeyError):
        return None
    return Store(path, meta, torch.from_numpy(images), torch.from_numpy(labels), parts)


def free_bytes(path: Path) -> int:
    existing = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(existing).free


def build_store(
    key: str,
    *,
    shape: tuple[int, int, int, int],
    fill: Callable[[np.ndarray, np.ndarray], dict],
    meta: dict,
    root: Path | None = None,
) -> Store:
    """Write a store: `fill(images, labels)` writes every row into the (memory-mapped, preallocated)
    arrays and returns the rest of the metadata, its `parts` (index arrays) among them. The store
    appears under `key` only once it is whole; on any failure nothing is left."""
    root = root or store_root()
    n = shape[0]
    need = int(np.prod(shape)) + 8 * n * 2 + MARGIN_BYTES
    free = free_bytes(root)
    if free < need:
        raise IterkdError(
            f"not enough disk space for the decoded dataset: it needs {need / 2**20:,.0f} MB and "
            f"{root} has {free / 2**20:,.0f} MB free; free some (iterkd data remove) or set ITERKD_STORE "
            "to a larger disk"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise IterkdError(
            f"cannot write the dataset store under {root} ({e.strerror}); set ITERKD_STORE"
        ) from None
    try:
        images = _preallocated(tmp / "images.npy", shape, np.uint8)
        labels = _preallocated(tmp / "labels.npy", (n,), np.int64)
        extra = fill(images, labels)
        images.flush()
        labels.flush()
        parts = extra.pop("parts")
        for part, index in parts.items():
            np.save(tmp / f"{part}.npy", np.asarray(index, dtype=np.int64))
        content = _content_hash(images, labels, parts, extra["classes"])
        del images, labels
        full = {**meta, **extra, "format": FORMAT, "content_hash": content, "created": time.time()}
        write_atomic(tmp / "meta.json", json.dumps(full, indent=1))
        try:
            os.rename(tmp, root / key)
        except OSError:  # another process finished the same store first: use that one
            if not (root / key / "meta.json").exists():
                raise
    except OSError as e:
        raise IterkdError(
            f"could not write the dataset store under {root} ({e.strerror or e}); free disk space or set "
            "ITERKD_STORE"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    store = open_store(key, root)
    if store is None:
        raise IterkdError(
            f"the dataset store {root / key} could not be read back; remove it (iterkd data remove)"
        )
    return store


def _preallocated(path: Path, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An .npy file of `shape` whose blocks are reserved now: a full disk is an OSError here, not a
    SIGBUS while the memory map is written."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    with open(path, "rb+") as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    return arr


def _content_hash(images: np.ndarray, labels: np.ndarray, parts: dict, classes: list[str]) -> str:
    h = hashlib.sha256(json.dumps({"classes": list(classes), "shape": list(images.shape)}).encode())
    flat = images.reshape(-1)
    for start in range(0, len(flat), HASH_CHUNK):
        h.update(flat[start : start + HASH_CHUNK])
    h.update(np.ascontiguousarray(labels))
    for part in PARTS:
        if part in parts:
            h.update(part.encode())
            h.update(np.ascontiguousarray(np.asarray(parts[part], dtype=np.int64)))
    return h.hexdigest()


def list_stores(root: Path | None = None) -> list[Store]:
    root = root or store_root()
    if not root.is_dir():
        return []
    found = (
        open_store(p.name, root) for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
    )
    return [s for s in found if s is not None]


def store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def remove_store(key: str, root: Path | None = None) -> int:
    """Delete store `key` (a unique prefix will do); returns the bytes freed."""
    root = root or store_root()
    matches = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(key)] if root.is_dir() else []
    if len(matches) != 1:
        what = "no store" if not matches else f"{len(matches)} stores"
        raise IterkdError(f"{what} under {root} match {key!r}; `iterkd data list` shows their keys")
    size = store_bytes(matches[0])
    shutil.rmtree(matches[0])
    return size
