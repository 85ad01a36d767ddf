"""Train a root to ship with iterkd (iterkd/roots/, used by `--root packaged`, the quick preset's
default). The shipped Fashion-MNIST root is this script with its defaults; docs/results.md has its
figures. Its settings are the quick preset's, except that it trains on every training image but
the validation set, for --epochs epochs.

    python scripts/train_root.py            # -> iterkd/roots/fashion-mnist-vgg16_blocks-w0.125.safetensors
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from iterkd.config import build_config
from iterkd.errors import IterkdError
from iterkd.roots import ROOTS_DIR, train_packaged_root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--space", default="vgg16_blocks")
    p.add_argument("--width", type=float, default=1 / 8)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0, help="seeds the validation split and the init")
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("-o", "--out", type=Path, default=None, help="default: iterkd/roots/DATASET-SPACE-wWIDTH")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        settings = dict(
            name="root",
            dataset=args.dataset,
            space=args.space,
            width=args.width,
            root_epochs=args.epochs,
            seed=args.seed,
            val_size=args.val_size,
            data_dir=args.data_dir,
            device=args.device,
        )
        cfg = replace(build_config("quick", settings), train_subset=None)
        out = args.out or ROOTS_DIR / f"{args.dataset}-{args.space}-w{args.width:g}.safetensors"
        command = shlex.join(
            ["python", "scripts/train_root.py", *(argv if argv is not None else sys.argv[1:])]
        )
        train_packaged_root(cfg, out, command=command, progress=not args.no_progress)
    except IterkdError as e:
        print(f"train_root: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
