"""Decode rate of image folders into the store, and the time to reopen a store: one JSON line per
case. `python bench/decode.py [--pngs N] [--jpegs N] [--workdir DIR]`.

- fmnist-png-28: N real Fashion-MNIST training images (Debian's dataset-fashion-mnist) written as
  28x28 grey PNGs into an ImageFolder tree (skipped when the package is absent);
- jpeg-256: N generated 256x256 RGB JPEGs (smooth random colour fields), stored at their size.
Writing the trees is not timed; decoding is the first open (headers, decode, normalisation,
content hash, rename), reopening is a second open of the same folder (listing, fingerprint, memory map)."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from iterkd.data import FOLDER, open_dataset

FASHION = Path("/usr/share/datasets/fashion-mnist")


def fmnist_tree(root: Path, n: int) -> bool:
    if not FASHION.is_dir():
        return False
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    for i in range(min(n, len(x))):
        d = root / "train" / str(y[i])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(d / f"{i:05d}.png")
    return True


def jpeg_tree(root: Path, n: int, side: int = 256) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side, side), Image.Resampling.BILINEAR).save(
            d / f"{i:05d}.jpg", quality=90
        )


def measure(name: str, root: Path) -> dict:
    start = time.perf_counter()
    store = open_dataset(FOLDER, root, progress=False, log=lambda s: None)
    decode = time.perf_counter() - start
    start = time.perf_counter()
    again = open_dataset(FOLDER, root, progress=False, log=lambda s: None)
    reopen = time.perf_counter() - start
    assert again.path == store.path
    n = len(store.labels)
    return {
        "case": name,
        "images": n,
        "shape": list(store.images.shape[1:]),
        "decode_s": round(decode, 2),
        "images_per_s": round(n / decode),
        "reopen_s": round(reopen, 3),
        "store_mb": round(store.images.numel() / 2**20, 1),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pngs", type=int, default=10000)
    p.add_argument("--jpegs", type=int, default=2000)
    p.add_argument("--workdir", help="where the trees and stores go (default: a temporary folder)")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="iterkd-decode-"))
    os.environ["ITERKD_STORE"] = str(work / "stores")  # never the user's cache
    if fmnist_tree(work / "png", args.pngs):
        print(json.dumps(measure("fmnist-png-28", work / "png")))
    jpeg_tree(work / "jpeg", args.jpegs)
    print(json.dumps(measure("jpeg-256", work / "jpeg")))


if __name__ == "__main__":
    main()
