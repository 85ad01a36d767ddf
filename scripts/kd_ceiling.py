"""How accurate can one architecture get with one-shot KD from a run's root, given N epochs? A
ceiling for a search: if a model of some size misses the budget with all the compute a search
would spend on it, no search with that compute reaches that size within the budget.

It trains the architecture (--blocks, conv widths per block, as JSON) from scratch with the run's
data and KD settings, as `iterkd compare`'s one-shot-kd row does, and prints one JSON line. The run
is only read. docs/results.md section 2 used it on the README job:

    python scripts/kd_ceiling.py runs/run --blocks '[[8,8],[16,16],[32,32]]' --epochs 40
    python scripts/kd_ceiling.py runs/run --blocks '[[8,8],[16,16],[32,32]]' --epochs 16 --train-subset all
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from iterkd.compare import BaselineTrainer, final_node
from iterkd.device import resolve_device
from iterkd.errors import IterkdError
from iterkd.run import open_run


def parse_blocks(text: str) -> tuple[tuple[int, ...], ...]:
    try:
        blocks = json.loads(text)
    except json.JSONDecodeError as e:
        raise IterkdError(f"--blocks must be JSON such as [[8,8],[16,16]], got {text!r} ({e.msg})") from None
    if not isinstance(blocks, list) or not all(isinstance(b, list) for b in blocks):
        raise IterkdError(f"--blocks must be a list of lists of conv widths, got {text!r}")
    return tuple(tuple(b) for b in blocks)


def ceiling(
    run_dir: str, blocks, epochs: int, train_subset: str, seed: int, device: str, progress: bool
) -> dict:
    if epochs < 1:
        raise IterkdError(f"--epochs must be at least 1, got {epochs}")
    run = open_run(run_dir)
    cfg, root = run.cfg, run.root
    if train_subset != "run":
        if train_subset != "all" and not (train_subset.isdigit() and int(train_subset) > 0):
            raise IterkdError(f"--train-subset must be run, all or a positive count, got {train_subset!r}")
        cfg = replace(cfg, train_subset=None if train_subset == "all" else int(train_subset))
    final = final_node(run)  # its KD settings (and its input shape) are the one-shot-kd row's
    spec = replace(final.spec, blocks=blocks)  # validated as any spec is
    dev = resolve_device(device)
    data = cfg.load_data(dev)
    root_model = run.model(root).to(dev)
    trainer = BaselineTrainer(cfg, data, replace(final, spec=spec), root_model, [root_model], [], progress)
    _, val, test, seconds = trainer.fit("one-shot-kd", seed, epochs)
    return dict(
        run=str(run_dir), blocks=[list(b) for b in blocks], params=spec.params(), flops=spec.flops(),
        times_smaller=round(root.spec.params() / spec.params(), 2), epochs=epochs,
        train_images=len(data.train_x), seed=seed, val=round(val, 2), test=round(test, 2),
        root_val=root.val_acc, drop=round(root.val_acc - val, 2), seconds=round(seconds, 1),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory (runs/NAME)")
    p.add_argument("--blocks", required=True, help="conv widths per block, JSON: [[8,8],[16,16],[32,32]]")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--train-subset", default="run", help="run (the run's), all, or a count of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        out = ceiling(args.run, parse_blocks(args.blocks), args.epochs, args.train_subset, args.seed,
                      args.device, not args.no_progress)  # fmt: skip
    except IterkdError as e:
        print(f"kd_ceiling: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
