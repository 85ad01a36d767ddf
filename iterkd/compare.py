"""`iterkd compare RUN`: did the iterative search pay off? The run's final architecture retrained from
scratch with labels only and with one-shot KD from the root, over seeds, beside the run's own result.

Mirzadeh et al. 2020 ("Improved Knowledge Distillation via Teacher Assistant") call these NOKD (no
teacher), BLKD (baseline KD from the big teacher) and TAKD (through intermediate teachers: iterkd's chain).
Every trained model is saved to RUN/compare.json at once, so an interrupted compare resumes."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .checkpoints import load_model
from .config import PRESETS
from .device import resolve_device
from .errors import IterkdError
from .export import markdown_table
from .files import write_atomic
from .lineage import Node, ancestry, nodes
from .models import VGG
from .run import Run, open_run
from .train import train
from .trainer import kd_settings

METHODS = ("scratch-ce", "one-shot-kd")  # NOKD and BLKD in Mirzadeh et al.'s terms
HEADERS = [
    "method",
    "params",
    "epochs",
    "n",
    "val acc % (mean ± std)",
    "test acc % (mean ± std)",
    "s / model",
]


@dataclass(frozen=True)
class SeedResult:
    """One retrained model; (method, seed, epochs, node) identifies it across resumed compares."""

    method: str
    seed: int
    epochs: int
    node: int  # the final node whose architecture was retrained
    params: int
    val_acc: float
    test_acc: float
    seconds: float
    device: str

    @property
    def key(self) -> tuple:
        return self.method, self.seed, self.epochs, self.node


@dataclass(frozen=True)
class Row:
    method: str
    params: int
    epochs: int
    val: list[float]
    test: list[float]
    seconds: list[float]

    def cells(self) -> list[str]:
        return [
            self.method,
            f"{self.params:,}",
            str(self.epochs),
            str(len(self.val)),
            mean_std(self.val),
            mean_std(self.test),
            "–" if not self.seconds else f"{statistics.fmean(self.seconds):.1f}",
        ]


@dataclass(frozen=True)
class Comparison:
    root: Node
    final: Node
    epochs: int
    seeds: int
    rows: list[Row]
    trained: int  # models trained by this call (0: everything came from compare.json)
    json_path: Path
    markdown_path: Path


def mean_std(values: list[float]) -> str:
    """'mean ± sample std' (ddof=1); the std is '–' for a single value, the cell for none."""
    if not values:
        return "–"
    std = f"{statistics.stdev(values):.2f}" if len(values) > 1 else "–"
    return f"{statistics.fmean(values):.2f} ± {std}"


def final_node(run: Run) -> Node:
    """The run's final model (see Run.final_node); an error when no child has been accepted yet."""
    node = run.final_node()
    if node is None or node.generation == 0 or not node.ok:
        raise IterkdError(
            f"run {run.run_dir} has no accepted child yet, so there is nothing to compare with the "
            f"root; continue its search first: iterkd search --run-dir {run.run_dir}"
        )
    return node


def compare_epochs(run_epochs: int, epochs: int | None = None, preset: str | None = None) -> int:
    """Epochs per baseline model: --epochs, else the --preset's child epochs, else the run's own."""
    if preset is not None and preset not in PRESETS:
        raise IterkdError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    value = epochs if epochs is not None else PRESETS[preset]["epochs"] if preset else run_epochs
    if value < 1:
        raise IterkdError(f"--epochs must be at least 1, got {value}")
    return value


def read_results(path: Path) -> list[SeedResult]:
    if not path.exists():
        return []
    try:
        return [SeedResult(**r) for r in json.loads(path.read_text())["results"]]
    except (ValueError, TypeError, KeyError) as e:
        raise IterkdError(
            f"{path} is not a compare.json written by iterkd ({e}); move it away to start afresh"
        ) from None


def write_results(path: Path, run_name: str, results: list[SeedResult]) -> None:
    write_atomic(
        path, json.dumps({"run": run_name, "results": [asdict(r) for r in results]}, indent=2) + "\n"
    )


def compare_run(
    run_dir: str | Path,
    *,
    seeds: int = 3,
    epochs: int | None = None,
    preset: str | None = None,
    device: str | None = None,
    data_dir: str | None = None,
    storage: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Comparison:
    """Retrain the run's final architecture with each method for seeds 0..seeds-1 (skipping what
    RUN/compare.json already holds), then write RUN/compare.md and return the table's rows."""
    if seeds < 1:
        raise IterkdError(f"--seeds must be at least 1, got {seeds}")
    run = open_run(run_dir, storage=storage)
    cfg, root, final = run.cfg, run.root, final_node(run)
    n_epochs = compare_epochs(cfg.epochs, epochs, preset)
    json_path, md_path = run.run_dir / "compare.json", run.run_dir / "compare.md"
    results = read_results(json_path)
    done = {r.key for r in results}
    todo = [(m, s) for s in range(seeds) for m in METHODS if (m, s, n_epochs, final.node) not in done]
    if len(todo) < seeds * len(METHODS):
        log(f"compare: reusing {seeds * len(METHODS) - len(todo)} results from {json_path}")
    if todo:
        dev = resolve_device(device or cfg.device)
        data = replace(cfg, data_dir=data_dir or cfg.data_dir).load_data(dev)
        hint_teacher = run.model(root).to(
            dev
        )  # live, not the run's cache: the same targets up to fp16 rounding
        # An ensemble root teaches through all its members, as it did in the run.
        teachers = [load_model(run.run_dir / m["checkpoint"]).to(dev) for m in root.members] or [hint_teacher]
        # The final node's own KD settings (a space's kd: ranges may have searched them), else the run's.
        kd_values = {
            "alpha": cfg.alpha,
            "temperature": cfg.temperature,
            "hint_weight": cfg.hint_weight,
            "lr": cfg.lr,
            **final.loss,
        }
        for method, seed in todo:
            # The seed picks the initial weights and the batch order; the augmentation views are the run's, as a child's.
            torch.manual_seed(seed)
            model = VGG(final.spec)
            kd = dict(teachers=teachers, hint_teacher=hint_teacher) if method == "one-shot-kd" else {}
            settings = kd_settings(cfg, n_epochs, seed, kd_values)
            out = train(model, data, settings, progress=progress, desc=f"{method} seed {seed}", **kd)
            results.append(
                SeedResult(
                    method,
                    seed,
                    n_epochs,
                    final.node,
                    final.spec.params(),
                    out.val_acc,
                    out.test_acc,
                    round(out.seconds, 2),
                    dev.type,
                )
            )
            write_results(
                json_path, cfg.name, results
            )  # after every model: an interrupted compare resumes here
            log(f"{method} seed {seed}: val {out.val_acc:.2f}%  test {out.test_acc:.2f}%  {out.seconds:.0f}s")
    comparison = Comparison(
        root,
        final,
        n_epochs,
        seeds,
        table_rows(root, final, results, n_epochs, seeds),
        len(todo),
        json_path,
        md_path,
    )
    write_atomic(md_path, render_markdown(run, comparison))
    return comparison


def table_rows(root: Node, final: Node, results: list[SeedResult], epochs: int, seeds: int) -> list[Row]:
    """Root (context), the baselines over seeds 0..seeds-1 at `epochs`, and the run's final node (n=1)."""

    def one(label: str, n: Node) -> Row:
        return Row(
            label, n.spec.params(), n.epochs, [n.val_acc], [n.test_acc], [n.seconds] if n.seconds else []
        )

    rows = [one(f"root (node {root.node})", root)]
    for method in METHODS:
        mine = sorted(
            (
                r
                for r in results
                if r.method == method and r.epochs == epochs and r.node == final.node and r.seed < seeds
            ),
            key=lambda r: r.seed,
        )
        rows.append(
            Row(
                method,
                final.spec.params(),
                epochs,
                [r.val_acc for r in mine],
                [r.test_acc for r in mine],
                [r.seconds for r in mine],
            )
        )
    rows.append(one(f"iterkd (this run, node {final.node})", final))
    return rows


def chain_seconds(run: Run, final: Node) -> float:
    """Training seconds of every node on the path root -> final: what the iterkd row's model cost."""
    return sum(n.seconds or 0.0 for n in ancestry(nodes(run.study), final))


def render_markdown(run: Run, c: Comparison) -> str:
    root, final, cfg = c.root, c.final, run.cfg
    path = " → ".join(str(n.node) for n in ancestry(nodes(run.study), final))
    seeds = "seed 0" if c.seeds == 1 else f"seeds 0–{c.seeds - 1}"
    lines = [
        f"# Did the iterative search pay off? Run `{cfg.name}`",
        "",
        f"The final model, node {final.node} (`{final.spec.summary()}`, {final.spec.params():,} params, "
        f"{root.spec.params() / final.spec.params():.1f}x smaller than the root), retrained from scratch for "
        f"{_epochs(c.epochs)} with {seeds} on the run's data and a child's training settings:",
        "",
        markdown_table(HEADERS, [r.cells() for r in c.rows]),
        "",
    ]
    if c.epochs != final.epochs:
        lines += [
            f"**Not like for like**: each baseline trained {_epochs(c.epochs)}, node {final.node} trained "
            f"{_epochs(final.epochs)} (`--epochs` or `--preset` differ from the run's).",
            "",
        ]
    lines += [
        "- **scratch-ce**: labels only (cross-entropy), no teacher — Mirzadeh et al. 2020's NOKD.",
        f"- **one-shot-kd**: KD + {cfg.hint} hint from the root alone, with the final node's loss settings "
        f"({', '.join(f'{k} {v:g}' for k, v in sorted(final.loss.items())) or 'the run defaults'}) — BLKD.",
        f"- **iterkd**: the run's own node {final.node}, distilled along the chain {path} — TAKD-like; "
        "one model (n = 1), selected on validation, so compare test accuracy.",
        f"- Training time of the whole chain root → node {final.node}: {chain_seconds(run, final):.0f} s.",
        "- std is the sample standard deviation over seeds (ddof = 1); raw results in `compare.json`.",
        "",
    ]
    return "\n".join(lines)


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def text_table(rows: list[Row]) -> str:
    """The rows as aligned plain text for the terminal."""
    cells = [HEADERS] + [r.cells() for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADERS))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    )
