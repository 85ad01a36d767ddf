"""Write Fashion-MNIST (Debian's `dataset-fashion-mnist` IDX files) as an image folder, the way a
user's own photos arrive: DIR/{train,val,test}/<class>/NNNNN.png. `val/` takes `--val-per-class`
training images of each class (seeded), so a model trained outside iterkd on `train/` and iterkd's
validation never share an image (docs/your-model.md).

    python scripts/fashion_folder.py fashion-png            # 55,000 / 5,000 / 10,000 images
"""

from __future__ import annotations

import argparse
import gzip
import random
from pathlib import Path

import numpy as np
from PIL import Image

from iterkd.data.info import FASHION_CLASSES

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--source", type=Path, default=DEBIAN, help="the folder of the four IDX .gz files")
    p.add_argument("--val-per-class", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    names = [f"{i}-{c.replace('/', '_')}" for i, c in enumerate(FASHION_CLASSES)]
    rng = random.Random(args.seed)
    for part, prefix in (("train", "train"), ("test", "t10k")):
        x = idx(args.source / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        y = idx(args.source / f"{prefix}-labels-idx1-ubyte.gz", 8)
        files = {c: [] for c in range(len(names))}
        for i in range(len(x)):
            files[int(y[i])].append(i)
        for c, rows in files.items():
            # Shuffled by file name, as the split of the first measurement was made.
            order = sorted(rows, key=lambda i: f"{i:05d}")
            if part == "train":
                rng.shuffle(order)
            for k, i in enumerate(order):
                where = "val" if part == "train" and k < args.val_per_class else part
                d = args.out / where / names[c]
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(x[i]).save(d / f"{i:05d}.png")
    print(f"{args.out}: train/, val/, test/ of {len(names)} classes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
