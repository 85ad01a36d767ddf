"""The one typed configuration of a search: defaults, presets, validation, and the run's saved copy.

Flow: preset values, then explicit flags, then validation; a resumed run reads its saved copy
and refuses explicit flags that would change what was already trained."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .device import COMPILE_MODES
from .errors import IterkdError

VARIANTS = ("parent-child", "parent-children", "ancestors-child", "ancestors-children")
SELECT_RULES = ("best-acc", "smallest-within-budget")
TEACHER_WEIGHTS = ("mean", "accuracy")
SAMPLERS = ("greedy", "tpe", "random", "nsga2")
PRUNERS = ("none", "median", "hyperband")
OBJECTIVES = ("acc", "acc,params")


@dataclass(frozen=True)
class SearchConfig:
    name: str = "run"
    run_dir: str = ""  # default: runs/<name>
    space: str = "vgg16_blocks"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = True
    variant: str = "parent-child"
    max_drop: float = 1.0  # accuracy points (validation) a child may lose vs the root
    max_generations: int = 10
    children: int = 1  # candidates per parent and generation (the *-children variants)
    beam: int = 1  # accepted nodes kept per generation
    select: str = "best-acc"
    teacher_weights: str = "mean"
    sampler: str = "greedy"  # greedy: the space's preferred order (closest to halving first); else Optuna chooses
    pruner: str = "none"
    objectives: str = "acc"  # or "acc,params": multi-objective study, Pareto front = study.best_trials
    teacher: tuple[str, ...] | None = None  # checkpoint(s) of a trained root; several: an ensemble root
    storage: str | None = None  # default: sqlite:///<run_dir>/study.db
    seed: int = 0
    device: str = "auto"
    preset: str = "quick"
    width: float | None = None  # multiplier of the space's root widths
    epochs: int = 5  # per child
    root_epochs: int = 5
    batch_size: int = 128
    lr: float = 0.05
    weight_decay: float = 5e-4
    alpha: float = 0.9
    temperature: float = 4.0
    hint_weight: float | None = None  # default: losses.DEFAULT_HINT_WEIGHT[hint]
    hint: str = "fitnet"  # fitnet | sp | none
    init: str = "inherit"  # children start from their parent's weights (inherit) or from a random draw (scratch)
    train_subset: int | None = None
    val_size: int = 5000
    test_subset: int | None = None
    # Speed (docs/performance.md). Children cycle through `views` augmentation views per sample
    # (epoch e uses e mod views, drawn from the run's seed), so a teacher's logits can be computed
    # once per view and shared by every student it teaches; off runs the teachers live on the same inputs.
    teacher_cache: bool = True
    views: int = 4
    compile: str = "auto"  # torch.compile: auto | off | default | reduce-overhead
    # None: this process trains every node. N >= 0: it only coordinates (queues each generation's
    # candidates in the study) and starts N local `iterkd worker` processes; 0 = workers from elsewhere.
    workers: int | None = None
    deploy_figures: bool = True  # per node: CPU latency, throughput, ONNX size (seconds per node: an ONNX export)

    def __post_init__(self):
        if not self.run_dir:
            object.__setattr__(self, "run_dir", str(Path("runs") / self.name))
        if isinstance(self.teacher, str):
            object.__setattr__(self, "teacher", (self.teacher,))
        elif self.teacher is not None:
            object.__setattr__(self, "teacher", tuple(self.teacher) or None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def loss_weights(self):
        """The run's loss weights (children's KD settings may then be sampled around them)."""
        from .losses import LossWeights

        return LossWeights(self.alpha, self.temperature, self.hint_weight, self.hint)

    def load_data(self, device=None):
        """The dataset this config names, split and subsampled as it says; on `device` when given."""
        from .data import load_data

        data = load_data(self.dataset, self.data_dir, val_size=self.val_size, train_subset=self.train_subset,
                         test_subset=self.test_subset, seed=self.seed, download=self.download)
        return data if device is None else data.to(device)

    @classmethod
    def from_json(cls, text: str) -> "SearchConfig":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# Each preset is a set of defaults; explicit flags win over it.
PRESETS: dict[str, dict] = {
    # Seconds, for tests: the three-block toy space on synthetic patterns.
    "smoke": dict(dataset="synthetic", space="tiny", width=1 / 16, epochs=4, root_epochs=3, batch_size=64,
                  val_size=400, max_generations=2, lr=0.05, deploy_figures=False),
    # A CPU demo (< 10 min on 2 cores): 1/8-width root, 20k training images, 5 epochs for the root and
    # 8 per child (chosen when children started from scratch: at 5 the second generation lost 1.12 pts),
    # two generations (docs/results.md has the timings).
    "quick": dict(width=1 / 8, epochs=8, root_epochs=5, batch_size=128, train_subset=20000, val_size=5000,
                  max_generations=2, lr=0.05),
    # Paper scale, for a GPU: full-width root and the whole training set.
    "full": dict(width=1.0, epochs=30, root_epochs=30, batch_size=512, lr=0.2, val_size=5000,
                 max_generations=20),
}

# Settings that may differ when a run is resumed: they do not change what a node is.
RESUMABLE_OVERRIDES = {"device", "data_dir", "download", "max_generations", "storage", "teacher_cache", "compile",
                       "deploy_figures", "workers"}


def build_config(preset: str, overrides: dict) -> SearchConfig:
    """Preset values, then the explicit (non-None) overrides, then validation."""
    if preset not in PRESETS:
        raise IterkdError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], "preset": preset}
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(SearchConfig)}
    unknown = set(values) - known
    if unknown:
        raise IterkdError(f"unknown settings: {', '.join(sorted(unknown))}")
    return validate(SearchConfig(**values))


def validate(cfg: SearchConfig) -> SearchConfig:
    def need(ok: bool, msg: str):
        if not ok:
            raise IterkdError(msg)

    need(isinstance(cfg.max_drop, (int, float)) and math.isfinite(cfg.max_drop) and cfg.max_drop > 0,
         f"--max-drop must be a positive number of accuracy points (e.g. 1.0), got {cfg.max_drop}")
    need(cfg.variant in VARIANTS, f"unknown variant {cfg.variant!r}; choose one of {', '.join(VARIANTS)}")
    need(cfg.select in SELECT_RULES, f"unknown --select {cfg.select!r}; choose one of {', '.join(SELECT_RULES)}")
    need(cfg.teacher_weights in TEACHER_WEIGHTS,
         f"unknown --teacher-weights {cfg.teacher_weights!r}; choose one of {', '.join(TEACHER_WEIGHTS)}")
    need(cfg.sampler in SAMPLERS, f"unknown --sampler {cfg.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    need(cfg.pruner in PRUNERS, f"unknown --pruner {cfg.pruner!r}; choose one of {', '.join(PRUNERS)}")
    need(cfg.objectives in OBJECTIVES, f"unknown --objectives {cfg.objectives!r}; choose one of {', '.join(OBJECTIVES)}")
    need(cfg.objectives == "acc" or cfg.pruner == "none",
         "--pruner needs a single objective: Optuna cannot prune multi-objective trials; "
         "use --objectives acc or --pruner none")
    need(cfg.children >= 1, f"--children must be at least 1, got {cfg.children}")
    need(cfg.beam >= 1, f"--beam must be at least 1, got {cfg.beam}")
    need(cfg.max_generations >= 1, f"--max-generations must be at least 1, got {cfg.max_generations}")
    need(cfg.epochs >= 1 and cfg.root_epochs >= 1, "--epochs and --root-epochs must be at least 1")
    need(cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}")
    need(cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be a positive number, got {cfg.lr}")
    need(cfg.width is None or (math.isfinite(cfg.width) and cfg.width > 0), f"--width must be > 0, got {cfg.width}")
    need(cfg.val_size >= 1, f"--val-size must be at least 1, got {cfg.val_size}")
    need(cfg.train_subset is None or cfg.train_subset >= 1, "--train-subset must be at least 1")
    need(cfg.views >= 1, f"--views must be at least 1, got {cfg.views}")
    need(cfg.compile in COMPILE_MODES, f"--compile must be one of {', '.join(COMPILE_MODES)}, got {cfg.compile!r}")
    need(cfg.workers is None or cfg.workers >= 0, f"--workers must be 0 or more, got {cfg.workers}")
    need(cfg.workers is None or cfg.sampler == "greedy",
         f"--workers needs --sampler greedy (the coordinator fixes each queued candidate's move in the space's "
         f"order); --sampler {cfg.sampler} chooses moves inside the trial and runs in one process only")
    need(cfg.name and "/" not in cfg.name, f"--name must be a plain name without '/', got {cfg.name!r}")
    if cfg.variant.endswith("-child") and cfg.children != 1:
        raise IterkdError(f"--children {cfg.children} needs a *-children variant (parent-children or "
                          f"ancestors-children); {cfg.variant} trains one child per generation")
    from .inherit import INIT_MODES
    need(cfg.init in INIT_MODES, f"unknown --init {cfg.init!r}; choose one of {', '.join(INIT_MODES)}")
    # Loss weights are checked by the LossWeights type itself.
    from .losses import DEFAULT_HINT_WEIGHT, HINTS, LossWeights
    need(cfg.hint in HINTS, f"unknown --hint {cfg.hint!r}; choose one of {', '.join(HINTS)}")
    if cfg.hint_weight is None:
        cfg = replace(cfg, hint_weight=DEFAULT_HINT_WEIGHT[cfg.hint])
    LossWeights(cfg.alpha, cfg.temperature, cfg.hint_weight, cfg.hint)
    return cfg


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "config.json"


def resume_config(saved: SearchConfig, explicit: dict) -> SearchConfig:
    """The saved config of a run with the explicitly given flags applied; a flag that would change
    what a node is (space, dataset, epochs, ...) is an error naming the conflict."""
    conflicts = [f"--{k.replace('_', '-')} {v} (run has {getattr(saved, k)})"
                 for k, v in explicit.items()
                 if v is not None and k not in RESUMABLE_OVERRIDES and k not in ("name", "run_dir", "preset")
                 and v != getattr(saved, k)]
    if explicit.get("preset") not in (None, saved.preset):
        conflicts.append(f"--preset {explicit['preset']} (run has {saved.preset})")
    if conflicts:
        raise IterkdError(f"run {saved.run_dir} was started with other settings: {'; '.join(conflicts)}. "
                          "Drop those flags to resume it, or start a new run with --name")
    if saved.storage and "***" in saved.storage and not explicit.get("storage"):
        raise IterkdError(f"run {saved.run_dir} uses storage {saved.storage}; passwords are never saved, "
                          "so pass --storage with the full URL again to resume it")
    allowed = {k: v for k, v in explicit.items() if v is not None and k in RESUMABLE_OVERRIDES}
    return validate(replace(saved, **allowed))


def search_command(cfg: SearchConfig) -> str:
    """The `iterkd search` command line that reproduces a run: its preset plus every setting that
    differs from it. Machine-specific settings (storage, device, data dir) are left out."""
    import shlex

    base = build_config(cfg.preset, {"name": cfg.name})
    always = ("space", "dataset", "variant", "max_drop")
    skip = {"name", "preset", "run_dir", "storage", "device", "data_dir", "download", "deploy_figures", "workers"}
    args = ["iterkd", "search", "--name", cfg.name, "--preset", cfg.preset]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value is not None and (f.name in always or (f.name not in skip and value != getattr(base, f.name))):
            for v in value if isinstance(value, tuple) else (value,):  # --teacher A --teacher B
                args += [f"--{f.name.replace('_', '-')}", str(v)]  # str(float) is its repr: exact on re-parse
    return shlex.join(args)
