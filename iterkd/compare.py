"""`iterkd compare RUN`: did the iterative search pay off? The run's final model beside what the same
data and teacher give without the search: the final architecture trained from scratch on labels, the
same architecture distilled once from the root (for one child's epochs, for as many epochs as the
chain spent, and for every epoch the search paid), the same at paid compute starting from the root's
weights through the search's own inheritance operator, and the root pruned channel by channel with
Torch-Pruning and fine-tuned with KD for the chain's epochs. Every row over seeds; `--search-seeds M`
reruns the search itself so the chain has a spread too. compare.md ends with a verdict at the compute
the search paid, then one at the chain's compute (the run's report shows both).

Mirzadeh et al. 2020 ("Improved Knowledge Distillation via Teacher Assistant") call the first rows NOKD
(no teacher), BLKD (baseline KD from the big teacher) and TAKD (through intermediate teachers: iterkd's
chain). Every trained model is saved to RUN/compare.json at once and every search rerun is a resumable
run under RUN/compare/, so an interrupted compare resumes."""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .arch import VGGSpec
from .checkpoints import load_model
from .config import PRESETS, SearchConfig
from .data import DataSplits
from .device import resolve_device
from .errors import IterkdError
from .export import markdown_table
from .files import write_atomic
from .inherit import inherit_weights
from .lineage import Node, ancestry, nodes
from .models import VGG
from .run import Run, open_run
from .search import Search
from .train import TrainSettings, recalibrate_bn, train
from .trainer import frozen_teacher, kd_settings

PRUNE_INSTALL = "pip install 'iterkd[prune]'"  # what a user without Torch-Pruning runs
PRUNE_TOLERANCE = 0.02  # the pruned model's parameters within 2 % of the final node's
# Training FLOPs of one image: its forward pass and a backward pass of about twice that (the usual
# estimate, e.g. Kaplan et al. 2020); the teachers' forward passes are not counted.
TRAIN_FLOPS_PER_FORWARD = 3
HEADERS = [
    "method",
    "params",
    "MFLOPs",
    "epochs",
    "images seen",
    "train FLOPs",
    "n",
    "val acc % (mean ± std)",
    "test acc % (mean ± std)",
    "Δ test vs iterkd (pts)",
    "s / model",
    "paid: epochs",
    "paid: FLOPs",
    "paid: s",
]
CHAIN, PAID = "chain compute", "paid compute"  # the two bases a verdict can name


@dataclass(frozen=True)
class SeedResult:
    """One retrained model; (method, seed, epochs, node) identifies it across resumed compares."""

    method: str
    seed: int
    epochs: int
    node: int  # the final node whose architecture (or parameter count, when pruning) was matched
    params: int
    val_acc: float
    test_acc: float
    seconds: float
    device: str
    flops: int = 0  # per image, from the model's spec (0 in files written before it was recorded)
    spec: str = ""  # the trained model's spec as JSON: a pruned model's differs from the final node's

    @property
    def key(self) -> tuple:
        return self.method, self.seed, self.epochs, self.node


@dataclass(frozen=True)
class Baseline:
    """One row of trained baselines: `method` trained for `epochs` per seed, shown as `label`;
    `key` names it for `iterkd compare --rows`."""

    label: str
    method: str
    epochs: int
    key: str


@dataclass(frozen=True)
class Row:
    """A table row: one entry per model behind it (seeds, or searches for the iterkd row)."""

    method: str
    params: int
    flops: int | None  # per image; None for a frozen teacher (a program iterkd does not count)
    epochs: list[int]
    val: list[float]
    test: list[float]
    seconds: list[float]
    train_flops: list[float] = field(default_factory=list)  # the student's forward + backward, summed
    paid_epochs: list[int] = field(default_factory=list)  # everything trained to get a model (search)
    paid_train_flops: list[float] = field(default_factory=list)
    paid_seconds: list[float] = field(default_factory=list)
    delta: str = "–"  # test accuracy against the iterkd row, with its uncertainty

    @property
    def paid(self) -> tuple[list[int], list[float], list[float]]:
        """(epochs, training FLOPs, seconds) paid for the row's models: a baseline's own training, the
        whole search for the iterkd row."""
        return (
            self.paid_epochs or self.epochs,
            self.paid_train_flops or self.train_flops,
            self.paid_seconds or self.seconds,
        )

    def cells(self, images_per_epoch: int) -> list[str]:
        paid_epochs, paid_flops, paid_seconds = self.paid
        return [
            self.method,
            f"{self.params:,}",
            "–" if self.flops is None else f"{self.flops / 1e6:.2f}",
            spread(self.epochs),
            spread([e * images_per_epoch for e in self.epochs], "{:,}"),
            flops_cell(self.train_flops),
            str(len(self.test)),
            mean_std(self.val),
            mean_std(self.test),
            self.delta,
            "–" if not self.seconds else f"{statistics.fmean(self.seconds):.1f}",
            spread(paid_epochs),
            flops_cell(paid_flops),
            "–" if not paid_seconds else f"{statistics.fmean(paid_seconds):.1f}",
        ]

    def record(self) -> dict:
        """The row as compare.json keeps it: every model's numbers, unrounded."""
        paid_epochs, paid_flops, paid_seconds = self.paid
        return {
            "method": self.method,
            "params": self.params,
            "flops": self.flops,
            "n": len(self.test),
            "epochs": self.epochs,
            "train_flops": self.train_flops,
            "seconds": self.seconds,
            "val_acc": self.val,
            "test_acc": self.test,
            "delta_test": self.delta,
            "paid_epochs": paid_epochs,
            "paid_train_flops": paid_flops,
            "paid_seconds": paid_seconds,
        }


@dataclass(frozen=True)
class Comparison:
    root: Node
    final: Node
    epochs: int  # per equal-epochs baseline (one child's)
    chain_epochs: int  # the chain's, root excluded: the chain-compute rows'
    paid_epochs: int  # every child epoch the run's search trained: the paid-compute rows'
    images_per_epoch: int
    seeds: int
    search_seeds: list[int]  # the seeds of the searches behind the iterkd row
    rows: list[Row]
    verdict: str  # at paid compute, then at chain compute
    notes: list[str]  # what was skipped, and why
    trained: int  # models and searches trained by this call (0: everything was reused)
    json_path: Path
    markdown_path: Path


# -- numbers ----------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
    """'mean ± sample std' (ddof=1); the std is '–' for a single value, the cell for none."""
    if not values:
        return "–"
    std = f"{statistics.stdev(values):.2f}" if len(values) > 1 else "–"
    return f"{statistics.fmean(values):.2f} ± {std}"


def flops_cell(values: list[float]) -> str:
    """Training FLOPs, the mean of the models behind a row (searches differ), as '19.1 T' or '5.28 G'."""
    if not values:
        return "–"
    mean = statistics.fmean(values)
    scale, unit = next(((f, u) for f, u in ((1e15, "P"), (1e12, "T"), (1e9, "G")) if mean >= f), (1e6, "M"))
    return f"{mean / scale:.3g} {unit}"


def spread(values: list[int], fmt: str = "{}") -> str:
    """One value, or 'low–high' when the models behind a row differ (searches of other seeds)."""
    if not values:
        return "–"
    low, high = min(values), max(values)
    return fmt.format(low) if low == high else f"{fmt.format(low)}–{fmt.format(high)}"


def difference(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """mean(a) - mean(b) and its standard error, sqrt(s_a²/n_a + s_b²/n_b) (Welch), from the sides
    that have a spread (n > 1); None when neither has one."""
    parts = [statistics.variance(v) / len(v) for v in (a, b) if len(v) > 1]
    return statistics.fmean(a) - statistics.fmean(b), math.sqrt(sum(parts)) if parts else None


def delta_cell(row: list[float], chain: list[float]) -> str:
    """'+0.84 ± 0.20' (mean test difference ± its standard error); '†' when the chain is one search,
    so its own spread is missing from the uncertainty."""
    if not row or not chain:
        return "–"
    diff, se = difference(row, chain)
    mark = "†" if len(chain) == 1 else ""
    return f"{diff:+.2f} ± {'–' if se is None else f'{se:.2f}'}{mark}"


# -- compute ----------------------------------------------------------------------------------------


def trained_epochs(n: Node) -> int:
    """Epochs node `n` trained: the one place compute is read from a node. A child a pruner stopped
    early records its own count (`epochs_trained`); a node from before that record, its plan."""
    return n.epochs if n.epochs_trained is None else n.epochs_trained


def chain_path(run: Run, final: Node) -> list[Node]:
    """root, ..., final along first parents (a polish node's parent is the last accepted node)."""
    return ancestry(nodes(run.study), final)


def chain_epochs(path: list[Node]) -> int:
    """Epochs the chain trained after the root (every row starts from the same root, so its own
    training is left out of every row's compute)."""
    return sum(trained_epochs(n) for n in path[1:])


def paid_nodes(run: Run) -> list[Node]:
    """Every node the search trained after the root, rejected, pruned and polish nodes included:
    what the user paid for the final model. Failed nodes left no count and are not in it."""
    return [n for n in nodes(run.study) if n.parents and (n.ok or n.state == "PRUNED")]


def search_compute(run: Run) -> tuple[int, float]:
    """(epochs, seconds) the search paid after the root (`paid_nodes`)."""
    trained = paid_nodes(run)
    return sum(trained_epochs(n) for n in trained), sum(n.seconds or 0.0 for n in trained)


def training_flops(steps: list[tuple[VGGSpec, int]], per_epoch: int) -> float:
    """FLOPs of training each (spec, epochs) step on `per_epoch` images an epoch: forward and backward
    of the student (TRAIN_FLOPS_PER_FORWARD x its forward FLOPs) per image, summed over the steps."""
    return float(sum(TRAIN_FLOPS_PER_FORWARD * spec.flops() * per_epoch * e for spec, e in steps))


def node_flops(chain: list[Node], per_epoch: int) -> float:
    """Training FLOPs of the nodes in `chain` at the epochs each trained."""
    return training_flops([(n.spec, trained_epochs(n)) for n in chain], per_epoch)


def images_per_epoch(n_train: int, batch_size: int) -> int:
    """Images one training epoch shows: full batches only, as data.train_batches draws them (one
    short batch when the training set is smaller than a batch)."""
    return n_train - n_train % batch_size if n_train >= batch_size else n_train


def prune_steps(path: list[Node]) -> list[tuple[int, int]]:
    """The chain's rhythm as (parameter target, fine-tune epochs) per pruning step: one step per
    node of the chain that shrank its parent, to that node's size, for that node's epochs; a node
    that kept its parent's size (a polish) adds its epochs to the step before it."""
    steps: list[list[int]] = []
    for parent, child in zip(path, path[1:]):
        if child.spec.params() < parent.spec.params() or not steps:
            steps.append([child.spec.params(), trained_epochs(child)])
        else:
            steps[-1][1] += trained_epochs(child)
    return [(target, epochs) for target, epochs in steps]


# -- Torch-Pruning ------------------------------------------------------------------------------------


def have_torch_pruning() -> bool:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return False
    return True


def pruned_spec(root: VGGSpec, target: int) -> VGGSpec:
    """`root`'s convs narrowed to about `target` parameters: one keep-fraction of the root's widths
    for every conv (at least one channel each; the smallest fraction that still reaches the target),
    then one channel at a time off the conv that keeps the largest fraction among those whose loss of
    a channel brings the count closer to the target."""

    def narrowed(keep: float) -> list[int]:
        return [max(1, round(w * keep)) for b in root.blocks for w in b]

    def spec_of(widths: list[int]) -> VGGSpec:
        blocks, i = [], 0
        for b in root.blocks:
            blocks.append(tuple(widths[i : i + len(b)]))
            i += len(b)
        return replace(root, blocks=tuple(blocks))

    lo, hi = 0.0, 1.0  # spec_of(narrowed(hi)) has at least `target` parameters
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if spec_of(narrowed(mid)).params() >= target else (mid, hi)
    widths, full = narrowed(hi), [w for b in root.blocks for w in b]
    while True:
        miss = abs(spec_of(widths).params() - target)
        closer = [
            (w / f, i)
            for i, (w, f) in enumerate(zip(widths, full))
            if w > 1 and abs(spec_of(widths[:i] + [w - 1] + widths[i + 1 :]).params() - target) < miss
        ]
        if not closer:
            return spec_of(widths)
        i = max(closer)[1]
        widths = widths[:i] + [widths[i] - 1] + widths[i + 1 :]


def unreachable_by_pruning(root: VGGSpec, steps: list[tuple[int, int]]) -> str | None:
    """Why channel pruning of `root` cannot follow the chain's sizes (`prune_steps`; None when it
    can): it narrows convs only, so a head that outweighs the target (torchvision's 4,096-wide one) stays."""
    for (target, _), (spec, _) in zip(steps, pruned_specs(root, steps)):
        if abs(spec.params() - target) > PRUNE_TOLERANCE * target:
            head = sum(i * o + o for i, o in spec.head_layers())
            return (
                f"channel pruning narrows the root's convs only and cannot reach {target:,} params: its "
                f"smallest is {spec.params():,}, of which the fully connected layers hold {head:,}"
            )
    return None


def pruned_specs(root: VGGSpec, steps: list[tuple[int, int]]) -> list[tuple[VGGSpec, int]]:
    """(spec, epochs) of each step of the prune-kd row: what `prune_and_finetune` trains, from the
    specs alone (each step narrows the last one's widths)."""
    out, spec = [], root
    for target, epochs in steps:
        spec = pruned_spec(spec, target)
        out.append((spec, epochs))
    return out


def prune_to(model: VGG, spec: VGGSpec) -> VGG:
    """`model` with each conv's output channels cut to `spec`'s widths through Torch-Pruning's
    dependency graph (the BN, the next conv's inputs and the classifier follow), dropping the filters
    of smallest L1 norm (Li et al. 2017, "Pruning Filters for Efficient ConvNets"). Channel pruning
    only narrows a plain VGG, so the result is rebuilt as the VGG of `spec` holding the kept weights:
    its size, FLOPs and accuracy are measured like any node's."""
    import torch_pruning as tp

    model = model.cpu().eval()
    s = model.spec
    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=torch.zeros(1, s.in_channels, s.input_size, s.input_size), verbose=False
    )
    # L1 norm of each conv's own filters (group_reduction 'first'), not mixed with the layers it feeds.
    importance = tp.importance.MagnitudeImportance(p=1, normalizer=None, group_reduction="first")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv, width in zip(convs, (w for b in spec.blocks for w in b)):
        if conv.out_channels <= width:
            continue
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
        weakest = importance(group).argsort()[: conv.out_channels - width].tolist()
        graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=weakest).prune()
    pruned = VGG(spec)
    pruned.load_state_dict(model.state_dict())  # strict: the pruned shapes are exactly the spec's
    return pruned.eval()


# -- the baselines ------------------------------------------------------------------------------------


@dataclass
class BaselineTrainer:
    """What every baseline of one compare shares: the run's data, its root as teacher, and the final
    node's KD settings (a space's kd: ranges may have searched them), else the run's."""

    cfg: SearchConfig
    data: DataSplits
    final: Node
    root_model: VGG
    teachers: list[VGG]
    steps: list[tuple[int, int]]  # the pruning row's (parameter target, epochs) per step
    progress: bool

    @property
    def kd_values(self) -> dict:
        cfg = self.cfg
        defaults = {"alpha": cfg.alpha, "temperature": cfg.temperature, "hint_weight": cfg.hint_weight}
        return {**defaults, "lr": cfg.lr, **self.final.loss}

    def settings(self, epochs: int, seed: int) -> TrainSettings:
        return kd_settings(self.cfg, epochs, seed, self.kd_values)

    def fit(self, method: str, seed: int, epochs: int) -> tuple[VGG, float, float, float]:
        """(model, val acc, test acc, seconds) of `method` trained with `seed`."""
        # The seed picks the initial weights and the batch order; the augmentation views are the run's,
        # as a child's, except in the paid-compute rows (METHODS).
        torch.manual_seed(seed)
        desc = f"{method} seed {seed}"
        kd = dict(teachers=self.teachers, hint_teacher=self.root_model, progress=self.progress)
        if method == "prune-kd":
            return self.prune_and_finetune(seed, epochs, desc, kd)
        if method not in METHODS:
            raise ValueError(f"unknown compare method {method!r}")
        settings = self.settings(epochs, seed)
        if method in LIVE_AUGMENTATION:
            # A fresh augmentation view every epoch, drawn from the seed: a long row never replays the
            # run's few views (the teacher runs live here, so a view costs nothing extra).
            settings = replace(settings, views=None, augment_seed=None)
        model = VGG(self.final.spec)
        start = time.perf_counter()
        if method == "inherit-kd-live":
            # The search's own operator, applied once from the root to the final architecture, then
            # the BN statistics re-estimated, as every child starts.
            inherit_weights(model, self.root_model)
            recalibrate_bn(model.to(self.data.train_x.device), self.data)
        init_seconds = time.perf_counter() - start
        teaching = {"progress": self.progress} if method == "scratch-ce" else kd
        out = train(model, self.data, settings, desc=desc, **teaching)
        return model, out.val_acc, out.test_acc, out.seconds + init_seconds

    def prune_and_finetune(self, seed: int, epochs: int, desc: str, kd: dict):
        """The root pruned step by step to each chain node's size, fine-tuned with KD from the root
        after every step for that node's epochs (the last step also gets the final node's polish)."""
        if epochs != sum(e for _, e in self.steps):
            raise ValueError(f"prune-kd follows the chain's {self.steps}, not {epochs} epochs")
        model, seconds, out = load_copy(self.root_model), 0.0, None
        for i, (target, step_epochs) in enumerate(self.steps):
            start = time.perf_counter()
            # Narrowed from the last step's widths, never the root's: a step only removes channels.
            model = prune_to(model, pruned_spec(model.spec, target))
            seconds += time.perf_counter() - start
            out = train(model, self.data, self.settings(step_epochs, seed), desc=f"{desc} step {i + 1}", **kd)
            seconds += out.seconds
        return model, out.val_acc, out.test_acc, seconds


def load_copy(model: VGG) -> VGG:
    """A fresh copy of `model` (the root stays intact as the teacher)."""
    copy = VGG(model.spec)
    copy.load_state_dict(model.state_dict())
    return copy


# The ways compare trains a model (SeedResult.method): from scratch on labels; KD from the root with
# the run's augmentation views; the same with a fresh view every epoch; that from the root's weights
# inherited by the search's operator; and (prune_and_finetune) the root pruned, with KD after each step.
METHODS = ("scratch-ce", "one-shot-kd", "one-shot-kd-live", "inherit-kd-live", "prune-kd")
LIVE_AUGMENTATION = ("one-shot-kd-live", "inherit-kd-live")


def baselines(epochs: int, chain: int, prune: bool, paid: int | None = None) -> list[Baseline]:
    """The baseline rows: one child's epochs (scratch and one-shot KD), the chain's (one-shot KD and,
    with Torch-Pruning installed, pruning + KD), then the epochs the search paid (one-shot KD from
    random weights and from the root's inherited weights)."""
    rows = [
        Baseline("scratch-ce", "scratch-ce", epochs, "scratch"),
        Baseline("one-shot-kd", "one-shot-kd", epochs, "kd"),
        Baseline(f"one-shot-kd, {CHAIN}", "one-shot-kd", chain, "kd-chain"),
    ]
    rows += [Baseline(f"prune-kd, {CHAIN}", "prune-kd", chain, "prune")] if prune else []
    if paid is not None:
        rows += [
            Baseline(f"one-shot-kd, {PAID}", "one-shot-kd-live", paid, "kd-paid"),
            Baseline(f"inherited one-shot-kd, {PAID}", "inherit-kd-live", paid, "inherit-paid"),
        ]
    return rows


# `iterkd compare --rows`: the baselines by key, in the table's order (every row: pruning and paid).
ROW_KEYS = tuple(b.key for b in baselines(1, 2, True, 3))


def parse_rows(text: str | None) -> tuple[str, ...]:
    """`--rows scratch,kd-paid` as keys (None or empty: every row); an unknown key is one line."""
    if not text:
        return ROW_KEYS
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in keys if k not in ROW_KEYS]
    if unknown or not keys:
        raise IterkdError(
            f"--rows: unknown row {', '.join(map(repr, unknown)) or repr(text)}; choose from {', '.join(ROW_KEYS)}"
        )
    return tuple(k for k in ROW_KEYS if k in keys)


# -- compare ------------------------------------------------------------------------------------------


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


def write_results(path: Path, run_name: str, results: list[SeedResult], summary: dict | None = None) -> None:
    """compare.json: every trained model (`results`, what a resumed compare reuses) and, once the
    table is made, its rows and verdicts (`summary`)."""
    content = {"run": run_name, "results": [asdict(r) for r in results], **(summary or {})}
    write_atomic(path, json.dumps(content, indent=2) + "\n")


def search_seed_run(run: Run, seed: int) -> SearchConfig:
    """The config of the run's search rerun with `seed`: a run of its own under RUN/compare/, trained
    in this process (no workers, no database elsewhere, no deployment figures, no int8: none changes a node).

    The rerun keeps the run's validation split (--split-seed) and starts from the run's own root (the
    checkpoints the run copied in), so searches differ in the search's randomness alone, as the
    baselines' seeds do, and a root trained outside that split never validates on its own training images."""
    name = f"{run.cfg.name}-seed-{seed}"
    root = run.root
    checkpoints = [m["checkpoint"] for m in root.members] if root.members else [root.checkpoint]
    return replace(
        run.cfg,
        name=name,
        run_dir=str(run.run_dir / "compare" / f"search-seed-{seed}"),
        seed=seed,
        split_seed=run.cfg.data_seed,
        teacher=tuple(str((run.run_dir / c).resolve()) for c in checkpoints),
        storage=None,
        workers=None,
        deploy_figures=False,
        final="fp32",
    )


def rerun_searches(
    run: Run, count: int, progress: bool, log: Callable[[str], None]
) -> tuple[list[Run], int, list[str]]:
    """The run plus `count - 1` reruns of its search with seeds seed+1, ...: each resumes where an
    interrupted compare left it, and a finished one is only read. Returns (runs with an accepted
    child, searches trained now, notes on the others)."""
    runs, trained, notes = [run], 0, []
    mine = final_node(run).spec
    for seed in range(run.cfg.seed + 1, run.cfg.seed + count):
        cfg = search_seed_run(run, seed)
        other = Path(cfg.run_dir)
        finished = (other / "study.db").is_file() and "final_node" in open_run(other).study.user_attrs
        if not finished:
            log(f"compare: search with seed {seed} in {other}")
            Search(cfg, progress=progress, log=log).run()
            trained += 1
        rerun = open_run(other)
        final = rerun.final_node()
        if final is None or final.generation == 0 or not final.ok:
            notes.append(f"the search with seed {seed} accepted no child, so it is not in the iterkd row")
            continue
        if final.spec != mine:
            notes.append(
                f"the search with seed {seed} ended at another architecture, {final.spec.summary()} "
                f"({final.spec.params():,} params, {final.spec.flops() / 1e6:.2f} MFLOPs; the run's: "
                f"{mine.params():,}, {mine.flops() / 1e6:.2f}): the iterkd row's accuracy mixes "
                "architectures, and its params and MFLOPs are the run's"
            )
        runs.append(rerun)
    return runs, trained, notes


def compare_run(
    run_dir: str | Path,
    *,
    seeds: int = 3,
    search_seeds: int = 1,
    epochs: int | None = None,
    preset: str | None = None,
    device: str | None = None,
    data_dir: str | None = None,
    storage: str | None = None,
    progress: bool = True,
    rows: str | None = None,
    log: Callable[[str], None] = print,
) -> Comparison:
    """Train every baseline for seeds 0..seeds-1 (skipping what RUN/compare.json already holds), rerun
    the search with `search_seeds - 1` other seeds, then write RUN/compare.md and return the table.
    `rows` ("scratch,kd-paid": ROW_KEYS) trains and shows those baselines only."""
    keys = parse_rows(rows)
    if seeds < 1:
        raise IterkdError(f"--seeds must be at least 1, got {seeds}")
    if search_seeds < 1:
        raise IterkdError(f"--search-seeds must be at least 1 (the run itself), got {search_seeds}")
    run = open_run(run_dir, storage=storage)
    cfg, root, final = run.cfg, run.root, final_node(run)
    n_epochs = compare_epochs(cfg.epochs, epochs, preset)
    path = chain_path(run, final)
    steps = prune_steps(path)
    n_chain, n_paid = chain_epochs(path), search_compute(run)[0]
    json_path, md_path = run.run_dir / "compare.json", run.run_dir / "compare.md"
    results = read_results(json_path)
    notes = []
    prune = "prune" in keys and have_torch_pruning()
    if "prune" in keys and not prune:
        log(f"compare: the prune-kd row needs Torch-Pruning; to add it: {PRUNE_INSTALL}")
        notes.append(f"prune-kd was not run: Torch-Pruning is not installed ({PRUNE_INSTALL})")
    unreachable = prune and unreachable_by_pruning(root.spec, steps)
    if unreachable:
        log(f"compare: {unreachable}")
        notes.append(f"prune-kd was not run: {unreachable}")
        prune = False
    plans = [b for b in baselines(n_epochs, n_chain, prune, n_paid) if b.key in keys]
    left_out = [k for k in ROW_KEYS if k not in keys]
    if left_out:
        notes.append(f"rows not run (--rows): {', '.join(left_out)}")
    # (method, seed, epochs) to train: rows that share them (one child's epochs = the chain's) share models.
    wanted = {(b.method, s, b.epochs) for b in plans for s in range(seeds)}
    done = {r.key[:3] for r in results if r.node == final.node}
    # Per seed, the headline verdict's rows (paid compute) first: a compare stopped early has them.
    order = [b.method for b in plans if b.method in LIVE_AUGMENTATION] + [b.method for b in plans]
    todo = sorted(wanted - done, key=lambda k: (k[1], order.index(k[0]), k[2]))
    if len(todo) < len(wanted):
        log(f"compare: reusing {len(wanted) - len(todo)} results from {json_path}")
    dev = resolve_device(device or cfg.device)
    data = replace(cfg, data_dir=data_dir or cfg.data_dir).load_data(dev if todo else None)
    per_epoch = images_per_epoch(len(data.train_x), cfg.batch_size)
    if todo:
        # Live, not the run's cache: the same targets up to fp16 rounding.
        root_model = run.model(root).to(dev)
        # An ensemble root teaches through all its members, as it did in the run.
        teachers = [load_model(run.run_dir / m["checkpoint"]).to(dev) for m in root.members] or [root_model]
        # Its frozen teachers teach beside it, as in the run (never the hint: they have no blocks).
        teachers += [frozen_teacher(run.run_dir, r, cfg, data.info, dev) for r in root.frozen]
        trainer = BaselineTrainer(cfg, data, final, root_model, teachers, steps, progress)
        for method, seed, n in todo:
            model, val, test, seconds = trainer.fit(method, seed, n)
            spec = model.spec
            results.append(
                SeedResult(
                    method,
                    seed,
                    n,
                    final.node,
                    spec.params(),
                    val,
                    test,
                    round(seconds, 2),
                    dev.type,
                    spec.flops(),
                    spec.to_json(),
                )
            )
            # After every model: an interrupted compare resumes here.
            write_results(json_path, cfg.name, results)
            log(f"{method} ({n} epochs) seed {seed}: val {val:.2f}%  test {test:.2f}%  {seconds:.0f}s")
    runs, searched, search_notes = rerun_searches(run, search_seeds, progress, log)
    notes += search_notes
    rows = table_rows(root, runs, plans, results, seeds, per_epoch, steps)
    # Paid compute equals the chain's when the search trained nothing off the chain: one verdict then.
    bases = [(PAID, n_paid)] + ([(CHAIN, n_chain)] if n_chain != n_paid else [])
    verdicts = {basis: verdict_text(rows, plans, n, per_epoch, basis) for basis, n in bases}
    if n_chain == n_paid:
        notes.append(
            "the search trained no child off the chain, so the compute it paid is the chain's: "
            "one verdict covers both"
        )
    comparison = Comparison(
        root, final, n_epochs, n_chain, n_paid, per_epoch, seeds, [r.cfg.seed for r in runs], rows,
        "\n\n".join(verdicts.values()), notes, len(todo) + searched, json_path, md_path,
    )  # fmt: skip
    summary = {
        "images_per_epoch": per_epoch,
        "train_flops_per_forward_flop": TRAIN_FLOPS_PER_FORWARD,
        "epochs": {"one child": n_epochs, CHAIN: n_chain, PAID: n_paid},
        "rows": [r.record() for r in rows],
        "verdicts": [{"basis": basis, "text": text} for basis, text in verdicts.items()],
    }
    write_results(json_path, cfg.name, results, summary)
    write_atomic(md_path, render_markdown(run, comparison))
    return comparison


def chain_row(runs: list[Run], per_epoch: int) -> Row:
    """The iterkd row: the final node of the run and of each search rerun (one model per search)."""
    finals = [final_node(r) for r in runs]
    paths = [chain_path(r, f) for r, f in zip(runs, finals)]
    paid = [search_compute(r) for r in runs]
    architectures = len({f.spec for f in finals})
    parts = [f"node {finals[0].node}"]
    if len(runs) > 1:
        parts.append(f"{len(runs)} searches")
    if architectures > 1:
        parts.append(f"{architectures} architectures")
    return Row(
        f"iterkd ({', '.join(parts)})",
        finals[0].spec.params(),
        finals[0].spec.flops(),
        [chain_epochs(p) for p in paths],
        [f.val_acc for f in finals],
        [f.test_acc for f in finals],
        [sum(n.seconds or 0.0 for n in p[1:]) for p in paths],
        [node_flops(p[1:], per_epoch) for p in paths],
        [e for e, _ in paid],
        [node_flops(paid_nodes(r), per_epoch) for r in runs],
        [s for _, s in paid],
    )


def table_rows(
    root: Node,
    runs: list[Run],
    plans: list[Baseline],
    results: list[SeedResult],
    seeds: int,
    per_epoch: int,
    steps: list[tuple[int, int]],
) -> list[Row]:
    """Root (context, n=1), each baseline over seeds 0..seeds-1, and the iterkd row; every row's
    test accuracy against the iterkd row's. `steps`: the prune-kd row's (see prune_steps)."""
    final = final_node(runs[0])
    chain = chain_row(runs, per_epoch)
    # A root made from frozen teachers stands for the best of them (its accuracy is theirs).
    best = max(root.frozen, key=lambda r: r["val_acc"]) if root.vgg_val_acc is not None else None
    rows = [
        Row(
            f"root (node {root.node})"
            if best is None
            else f"root: frozen {best['source']} (node {root.node})",
            root.spec.params() if best is None else best["params"],
            root.spec.flops() if best is None else None,
            [trained_epochs(root)],
            [root.val_acc],
            [root.test_acc],
            [root.seconds] if root.seconds else [],
        )
    ]
    for b in plans:
        mine = sorted(
            (
                r
                for r in results
                if (r.method, r.epochs, r.node) == (b.method, b.epochs, final.node) and r.seed < seeds
            ),
            key=lambda r: r.seed,
        )
        spec = VGGSpec.from_json(mine[0].spec) if mine and mine[0].spec else final.spec
        trained = pruned_specs(root.spec, steps) if b.method == "prune-kd" else [(final.spec, b.epochs)]
        rows.append(
            Row(
                b.label,
                spec.params(),
                spec.flops(),
                [r.epochs for r in mine],
                [r.val_acc for r in mine],
                [r.test_acc for r in mine],
                [r.seconds for r in mine],
                [training_flops(trained, per_epoch) for _ in mine],
            )
        )
    rows.append(chain)
    return [replace(r, delta=delta_cell(r.test, chain.test)) if r is not chain else r for r in rows]


def verdict_text(
    rows: list[Row], plans: list[Baseline], epochs: int, per_epoch: int, basis: str = PAID
) -> str:
    """Which method won at `basis` (`epochs` per model after the root), in one paragraph: the best
    test mean among iterkd and the baselines trained for `epochs`, and whether its lead over each
    other exceeds twice the lead's standard error."""
    equal = {b.label for b in plans if b.epochs == epochs}
    if not equal:
        return f"**No verdict at {basis}** ({_epochs(epochs)}): no baseline of that compute was run (--rows)."
    contenders = [r for r in rows[1:] if r.test and (r.method in equal or r is rows[-1])]
    best = max(contenders, key=lambda r: statistics.fmean(r.test))
    what = (
        "every child epoch the search trained, rejected and pruned children and the polish included"
        if basis == PAID
        else "the epochs of the chain from the root to the final node"
    )
    head = (
        f"**Verdict at {basis}** ({_epochs(epochs)}: {what}; {epochs * per_epoch:,} training images per "
        f"model after the root): **`{best.method}` won** with {statistics.fmean(best.test):.2f} % test accuracy"
    )
    clear, unclear = [], []
    for r in contenders:
        if r is best:
            continue
        diff, se = difference(best.test, r.test)
        text = f"{diff:.2f} ± {'–' if se is None else f'{se:.2f}'} points above `{r.method}`"
        (clear if se is not None and diff > 2 * se else unclear).append(text)
    parts = []
    if clear:
        parts.append(f"{', '.join(clear)} (more than twice the uncertainty: a real difference)")
    if unclear:
        parts.append(
            f"{', '.join(unclear)} (within twice the uncertainty, or none measured: not a clear win; "
            "more --seeds and --search-seeds narrow it)"
        )
    return head + (": " + "; ".join(parts) if parts else "") + "."


def render_markdown(run: Run, c: Comparison) -> str:
    root, final, cfg = c.root, c.final, run.cfg
    path = " → ".join(str(n.node) for n in chain_path(run, final))
    seeds = "seed 0" if c.seeds == 1 else f"seeds 0–{c.seeds - 1}"
    chain = c.rows[-1]
    lines = [
        f"# Did the iterative search pay off? Run `{cfg.name}`",
        "",
        f"The final model, node {final.node} (`{final.spec.summary()}`, {final.spec.params():,} params, "
        f"{root.spec.params() / final.spec.params():.1f}x smaller than the root), against the same data and "
        f"teacher without the search, each baseline over {seeds}:",
        "",
        markdown_table(HEADERS, [r.cells(c.images_per_epoch) for r in c.rows]),
        "",
        c.verdict,
        "",
    ]
    # Against a child's epochs, the run's: a polished final node trained --final-epochs on top.
    if c.epochs != cfg.epochs:
        lines += [
            f"**Not like for like**: the equal-epochs baselines trained {_epochs(c.epochs)}, the run's "
            f"children {_epochs(cfg.epochs)} each (`--epochs` or `--preset` differ from the run's).",
            "",
        ]
    loss = ", ".join(f"{k} {v:g}" for k, v in sorted(final.loss.items())) or "the run defaults"
    searches = ("seed " if len(c.search_seeds) == 1 else "seeds ") + ", ".join(map(str, c.search_seeds))
    lines += [
        "- **scratch-ce**: the final architecture on labels only (cross-entropy), one child's epochs — "
        "Mirzadeh et al. 2020's NOKD.",
        f"- **one-shot-kd**: the final architecture with KD + {cfg.hint} hint from the root alone and the final "
        f"node's loss settings ({loss}), one child's epochs — BLKD.",
        f"- **one-shot-kd, chain compute**: the same for the {_epochs(c.chain_epochs)} the chain trained "
        f"after the root ({path}).",
        "- **prune-kd, chain compute**: the root's channels cut with Torch-Pruning's dependency graph (L1 "
        f"filter norm) in {len(prune_steps(chain_path(run, final)))} steps, one per size change of the chain, "
        "each to that chain node's parameter count and fine-tuned with the same KD from the root for that "
        "node's epochs; a pruned VGG keeps every conv, narrower, so its FLOPs differ from the final node's.",
        f"- **one-shot-kd, paid compute**: the same KD from the root for the {_epochs(c.paid_epochs)} the "
        "search paid (every child it trained, rejected and pruned ones and the polish included), with a "
        "fresh augmentation view every epoch instead of the run's "
        f"{cfg.views} (the teacher runs live), so the long schedule does not replay a few views.",
        "- **inherited one-shot-kd, paid compute**: the same, starting from the root's weights passed to "
        "the final architecture in one step by the search's own inheritance operator (BN statistics "
        "re-estimated, as every child starts): iterating against starting from inherited weights.",
        "- No row is tuned: every one uses the search's KD, hint, learning-rate and batch settings.",
        f"- **iterkd**: the final node of the search with {searches} (one model per search, selected on "
        "validation: compare test accuracy); `epochs` and `s / model` are its chain's after the root, "
        "`paid` is every node the search trained after the root, rejected ones included."
        + (
            " A rerun keeps the run's root and validation split and changes only the search's randomness"
            " (children's initial weights, augmentation, sampler); the test set is the same."
            if len(c.search_seeds) > 1
            else ""
        ),
        "- Δ test is the row's mean test accuracy minus iterkd's ± the standard error of that difference "
        "(Welch: sqrt(s²/n + s²/n) of the sides with n > 1)."
        + (" †: iterkd is one search, so its own spread is not in it (add --search-seeds)." if len(chain.test) == 1 else ""),
        "- Compute leaves out the root's training: every row starts from the same root. Images seen = epochs × "
        f"{c.images_per_epoch:,} (full batches of {cfg.batch_size}). Training FLOPs = "
        f"{TRAIN_FLOPS_PER_FORWARD} × the student's forward FLOPs × images seen, summed over what was trained "
        "(each pruning step at its own size; every node for iterkd's paid column); teachers' passes are not "
        "counted. Seconds are wall time of training.",
        "- std is the sample standard deviation (ddof = 1); raw results in `compare.json`.",
    ]  # fmt: skip
    lines += [f"- {note}" for note in c.notes] + [""]
    return "\n".join(lines)


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def text_table(rows: list[Row], images_per_epoch: int) -> str:
    """The rows as aligned plain text for the terminal."""
    cells = [HEADERS] + [r.cells(images_per_epoch) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADERS))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    )
