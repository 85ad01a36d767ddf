"""Python datasets (any map-style `torch.utils.data.Dataset` of `(image, int label)`) written once into
the same memory-mapped store as named datasets and image folders, for `iterkd.compress`. An image is
a PIL image, a uint8 tensor or array (C x H x W, or H x W), or a float tensor in [0, 1] as
`ToTensor` gives; never pre-normalised (iterkd normalises, --normalize). All images share one square
size. The store's key is its content hash, so the same datasets give the same store, and a run made
from them reads it as `--dataset store --data-dir KEY` (a resume, a worker, `iterkd compare`)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import IterkdError
from .folder import GREY_MODES, MAX_SIDE, MIN_SIDE
from .info import STORED, padded_side
from .store import Store, build_store, open_store, store_root

KEY_PREFIX = "python-"


def _pixels(image, where: str) -> np.ndarray:
    """One image as a C x H x W uint8 array; IterkdError (one line) for what is not an image in [0, 1]."""
    from PIL import Image  # torchvision's dependency; imported only when images are stored

    if isinstance(image, Image.Image):
        # As for a folder: the grey modes are one channel, every other mode (RGBA, P, CMYK) RGB.
        arr = np.asarray(image.convert("L" if image.mode in GREY_MODES else "RGB"))
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return np.ascontiguousarray(arr, dtype=np.uint8)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if not isinstance(image, torch.Tensor):
        raise IterkdError(
            f"{where} is a {type(image).__name__}; an image is a PIL image, a uint8 tensor or a float tensor in [0, 1]"
        )
    t = image.detach().cpu()
    t = t[None] if t.ndim == 2 else t
    if t.ndim != 3 or t.shape[0] not in (1, 3):
        raise IterkdError(
            f"{where} has shape {list(image.shape)}; an image is C x H x W with 1 or 3 channels"
        )
    if t.dtype == torch.uint8:
        return t.numpy()
    if not t.is_floating_point():
        raise IterkdError(f"{where} is a {t.dtype} tensor; give uint8 pixels or floats in [0, 1]")
    low, high = float(t.min()), float(t.max())
    if not (0.0 <= low and high <= 1.0):
        raise IterkdError(
            f"{where} holds values from {low:.3g} to {high:.3g}, outside [0, 1]: give images as ToTensor "
            "leaves them, not normalised (iterkd normalises: --normalize)"
        )
    return (t * 255).round().to(torch.uint8).numpy()


def _label(label, where: str) -> int:
    if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
        label = label.item()
    if isinstance(label, (bool, float)) or not isinstance(label, (int, np.integer)) or label < 0:
        raise IterkdError(f"{where} has label {label!r}; labels are class indices: ints from 0")
    return int(label)


def python_store(
    train,
    val=None,
    test=None,
    *,
    classes: Sequence[str] | None = None,
    progress: bool = True,
    log=print,
) -> Store:
    """The store of these datasets (written now unless the same content is stored already). Classes
    are `classes`, else the train dataset's `.classes` (torchvision's datasets have one), else 0..K-1."""
    parts = {"train": train, "val": val, "test": test}
    parts = {name: ds for name, ds in parts.items() if ds is not None}
    sizes = {}
    for name, ds in parts.items():
        try:
            sizes[name] = len(ds)
        except TypeError:
            raise IterkdError(f"the {name} dataset has no len(): iterkd takes map-style datasets") from None
    if not sizes["train"]:
        raise IterkdError("the train dataset is empty")
    item = train[0]
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise IterkdError("train[0] is not an (image, label) pair")
    pixels = _pixels(item[0], "train[0]")
    if not np.array_equal(pixels, _pixels(train[0][0], "train[0]")):
        # A random transform: every call would store other images (and a resume could not match).
        raise IterkdError(
            "train[0] differs each time it is read: the dataset has a random transform; give iterkd the "
            "images without augmentation (iterkd augments: --flip, crops)"
        )
    c, side, width = pixels.shape
    if side != width or not MIN_SIDE <= side <= MAX_SIDE:
        raise IterkdError(
            f"train[0] is {width}x{side} pixels; iterkd needs square images of {MIN_SIDE} to {MAX_SIDE} "
            "pixels: resize them in the dataset's transform"
        )
    size = padded_side(side)
    n = sum(sizes.values())
    names = list(classes or getattr(train, "classes", None) or [])

    def fill(images: np.ndarray, labels: np.ndarray) -> dict:
        pad = (size - side) // 2
        sums, count, row, index = np.zeros((2, c)), 0, 0, {}
        with tqdm(total=n, desc="storing images", unit="img", disable=not progress, leave=False) as bar:
            for name, ds in parts.items():
                start = row
                for i in range(sizes[name]):
                    where = f"{name}[{i}]"
                    item = ds[i]
                    if not isinstance(item, (tuple, list)) or len(item) != 2:
                        raise IterkdError(f"{where} is not an (image, label) pair")
                    x = _pixels(item[0], where)
                    if x.shape != (c, side, side):
                        raise IterkdError(
                            f"{where} is {list(x.shape)} (C, H, W), but train[0] is {[c, side, side]}: "
                            "give every image one size and channel count (in the dataset's transform)"
                        )
                    images[row, :, pad : pad + side, pad : pad + side] = x
                    labels[row] = _label(item[1], where)
                    if name == "train":
                        f = x.reshape(c, -1).astype(np.float64) / 255
                        sums += (f.sum(1), (f * f).sum(1))
                        count += f.shape[1]
                    row += 1
                    bar.update()
                index[name] = range(start, row)
        k = int(labels.max()) + 1
        if names and len(names) < k:
            raise IterkdError(f"a label is {k - 1}, but there are {len(names)} class names")
        mean = sums[0] / count
        std = np.sqrt(np.maximum(sums[1] / count - mean**2, 0.0))
        return {
            "classes": names or [str(i) for i in range(k)],
            "mean": [round(float(m), 6) for m in mean],
            "std": [round(float(max(s, 1e-3)), 6) for s in std],
            "parts": index,
        }

    meta = {
        "name": STORED,
        "source": "python datasets",
        "channels": c,
        "size": size,
        "raw_size": side,
        "flip": True,
    }
    pending = f".pending-{KEY_PREFIX}{os.getpid()}-{time.time_ns()}"
    built = build_store(pending, shape=(n, c, size, size), fill=fill, meta=meta)
    key = KEY_PREFIX + built.content_hash[:20]
    existing = open_store(key)
    if existing is not None:  # the same images and labels were stored before: that copy serves
        shutil.rmtree(built.path, ignore_errors=True)
        return existing
    try:
        os.rename(built.path, store_root() / key)
    except OSError:  # another process stored the same content first
        shutil.rmtree(built.path, ignore_errors=True)
    store = open_store(key)
    if store is None:
        raise IterkdError(f"the dataset store {store_root() / key} could not be read back; remove it")
    log(f"python datasets: stored {n:,} images ({c} channel(s), {side}px) as {store.path}")
    return store
