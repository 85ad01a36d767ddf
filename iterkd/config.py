"""The one typed configuration of a search: each setting's default, help, flag and valid range,
the presets, validation, and the run's saved copy.

A setting is defined once, as a `SearchConfig` field: the `iterkd search` / `iterkd resume` flags,
the settings a resume may change and the range checks are all derived from the fields' metadata.
Flow: preset values, then explicit flags, then validation; a resumed run reads its saved copy
and refuses explicit flags that would change what was already trained."""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import Field, asdict, dataclass, field, fields, replace
from pathlib import Path

from .arch import TORCHVISION_VGGS
from .choices import NEEDS_ONE_OBJECTIVE, PRUNERS, SAMPLERS
from .data.info import DATASET_NAMES
from .device import COMPILE_MODES, PRECISIONS
from .errors import IterkdError
from .inherit import INIT_MODES
from .losses import DEFAULT_HINT_WEIGHT, HINTS, LossWeights
from .sizes import SIZES
from .variants import VARIANTS

# Names with no registry of their own, each defined here once and used in help and errors.
SELECT_RULES = ("best-acc", "smallest-within-budget")
TEACHER_WEIGHTS = ("mean", "accuracy")
OBJECTIVES = ("acc", "acc,params")
ROOT_SOURCES = ("packaged", "train")
FINAL_FORMS = ("fp32", "int8")

# Each preset is a set of defaults; explicit flags win over it. A table: one preset per row.
# fmt: off
PRESETS: dict[str, dict] = {
    # Seconds, for tests: the three-block toy space on synthetic patterns.
    "smoke": dict(dataset="synthetic", space="tiny", width=1 / 16, epochs=4, root_epochs=3, batch_size=64,
                  max_generations=2, lr=0.05, deploy_figures=False),
    # A CPU demo (< 10 min on 2 cores, the README job): the converged 1/8-width root shipped with
    # iterkd (a 5-epoch one is trained where it does not fit), 20k training images and 8 epochs per
    # child; the step grows to 3/4 of the parent while children stay far inside the budget, and is
    # at least 1/5, so an overshoot is followed by one smaller step, not a tail of tiny ones. No
    # generation cap binds: each generation drops at least one of the 13 convolutions. The final
    # model is polished for 8 epochs, as long as a child trains: it doubles the final model's KD at
    # the cost of one small child, since the root's logits are already cached.
    "quick": dict(width=1 / 8, epochs=8, root_epochs=5, batch_size=128, train_subset=20000,
                  max_generations=20, min_step=0.2, max_step=0.75, lr=0.05, root="packaged", final_epochs=8),
    # Paper scale, for a GPU: full-width root and the whole training set; a polish as long as a child.
    "full": dict(width=1.0, epochs=30, root_epochs=30, batch_size=512, lr=0.2, max_generations=20,
                 final_epochs=30),
}
# fmt: on


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting: low..high, both included unless `above` (value > low)."""

    low: float
    high: float | None = None
    above: bool = False

    def admits(self, value, integer: bool) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            return False
        if not math.isfinite(value):  # nan fails every comparison below, but inf would pass "> 0"
            return False
        return (value > self.low if self.above else value >= self.low) and (
            self.high is None or value <= self.high
        )

    def describe(self, integer: bool) -> str:
        if integer:
            return f"at least {self.low}" if self.high is None else f"between {self.low} and {self.high}"
        if self.high is None:
            if self.above and self.low == 0:
                return "a finite positive number"
            return f"a finite number {'>' if self.above else '>='} {self.low:g}"
        return f"a number in {'(' if self.above else '['}{self.low:g}, {self.high:g}]"


AT_LEAST_1 = Range(1)
POSITIVE = Range(0, above=True)
NOT_NEGATIVE = Range(0)


def setting(
    default,
    help: str,
    group: str,
    *,
    flag: str | None = None,
    metavar: str | None = None,
    choices=None,
    range: Range | None = None,
    resumable: bool = False,
    machine: bool = False,
    default_text: str | None = None,
):
    """A SearchConfig field with what the CLI and validation need to know about it.

    help: what the setting means (the CLI adds its default or preset values, and its choices);
    group: the --help section (search, run, training, speed); flag: when it is not --the-name;
    choices: the valid names (a registry's keys); range: valid numbers; resumable: a resumed run
    may change it (it does not change what a node is); machine: it describes this machine, not the
    run, so the reproduce command leaves it out; default_text: the default in words, where the
    value alone (None) does not say it."""
    meta = dict(
        help=help,
        group=group,
        flag=flag,
        metavar=metavar,
        choices=choices,
        range=range,
        resumable=resumable,
        machine=machine,
        default_text=default_text,
    )
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


@dataclass(frozen=True)
class SearchConfig:
    name: str = setting("run", "run name; the run directory is runs/NAME", "run")
    run_dir: str = setting(
        "", "run directory; running again on it resumes", "run", metavar="DIR", default_text="runs/NAME"
    )
    space: str = setting(
        "vgg16_blocks",
        "search space name or YAML path (`iterkd spaces` lists them; docs/spaces.md)",
        "search",
        metavar="NAME|FILE",
    )
    dataset: str = setting(
        "fashion-mnist",
        "dataset: a named one, imagefolder (--data-dir DIR holding train/<class>/ images, "
        "optionally val/ and test/; docs/usage.md#your-own-images), or store (--data-dir KEY: a "
        "store iterkd.compress wrote from Python datasets; iterkd data list)",
        "search",
        choices=DATASET_NAMES,
    )
    data_dir: str | None = setting(
        None,
        "where datasets live (Debian's /usr/share/datasets copies of "
        "fashion-mnist and mnist are used when present); with imagefolder, the image folder",
        "run",
        metavar="DIR",
        resumable=True,
        machine=True,
        default_text="$ITERKD_DATA or ~/.cache/iterkd/data",
    )
    download: bool = setting(
        True,
        "never try to download missing dataset files",
        "run",
        flag="--no-download",
        resumable=True,
        machine=True,
    )
    variant: str = setting(
        "parent-child", "how the lineage grows (docs/variants.md)", "search", choices=VARIANTS
    )
    # Accuracy points: a drop above 100 could never bind.
    max_drop: float = setting(
        1.0,
        "accuracy points (validation) a child may lose vs the root",
        "search",
        metavar="PTS",
        range=Range(0, 100, above=True),
    )
    max_generations: int = setting(
        10, "stop after this many generations", "search", range=AT_LEAST_1, resumable=True
    )
    # The step controller (docs/variants.md): a step is the fraction of its parent's size (--shrink)
    # a child removes; it starts at the space's step, halves after an over-budget generation and
    # grows by half after one far inside the budget.
    # Not resumable: it changes which children a step proposes. Runs saved before it existed: params.
    shrink: str = setting(
        "params",
        "what a step's size and the headline 'x smaller' measure: parameters, FLOPs per image, or "
        "batch-1 CPU latency (measured once per architecture and kept in the study; docs/usage.md)",
        "search",
        choices=SIZES,
    )
    min_step: float = setting(
        0.05,
        "smallest step: a child must remove at least this fraction of its parent's "
        "size (--shrink); the search ends when no step this large stays within --max-drop",
        "search",
        metavar="FRACTION",
        range=Range(0, 1, above=True),
    )
    max_step: float | None = setting(
        None,
        "largest step the controller grows to while children stay far inside "
        "the budget (a fraction of the parent's size, --shrink)",
        "search",
        metavar="FRACTION",
        range=Range(0, 1, above=True),
        default_text="the step the space starts with",
    )
    # Checked between generations, so a generation under way always finishes (its nodes are kept).
    time_budget: float | None = setting(
        None,
        "start no new generation after this many seconds of wall-clock in this invocation (0: no limit)",
        "search",
        metavar="SECONDS",
        range=NOT_NEGATIVE,
        resumable=True,
        default_text="no limit",
    )
    children: int = setting(
        1, "candidates per parent and generation (*-children variants)", "search", range=AT_LEAST_1
    )
    beam: int = setting(
        1, "accepted nodes kept per generation; more than 1 grows a tree", "search", range=AT_LEAST_1
    )
    select: str = setting(
        "best-acc",
        "which children are accepted: the most accurate, or the smallest (--shrink measure) within --max-drop",
        "search",
        choices=SELECT_RULES,
    )
    teacher_weights: str = setting(
        "mean",
        "ancestors variants: how the teachers' probabilities are averaged",
        "search",
        choices=TEACHER_WEIGHTS,
    )
    sampler: str = setting(
        "greedy",
        "how a child's move is chosen: greedy takes the space's order (closest "
        "to halving first), the others let Optuna choose it and the space's KD ranges",
        "search",
        choices=SAMPLERS,
    )
    pruner: str = setting(
        "none",
        "stop children early: median and hyperband prune weak ones against their siblings (status "
        "'pruned'); budget prunes those clearly over --max-drop and stops converged ones, keeping "
        "them (docs/variants.md#pruning)",
        "search",
        choices=PRUNERS,
    )
    objectives: str = setting(
        "acc",
        "what the study optimises; acc,params makes it multi-objective (Pareto front; no pruner)",
        "search",
        metavar="LIST",
        choices=OBJECTIVES,
    )
    teacher: tuple[str, ...] | None = setting(
        None,
        "the trained root: an iterkd checkpoint, or the state dict of a torchvision or CIFAR-style "
        "VGG (.pth/.pt or .safetensors; docs/usage.md); repeat it to make an ensemble of models the "
        "root (docs/losses.md). Any other model, as a torch.export program (.pt2) or a TorchScript "
        "archive, is a frozen teacher: it teaches beside the root and is never shrunk",
        "search",
        metavar="PATH",
        default_text="train the root",
    )
    teacher_arch: str | None = setting(
        None,
        "the torchvision VGG an imported --teacher state dict is (vgg11 ... vgg19_bn), when its keys "
        "leave the block structure ambiguous; default: read from the keys",
        "search",
        metavar="NAME",
        choices=TORCHVISION_VGGS,
        default_text="from the keys",
    )
    # The quick preset's root is a converged one shipped with iterkd (iterkd/roots.py): training one
    # inside the README job's ten minutes would leave no time for the search.
    root: str = setting(
        "train",
        "where the root comes from without --teacher: packaged: the root shipped with iterkd for this "
        "dataset, root architecture and validation split (--seed, --val-size) when there is one, else "
        "trained; train: trained on labels for --root-epochs",
        "search",
        choices=ROOT_SOURCES,
    )
    storage: str | None = setting(
        None,
        "Optuna storage URL (PostgreSQL for several machines); a password is never written to disk",
        "run",
        metavar="URL",
        resumable=True,
        machine=True,
        default_text="sqlite:///RUN_DIR/study.db",
    )
    # Optuna's samplers seed numpy, which takes seeds below 2**32, and candidate seeds are taken mod 2**31.
    seed: int = setting(
        0,
        "seeds the validation split (unless --split-seed), every model's init, augmentation and the sampler",
        "run",
        range=Range(0, 2**31 - 1),
    )
    # A search rerun with another --seed keeps its validation split this way: a root trained
    # outside one split would see the validation images of another (iterkd compare --search-seeds).
    split_seed: int | None = setting(
        None,
        "seeds the validation split alone, so runs with different --seed share one split (and a "
        "root trained outside it)",
        "run",
        range=Range(0, 2**31 - 1),
        default_text="--seed",
    )
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", "run", resumable=True, machine=True)
    preset: str = setting(
        "quick",
        "defaults for the training settings",
        "run",
        choices=PRESETS,
        default_text="quick on CPU, full on CUDA",
    )
    width: float | None = setting(
        None,
        "multiplier of the space's root widths, e.g. 0.125 or 1/8",
        "training",
        range=POSITIVE,
        default_text="1",
    )
    epochs: int = setting(5, "epochs per child", "training", range=AT_LEAST_1)
    root_epochs: int = setting(5, "epochs for the root", "training", range=AT_LEAST_1)
    # The polish (docs/usage.md#the-final-polish): the final model trained on, from its own weights,
    # with KD from the root (ancestors variants: all its ancestors). Resumable: a finished run resumed
    # with another value polishes again; the nodes of the search are unchanged. 0 by default so that a
    # run saved before the polish existed resumes as it was.
    final_epochs: int = setting(
        0,
        "epochs of KD that polish the last accepted node after the search stops (0: no polish); "
        "the better of the two on validation is the final model",
        "training",
        range=NOT_NEGATIVE,
        resumable=True,
    )
    # The last step after the polish (docs/usage.md#ending-in-int8). Resumable: it changes no node.
    final: str = setting(
        "fp32",
        "the final model's form: int8 ends the search by exporting it with post-training int8 "
        "quantisation (RUN/export/node-N, verified against --max-drop like iterkd export --int8)",
        "training",
        choices=FINAL_FORMS,
        resumable=True,
    )
    batch_size: int = setting(128, "images per training step", "training", range=AT_LEAST_1)
    lr: float = setting(0.05, "peak learning rate (one-cycle schedule)", "training", range=POSITIVE)
    weight_decay: float = setting(5e-4, "SGD weight decay", "training", range=NOT_NEGATIVE)
    alpha: float = setting(0.9, "weight of KD vs CE (0: labels only)", "training", range=Range(0, 1))
    temperature: float = setting(4.0, "KD temperature", "training", range=POSITIVE)
    hint_weight: float | None = setting(
        None,
        "weight of the hint term; 0 disables it",
        "training",
        range=NOT_NEGATIVE,
        default_text=", ".join(f"{w:g} for {h}" for h, w in DEFAULT_HINT_WEIGHT.items()),
    )
    hint: str = setting(
        "fitnet", "hint term on block activations (docs/losses.md)", "training", choices=HINTS
    )
    init: str = setting(
        "inherit",
        "where a child starts: its parent's weights, the most important filters "
        "kept (inherit), or a random draw (scratch) (docs/losses.md)",
        "training",
        choices=INIT_MODES,
    )
    train_subset: int | None = setting(
        None, "train on the first N training images", "training", range=AT_LEAST_1, default_text="all"
    )
    val_size: float | None = setting(
        None,
        "images split off the training set for validation: a count, or a share below 1 (a folder's "
        "val/ is used instead when it has one)",
        "training",
        range=POSITIVE,
        default_text="5000 (synthetic 400); a folder: 10% of train/, at most 5000",
    )
    image_size: int | None = setting(
        None,
        "imagefolder: resize every image to N x N (shorter side to N, then the centre square)",
        "training",
        range=Range(8, 512),
        default_text="their size when all share one, else the most common shorter side",
    )
    channels: int | None = setting(
        None,
        "imagefolder: 1 (grey) or 3 (RGB)",
        "training",
        range=Range(1, 3),
        default_text="1 when every image has one band, else 3",
    )
    flip: str | None = setting(
        None,
        "random horizontal flips in augmentation (off for text, digits, anything a mirror changes)",
        "training",
        choices=("on", "off"),
        default_text="the dataset's: on for folders, fashion-mnist and CIFAR; off for digits",
    )
    # How the inputs are normalised: the data's own statistics unless the root was trained otherwise
    # (an imported torchvision VGG usually saw ImageNet's). Stored with the run, so the root, every
    # student, the teacher cache and the export all see the same inputs.
    normalize: str = setting(
        "dataset",
        "input normalisation of the root and the students: dataset (the data's mean and std), imagenet, "
        "or M1,M2,M3/S1,S2,S3 (one mean and std per channel)",
        "training",
        metavar="HOW",
    )
    # A frozen teacher (an exported program, a TorchScript archive) may have been trained on other
    # statistics than the VGG root; its inputs are mapped to them on the way in (importers.frozen).
    teacher_normalize: str | None = setting(
        None,
        "input normalisation of frozen --teacher programs (.pt2, TorchScript): dataset, imagenet or "
        "M1,M2,M3/S1,S2,S3",
        "training",
        metavar="HOW",
        default_text="as --normalize",
    )
    skip_bad_images: bool = setting(
        False, "imagefolder: leave out images that cannot be read (the count is recorded)", "training"
    )
    test_subset: int | None = setting(
        None,
        "report test accuracy on the first N test images",
        "training",
        range=AT_LEAST_1,
        default_text="all",
    )
    # Speed (docs/performance.md). Children cycle through `views` augmentation views per sample
    # (epoch e uses e mod views, drawn from the run's seed), so a teacher's logits can be computed
    # once per view and shared by every student it teaches; off runs the teachers live on the same inputs.
    teacher_cache: bool = setting(
        True,
        "on: teachers' logits computed once per sample and augmentation view, "
        "shared by all their students; off: teachers run live",
        "speed",
        resumable=True,
    )
    views: int = setting(
        4, "augmentation views per sample that children cycle through", "speed", range=AT_LEAST_1
    )
    # The hint teacher's block outputs are cached too (fp16, every view, memory-mapped files in
    # RUN/cache/): 160 MB for the quick preset's first children, 3.4 GB for the full-width VGG-16
    # on all of Fashion-MNIST. Over the bound the hint teacher runs live up to its hint block.
    cache_mb: int = setting(
        2048,
        "largest hint-feature cache of one teacher block, in MB over all views "
        "(with --teacher-cache); a larger one runs the hint teacher live",
        "speed",
        range=NOT_NEGATIVE,
        resumable=True,
    )
    compile: str = setting(
        "auto",
        "torch.compile mode (auto: CUDA graphs for small models on CUDA)",
        "speed",
        choices=COMPILE_MODES,
        resumable=True,
    )
    # Not resumable: the precision changes a node's numbers, unlike --compile.
    precision: str = setting(
        "auto",
        "autocast precision (auto: bf16 where it is native and faster: CUDA GPUs, "
        "CPUs with AMX; fp32 elsewhere)",
        "speed",
        choices=PRECISIONS,
    )
    # None: this process trains every node. N >= 0: it only coordinates (queues each generation's
    # candidates in the study) and starts N local `iterkd worker` processes; 0 = workers from elsewhere.
    workers: int | None = setting(
        None,
        "coordinate only: queue candidates in the study and start N local "
        "`iterkd worker` processes (0: workers started elsewhere; docs/distributed.md)",
        "run",
        range=NOT_NEGATIVE,
        resumable=True,
        machine=True,
        default_text="train here",
    )
    deploy_figures: bool = setting(
        True,
        "skip each node's CPU latency/throughput and ONNX size (seconds per node: an ONNX export)",
        "run",
        flag="--no-deploy-figures",
        resumable=True,
        machine=True,
    )

    def __post_init__(self):
        if not self.run_dir:
            object.__setattr__(self, "run_dir", str(Path("runs") / self.name))
        if isinstance(self.teacher, str):
            object.__setattr__(self, "teacher", (self.teacher,))
        elif self.teacher is not None:
            object.__setattr__(self, "teacher", tuple(self.teacher) or None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SearchConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def loss_weights(self) -> LossWeights:
        """The distillation loss weights this config names (a validated config has its hint weight)."""
        return LossWeights(self.alpha, self.temperature, self.hint_weight, self.hint)

    @property
    def data_seed(self) -> int:
        """The seed of the validation split: --split-seed, else --seed."""
        return self.seed if self.split_seed is None else self.split_seed

    def data_store(self, progress: bool = True, log=print):
        """The decoded store of this config's dataset (built on first use: iterkd.data.store)."""
        from .data import open_dataset

        return open_dataset(
            self.dataset,
            self.data_dir,
            download=self.download,
            image_size=self.image_size,
            channels=self.channels,
            skip_bad=self.skip_bad_images,
            progress=progress,
            log=log,
        )

    def data_info(self, store=None):
        """The run's DatasetInfo: channels, classes, size and normalisation (a folder's from its store)."""
        return normalized(self._own_info(store), self.normalize)

    def _own_info(self, store=None):
        """The dataset's DatasetInfo with its own statistics, before --normalize."""
        from .data import OWN_DATA, dataset_info

        if self.dataset in OWN_DATA:
            return (store or self.data_store()).info(self.flip_images)
        info = dataset_info(self.dataset)  # no store needed: the registry says it
        return info if self.flip is None else replace(info, flip=self.flip_images)

    def frozen_inputs(self, store=None) -> tuple[tuple[tuple[float, ...], tuple[float, ...]] | None, str]:
        """How frozen teachers' inputs are normalised: ((mean, std), --teacher-normalize) when it
        differs from the students' (--normalize), else (None, 'students')."""
        text = self.teacher_normalize
        if text is None or text == self.normalize:
            return None, "students"
        try:
            info = normalized(self._own_info(store), text)
        except IterkdError as e:
            raise IterkdError(str(e).replace("--normalize", "--teacher-normalize", 1)) from None
        return (tuple(info.mean), tuple(info.std)), text

    @property
    def flip_images(self) -> bool | None:
        """--flip as a switch; None: the dataset's own default."""
        return None if self.flip is None else self.flip == "on"

    def load_data(self, device=None, store=None):
        """The dataset this config names, split and subsampled as in its run; on `device` when given."""
        from .data import load_data

        store = store or self.data_store()
        split = {k: getattr(self, k) for k in ("val_size", "train_subset", "test_subset")}
        data = load_data(self.dataset, store=store, seed=self.data_seed, flip=self.flip_images, **split)
        data = replace(data, info=normalized(data.info, self.normalize))
        return data if device is None else data.to(device)


SETTINGS: dict[str, Field] = {f.name: f for f in fields(SearchConfig)}


def _value_type(hint) -> type:
    """int for `int | None`, tuple for `tuple[str, ...] | None`, ..."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


# The value type of each setting (int, float, str, bool or tuple): how its flag parses and its range reads.
SETTING_TYPES: dict[str, type] = {
    name: _value_type(hint) for name, hint in typing.get_type_hints(SearchConfig).items()
}

# Settings that may differ when a run is resumed: they do not change what a node is.
RESUMABLE_OVERRIDES = frozenset(name for name, f in SETTINGS.items() if f.metadata.get("resumable"))


def flag(name: str) -> str:
    """The command-line flag of a setting: --the-name unless its field says otherwise (--no-download)."""
    return SETTINGS[name].metadata.get("flag") or "--" + name.replace("_", "-")


def shown(value) -> str:
    """A setting's value as a person reads it: on/off for switches, 0.0005 rather than 0.0005000000000000001."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def preset_values(name: str) -> dict | None:
    """A setting's value under each preset, where the presets differ on it (else None)."""
    default = SETTINGS[name].default
    values = {preset: overrides.get(name, default) for preset, overrides in PRESETS.items()}
    return values if len(set(values.values())) > 1 else None


def default_note(name: str) -> str | None:
    """What a setting is when no flag gives it: each preset's value where they differ ('smoke 4,
    quick 8, full 30'), else its one default; None for a switch flag such as --no-download."""
    f = SETTINGS[name]
    if SETTING_TYPES[name] is bool and flag(name).startswith("--no-"):
        return None
    text = f.metadata.get(
        "default_text"
    )  # the meaning of None, or a default that depends on more than presets
    per_preset = preset_values(name)
    if per_preset:
        return ", ".join(f"{p} {text if v is None else shown(v)}" for p, v in per_preset.items())
    return text or shown(f.default)


def check_name(name) -> None:
    """A run name is one plain directory name under runs/ ('.' and '..' would be runs/ itself or its parent)."""
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise IterkdError(f"--name must be a plain directory name (no '/', not '.' or '..'), got {name!r}")


def build_config(preset: str, overrides: dict) -> SearchConfig:
    """Preset values, then the explicit (non-None) overrides, then validation."""
    if preset not in PRESETS:
        raise IterkdError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], "preset": preset}
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - set(SETTINGS)
    if unknown:
        raise IterkdError(f"unknown settings: {', '.join(sorted(unknown))}")
    return validate(SearchConfig(**values))


def _check_setting(name: str, value) -> None:
    """One setting against its own metadata: a registered name, a number in range."""
    meta = SETTINGS[name].metadata
    if value is None and SETTINGS[name].default is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise IterkdError(f"unknown {flag(name)} {value!r}; choose one of {', '.join(choices)}")
    valid, integer = meta.get("range"), SETTING_TYPES[name] is int
    if valid is not None and not valid.admits(value, integer):
        raise IterkdError(f"{flag(name)} must be {valid.describe(integer)}, got {value}")


def validate(cfg: SearchConfig) -> SearchConfig:
    def need(ok: bool, msg: str):
        if not ok:
            raise IterkdError(msg)

    check_name(cfg.name)
    for name in SETTINGS:
        _check_setting(name, getattr(cfg, name))
    need(
        cfg.objectives == "acc" or cfg.pruner not in NEEDS_ONE_OBJECTIVE,
        f"--pruner {cfg.pruner} needs a single objective: Optuna cannot prune multi-objective trials; "
        "use --objectives acc, or --pruner budget or none",
    )
    need(
        cfg.workers is None or cfg.sampler == "greedy",
        f"--workers needs --sampler greedy (the coordinator fixes each queued candidate's move in the space's "
        f"order); --sampler {cfg.sampler} chooses moves inside the trial and runs in one process only",
    )
    need(
        cfg.min_step < 1 and (cfg.max_step is None or cfg.max_step < 1),
        "--min-step and --max-step are fractions of the parent's size a child removes: below 1",
    )
    if cfg.max_step is not None and cfg.min_step > cfg.max_step:
        raise IterkdError(
            f"--min-step {cfg.min_step:g} is larger than --max-step {cfg.max_step:g}; lower --min-step"
        )
    if not VARIANTS[cfg.variant].children and cfg.children != 1:
        several = " or ".join(name for name, v in VARIANTS.items() if v.children)
        raise IterkdError(
            f"--children {cfg.children} needs a *-children variant ({several}); "
            f"{cfg.variant} trains one child per generation"
        )
    need(
        cfg.val_size is None or cfg.val_size < 1 or float(cfg.val_size).is_integer(),
        f"--val-size is a count of images or a share below 1, got {cfg.val_size:g}" if cfg.val_size else "",
    )
    need(cfg.channels in (None, 1, 3), f"--channels must be 1 or 3, got {cfg.channels}")
    parse_normalize(cfg.normalize)
    if cfg.teacher_normalize is not None:
        try:
            parse_normalize(cfg.teacher_normalize)
        except IterkdError as e:
            raise IterkdError(str(e).replace("--normalize", "--teacher-normalize", 1)) from None
    if cfg.hint_weight is None:
        cfg = replace(cfg, hint_weight=DEFAULT_HINT_WEIGHT[cfg.hint])
    cfg.loss_weights()  # LossWeights checks its own invariants too
    return cfg


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's ImageNet statistics


def parse_normalize(text: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """--normalize as (mean, std), None for the dataset's own; IterkdError for anything else."""
    if text == "dataset":
        return None
    if text == "imagenet":
        return IMAGENET
    usage = "--normalize is dataset, imagenet or M1,M2,M3/S1,S2,S3 (means, then stds, one per channel)"
    means, slash, stds = str(text).partition("/")
    try:
        mean, std = (tuple(float(v) for v in part.split(",")) for part in (means, stds))
    except ValueError:
        raise IterkdError(f"{usage}, got {text!r}") from None
    if not slash or len(mean) != len(std) or not all(map(math.isfinite, mean + std)) or min(std) <= 0:
        raise IterkdError(f"{usage}, with as many stds as means, each above 0; got {text!r}")
    return mean, std


def normalized(info, text: str):
    """`info` with the normalisation --normalize names; one line when its channels do not fit."""
    stats = parse_normalize(text)
    if stats is None:
        return info
    mean, std = stats
    if len(mean) != info.channels:
        raise IterkdError(
            f"--normalize {text} gives {len(mean)} channel(s), but {info.name} has {info.channels}"
            + ("; ImageNet statistics are for 3-channel images (--channels 3)" if text == "imagenet" else "")
        )
    return replace(info, mean=mean, std=std)


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "config.json"


def resume_config(saved: SearchConfig, explicit: dict) -> SearchConfig:
    """The saved config of a run with the explicitly given flags applied; a flag that would change
    what a node is (space, dataset, epochs, ...) is an error naming the conflict."""
    conflicts = [
        f"{flag(k)} {v} (run has {getattr(saved, k)})"
        for k, v in explicit.items()
        if v is not None
        and k not in RESUMABLE_OVERRIDES
        and k not in ("name", "run_dir", "preset")
        and v != getattr(saved, k)
    ]
    if explicit.get("preset") not in (None, saved.preset):
        conflicts.append(f"--preset {explicit['preset']} (run has {saved.preset})")
    if conflicts:
        raise IterkdError(
            f"run {saved.run_dir} was started with other settings: {'; '.join(conflicts)}. "
            "Drop those flags to resume it, or start a new run with --name"
        )
    if saved.storage and "***" in saved.storage and not explicit.get("storage"):
        raise IterkdError(
            f"run {saved.run_dir} uses storage {saved.storage}; passwords are never saved, "
            "so pass --storage with the full URL again to resume it"
        )
    allowed = {k: v for k, v in explicit.items() if v is not None and k in RESUMABLE_OVERRIDES}
    return validate(replace(saved, **allowed))


def search_command(cfg: SearchConfig) -> str:
    """The `iterkd search` command line that reproduces a run: its preset plus every setting that
    differs from it. Machine-specific settings (storage, device, data dir) are left out."""
    import shlex

    base = build_config(cfg.preset, {"name": cfg.name})
    always = ("space", "dataset", "variant", "max_drop")
    args = ["iterkd", "search", "--name", cfg.name, "--preset", cfg.preset]
    for name, f in SETTINGS.items():
        value = getattr(cfg, name)
        if name in ("name", "preset", "run_dir") or f.metadata.get("machine") or value is None:
            continue
        if name in always or value != getattr(base, name):
            args += _as_flags(name, value)
    return shlex.join(args)


def _as_flags(name: str, value) -> list[str]:
    """The command-line words that set a setting to `value`."""
    if isinstance(value, bool):
        if flag(name).startswith("--no-"):
            return [] if value else [flag(name)]
        return [flag(name), shown(value)]  # on | off
    # str(float) is its repr: exact on re-parse; --teacher A --teacher B for a tuple
    return [word for v in (value if isinstance(value, tuple) else (value,)) for word in (flag(name), str(v))]
