"""Search spaces: YAML files naming a root architecture, the mutation operators that make a child
from a parent, and the smallest model allowed. A new space is a file; a new operator is one function."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import yaml

from .arch import VGG_PRESETS, VGGSpec, short_repr, vgg_spec
from .errors import IterkdError


@dataclass(frozen=True)
class Move:
    """One way to make a child: the operator, its arguments and the resulting spec."""

    operator: str
    args: tuple[tuple[str, object], ...]
    spec: VGGSpec

    @property
    def label(self) -> str:
        return f"{self.operator}({', '.join(f'{k}={v}' for k, v in self.args)})"


Operator = Callable[[VGGSpec, dict], list[Move]]
OPERATORS: dict[str, Operator] = {}
# Each operator's YAML parameters, mapped to the check its value must pass (see _parse_operators).
OPERATOR_PARAMS: dict[str, dict[str, Callable[[object, tuple], object]]] = {}


def operator(name: str, **params: Callable[[object, tuple], object]):
    """Register a mutation operator under the name a space YAML uses; `params` maps each parameter
    it reads to a check `(value, key) -> value` that raises SpaceError for a bad value."""

    def register(fn: Operator) -> Operator:
        OPERATORS[name] = fn
        OPERATOR_PARAMS[name] = params
        return fn

    return register


class SpaceError(Exception):
    """A schema violation at `key`, a path into the document such as ('root', 'blocks', 1, 0);
    load_space turns it into an IterkdError naming the file, the line and the key."""

    def __init__(self, key: tuple, message: str):
        super().__init__(message)
        self.key = key


def _number(value, key: tuple, ok: Callable[[float], bool], what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise SpaceError(key, f"must be {what}, got {short_repr(value)}")
    return float(value)


def _count(value, key: tuple, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpaceError(key, f"must be an integer >= {minimum} ({what}), got {short_repr(value)}")
    return value


def _mapping(value, key: tuple, allowed, what: str) -> dict:
    """`value` as a mapping whose keys are all in `allowed` (None reads as empty: `kd:` with nothing after)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpaceError(key, f"must be a mapping of {', '.join(allowed)}, got {short_repr(value)}")
    for k in value:
        if k not in allowed:
            raise SpaceError(
                key + (k,), f"is not a setting iterkd knows; {what} may set {', '.join(allowed) or 'nothing'}"
            )
    return value


def _factors(value, key: tuple) -> list[float]:
    if not isinstance(value, list) or not value:
        raise SpaceError(
            key, f"must be a list of width factors in (0, 1), e.g. [0.75, 0.5], got {short_repr(value)}"
        )
    return [
        _number(f, key + (i,), lambda x: 0 < x < 1, "a width factor in (0, 1)") for i, f in enumerate(value)
    ]


def _scopes(value, key: tuple):
    scopes = [value] if isinstance(value, str) else value
    if not isinstance(scopes, list) or not scopes or any(s not in ("block", "all") for s in scopes):
        raise SpaceError(key, f"must be block, all or a list of them, got {short_repr(value)}")
    return value


def _with_blocks(spec: VGGSpec, blocks) -> VGGSpec:
    """`spec` with other conv blocks; its head (grid, hidden layers) as it was."""
    return replace(spec, blocks=tuple(tuple(b) for b in blocks))


@operator("drop_layer")
def drop_layer(spec: VGGSpec, params: dict) -> list[Move]:
    """Remove the last conv of one block (blocks keep at least one conv)."""
    moves = []
    for i, block in enumerate(spec.blocks):
        if len(block) > 1:
            blocks = list(spec.blocks)
            blocks[i] = block[:-1]
            moves.append(Move("drop_layer", (("block", i + 1),), _with_blocks(spec, blocks)))
    return moves


@operator("drop_block")
def drop_block(spec: VGGSpec, params: dict) -> list[Move]:
    """Remove one whole block (and its pool); the next block reads the previous block's output."""
    if len(spec.blocks) < 2:
        return []
    return [
        Move("drop_block", (("block", i + 1),), _with_blocks(spec, spec.blocks[:i] + spec.blocks[i + 1 :]))
        for i in range(len(spec.blocks))
    ]


@operator("shrink_widths", factors=_factors, scope=_scopes)
def shrink_widths(spec: VGGSpec, params: dict) -> list[Move]:
    """Multiply the conv widths of one block (scope 'block') or of all blocks (scope 'all') by a factor."""
    factors = params.get("factors", [0.5])
    scopes = params.get("scope", ["block", "all"])
    scopes = [scopes] if isinstance(scopes, str) else scopes
    moves = []
    for f in factors:

        def shrink(b, f=f):  # called within this iteration; bound anyway so it cannot drift
            return tuple(max(1, round(w * f)) for w in b)

        if "all" in scopes:
            child = _with_blocks(spec, [shrink(b) for b in spec.blocks])
            if child != spec:
                moves.append(Move("shrink_widths", (("block", "all"), ("factor", f)), child))
        if "block" in scopes:
            for i, block in enumerate(spec.blocks):
                blocks = list(spec.blocks)
                blocks[i] = shrink(block)
                if tuple(blocks) != spec.blocks:
                    moves.append(
                        Move("shrink_widths", (("block", i + 1), ("factor", f)), _with_blocks(spec, blocks))
                    )
    return moves


@operator("drop_fc")
def drop_fc(spec: VGGSpec, params: dict) -> list[Move]:
    """Remove one hidden fully connected layer; the layer after it reads what it read."""
    return [
        Move("drop_fc", (("layer", i + 1),), replace(spec, hidden=spec.hidden[:i] + spec.hidden[i + 1 :]))
        for i in range(len(spec.hidden))
    ]


@operator("shrink_fc", factors=_factors)
def shrink_fc(spec: VGGSpec, params: dict) -> list[Move]:
    """Multiply the width of one hidden fully connected layer by a factor."""
    moves = []
    for f in params.get("factors", [0.5, 0.25]):
        for i, width in enumerate(spec.hidden):
            narrower = max(1, round(width * f))
            if narrower < width:
                hidden = spec.hidden[:i] + (narrower,) + spec.hidden[i + 1 :]
                moves.append(
                    Move("shrink_fc", (("layer", i + 1), ("factor", f)), replace(spec, hidden=hidden))
                )
    return moves


@operator("shrink_grid")
def shrink_grid(spec: VGGSpec, params: dict) -> list[Move]:
    """Pool to a smaller grid before the classifier: to 1x1 (global average pooling) and to half the
    side. Exact (the child starts with its parent's function, see inherit) while the last block's
    map is 1x1, as in any torchvision VGG on 32 px inputs."""
    grids = sorted({1, spec.grid // 2} - {0}, reverse=True)
    return [Move("shrink_grid", (("grid", g),), replace(spec, grid=g)) for g in grids if g < spec.grid]


# The moves of a VGG head, joined to any space's moves from a spec that has a pooled grid or hidden
# layers (an imported torchvision VGG keeps about 90 % of its parameters there).
HEAD_OPERATORS = (("shrink_grid", {}), ("drop_fc", {}), ("shrink_fc", {}))  # each with its defaults


def has_head(spec: VGGSpec) -> bool:
    """Whether a spec has a head the head moves can shrink (a pooled grid or hidden layers)."""
    return spec.grid > 1 or bool(spec.hidden)


@dataclass(frozen=True)
class MinModel:
    """The smallest model a space may produce; children below it are never proposed."""

    blocks: int = 1
    width: int = 1
    params: int = 0

    def admits(self, spec: VGGSpec) -> bool:
        return (
            len(spec.blocks) >= self.blocks
            and min(w for b in spec.blocks for w in b) >= self.width
            and spec.params() >= self.params
        )


@dataclass(frozen=True)
class SearchSpace:
    name: str
    description: str
    root_arch: str
    root_width: float
    root_blocks: tuple[tuple[int, ...], ...] | None
    operators: tuple[tuple[str, dict], ...]
    min_model: MinModel = field(default_factory=MinModel)
    kd: dict = field(
        default_factory=dict
    )  # alpha/temperature/hint_weight/lr: a number (fixed) or [low, high] (searched)
    step: float = 0.5  # preferred child/parent parameter ratio: moves closest to it come first

    def root_spec(
        self, in_channels: int, num_classes: int, input_size: int, width: float | None = None
    ) -> VGGSpec:
        """The root architecture for a dataset; `width` overrides the space's width multiplier."""
        if self.root_blocks is not None:
            mult = self.root_width if width is None else width
            blocks = tuple(tuple(max(1, round(w * mult)) for w in b) for b in self.root_blocks)
            return VGGSpec(blocks, in_channels, num_classes, input_size)
        return vgg_spec(
            self.root_arch, self.root_width if width is None else width, in_channels, num_classes, input_size
        )

    def operators_for(self, head: bool) -> tuple[tuple[str, dict], ...]:
        """The space's operators, and with `head` the head operators it does not name itself."""
        extra = tuple(h for h in HEAD_OPERATORS if h[0] not in dict(self.operators)) if head else ()
        return (*self.operators, *extra)

    def moves(
        self,
        spec: VGGSpec,
        target: float | None = None,
        size: Callable[[VGGSpec], float] = VGGSpec.params,
    ) -> list[Move]:
        """Every child the space allows from `spec`, those whose size ratio to the parent is closest
        to `target` first (on a log scale; ties: the smaller child, then YAML order). The target is
        the space's `step` unless the search's step controller asks for another ratio (a smaller
        step after an overshoot); `size` is the run's --shrink measure (parameters by default). A
        step of 0.5 halves the model per generation: big enough to compress, small enough that a few
        epochs of distillation recover the accuracy."""
        seen, moves = set(), []
        for name, params in self.operators_for(has_head(spec)):
            for m in OPERATORS[name](spec, params):
                if m.spec not in seen and m.spec != spec and self.min_model.admits(m.spec):
                    seen.add(m.spec)
                    moves.append(m)
        order = {m: i for i, m in enumerate(moves)}
        log_target = math.log(self.step if target is None else target)

        parent = size(spec)

        def preference(m: Move):
            child = size(m.spec)
            return (round(abs(math.log(child / parent) - log_target), 9), child, order[m])

        return sorted(moves, key=preference)


def _builtin_dir() -> Path:
    return Path(str(resources.files("iterkd.search_spaces")))


def available_spaces() -> dict[str, Path]:
    """Names of the shipped spaces, mapped to their YAML files."""
    return {p.stem: p for p in sorted(_builtin_dir().glob("*.yaml"))}


# A space is a few lines (the shipped ones are under 1 KiB). Both bounds are checked before the
# document becomes Python objects: the node count follows aliases, so an alias bomb ("billion laughs",
# 9 lines that expand to 10**9 entries) is refused instead of iterated.
MAX_SPACE_BYTES = 64 * 1024
MAX_SPACE_NODES = 10_000


def load_space(name_or_path: str) -> SearchSpace:
    """A shipped space by name, or any YAML file by path. Anything wrong with the file raises one
    IterkdError naming the file, the line and the key."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        spaces = available_spaces()
        if name_or_path not in spaces:
            raise IterkdError(
                f"unknown search space {name_or_path!r}; choose one of {', '.join(spaces)} "
                "or give the path of a space YAML"
            )
        path = spaces[name_or_path]
    node, data = _read_yaml(path)
    try:
        return _parse_space(data, path)
    except SpaceError as e:
        where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in e.key).lstrip(".")
        raise IterkdError(
            f"search space {path}:{_line(node, e.key)}: {where or 'the document'} {e}"
        ) from None


def _read_yaml(path: Path) -> tuple[yaml.Node | None, object]:
    """(the composed node tree, for line numbers; the data), with the size bounds enforced."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPACE_BYTES + 1)
    except OSError as e:
        raise IterkdError(f"search space {path}: cannot read it ({e.strerror or e})") from None
    if len(raw) > MAX_SPACE_BYTES:
        raise IterkdError(
            f"search space {path}: larger than {MAX_SPACE_BYTES // 1024} KiB; a space is a few lines"
        )
    loader = None
    try:
        loader = yaml.SafeLoader(raw)  # reads (and decodes) the first bytes already
        node = loader.get_single_node()
        if node is not None and _expanded_size(node) > MAX_SPACE_NODES:
            raise IterkdError(
                f"search space {path}: more than {MAX_SPACE_NODES} values once its aliases are "
                "expanded; a space is a few lines"
            )
        return node, loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{mark.line + 1}:" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise IterkdError(f"search space {path}:{where} not valid YAML ({problem})") from None
    except RecursionError:
        raise IterkdError(f"search space {path}: nested too deeply; a space is a few lines") from None
    finally:
        if loader is not None:
            loader.dispose()


def _expanded_size(root: yaml.Node) -> int:
    """Nodes in the document with every alias expanded, counted only up to just past the limit."""
    count, stack = 0, [root]
    while stack and count <= MAX_SPACE_NODES:
        node = stack.pop()
        count += 1
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in node.value for n in pair)
    return count


def _line(node: yaml.Node | None, key: tuple) -> int:
    """The line of `key` in the document, or of its deepest part that is there (a missing key: its parent)."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in key:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            node = None
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


SPACE_KEYS = ("name", "description", "root", "operators", "min_model", "step", "kd")
ROOT_KEYS = ("arch", "width", "blocks")
MIN_MODEL_KEYS = ("blocks", "width", "params")
# Each KD setting's valid values (a fixed value and both ends of a searched [low, high]); these are
# the ranges LossWeights enforces for the flags, checked here so the space file is named, not --alpha.
KD_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "alpha": (lambda x: 0 <= x <= 1, "in [0, 1]"),
    "temperature": (lambda x: x > 0, "> 0"),
    "hint_weight": (lambda x: x >= 0, ">= 0"),
    "lr": (lambda x: x > 0, "> 0"),
}
KD_KEYS = tuple(KD_RANGES)


def _parse_space(data, path: Path) -> SearchSpace:
    """The space a YAML document describes, checked against the schema; raises SpaceError."""
    if not isinstance(data, dict):
        raise SpaceError((), f"must be a mapping with root and operators, got {short_repr(data)}")
    _mapping(data, (), SPACE_KEYS, "a space")
    for key in ("name", "description"):
        if not isinstance(data.get(key, ""), str):
            raise SpaceError((key,), f"must be text, got {short_repr(data[key])}")
    arch, width, blocks = _parse_root(data.get("root"))
    space = SearchSpace(
        name=data.get("name", path.stem),
        description=data.get("description", ""),
        root_arch=arch,
        root_width=width,
        root_blocks=blocks,
        operators=_parse_operators(data.get("operators")),
        min_model=_parse_min_model(data.get("min_model")),
        kd=_parse_kd(data.get("kd")),
        step=_number(
            data.get("step", 0.5),
            ("step",),
            lambda x: 0 < x < 1,
            "a number in (0, 1) (the preferred child/parent size ratio)",
        ),
    )
    try:  # the size ceiling, by arithmetic: nothing is allocated for a spec that fails it
        probe = space.root_spec(3, 10, 32)
    except IterkdError as e:
        raise SpaceError(("root",), f"describes an {e}") from None
    if not space.min_model.admits(probe):
        m = space.min_model
        raise SpaceError(
            ("min_model",),
            f"(blocks {m.blocks}, width {m.width}, params {m.params}) is larger than "
            f"the root {probe.summary()} ({probe.params()} params)",
        )
    return space


def _parse_root(root) -> tuple[str, float, tuple[tuple[int, ...], ...] | None]:
    key = ("root",)
    if not isinstance(root, dict):
        raise SpaceError(
            key, f"must be a mapping of {', '.join(ROOT_KEYS)}, e.g. {{arch: vgg16}}, got {short_repr(root)}"
        )
    _mapping(root, key, ROOT_KEYS, "root")
    arch = root.get("arch", "custom" if "blocks" in root else None)
    if arch not in (*VGG_PRESETS, "custom") or (arch == "custom" and "blocks" not in root):
        raise SpaceError(
            key + ("arch",), f"must be one of {', '.join(VGG_PRESETS)} (or give root.blocks), got {arch!r}"
        )
    width = _number(
        root.get("width", 1.0), key + ("width",), lambda x: x > 0, "a number > 0 (the width multiplier)"
    )
    if "blocks" not in root:
        return arch, width, None
    blocks = root["blocks"]
    if not isinstance(blocks, list) or not blocks:
        raise SpaceError(
            key + ("blocks",),
            f"must be a list of blocks of conv widths, e.g. [[64, 64], [128]], got {short_repr(blocks)}",
        )
    for i, block in enumerate(blocks):
        if not isinstance(block, list) or not block:
            raise SpaceError(
                key + ("blocks", i), f"must be a non-empty list of conv widths, got {short_repr(block)}"
            )
        for j, w in enumerate(block):
            _count(w, key + ("blocks", i, j), "a conv width")
    return arch, width, tuple(tuple(b) for b in blocks)


def _parse_operators(entries) -> tuple[tuple[str, dict], ...]:
    key = ("operators",)
    if not isinstance(entries, list) or not entries:
        raise SpaceError(key, f"must list at least one of {', '.join(OPERATORS)}, got {short_repr(entries)}")
    ops = []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and len(entry) == 1:
            ((name, params),) = entry.items()
        elif isinstance(entry, str):
            name, params = entry, None
        else:
            raise SpaceError(
                key + (i,), f"must be an operator name or {{name: {{parameters}}}}, got {short_repr(entry)}"
            )
        if name not in OPERATORS:
            raise SpaceError(key + (i,), f"names unknown operator {name!r}; known: {', '.join(OPERATORS)}")
        checks = OPERATOR_PARAMS[name]
        params = _mapping(params, key + (i, name), checks, name)
        ops.append((name, {k: checks[k](v, key + (i, name, k)) for k, v in params.items()}))
    return tuple(ops)


def _parse_min_model(value) -> MinModel:
    key = ("min_model",)
    value = _mapping(value, key, MIN_MODEL_KEYS, "min_model")
    return MinModel(
        **{
            k: _count(v, key + (k,), f"smallest {k}", minimum=0 if k == "params" else 1)
            for k, v in value.items()
        }
    )


def _parse_kd(kd) -> dict:
    """`kd:` maps alpha/temperature/hint_weight/lr to a number (fixed) or [low, high] (searched)."""
    kd = _mapping(kd, ("kd",), KD_KEYS, "kd")
    for name, value in kd.items():
        ok, valid = KD_RANGES[name]
        key = ("kd", name)
        if isinstance(value, list) and len(value) == 2:
            low, high = (_number(v, key + (i,), ok, f"a number {valid}") for i, v in enumerate(value))
            if not low < high:
                raise SpaceError(key, f"must be [low, high] with low < high, got {value}")
        elif isinstance(value, list):
            raise SpaceError(key, f"must be a number {valid} or [low, high], got {short_repr(value)}")
        else:
            _number(value, key, ok, f"a number {valid} or [low, high]")
    return dict(kd)
