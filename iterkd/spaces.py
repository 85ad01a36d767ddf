"""Search spaces: YAML files naming a root architecture, the mutation operators that make a child
from a parent, and the smallest model allowed. A new space is a file; a new operator is one function."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import yaml

from .arch import VGG_PRESETS, VGGSpec, vgg_spec
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


def operator(name: str):
    """Register a mutation operator under the name a space YAML uses."""
    def register(fn: Operator) -> Operator:
        OPERATORS[name] = fn
        return fn
    return register


def _with_blocks(spec: VGGSpec, blocks) -> VGGSpec:
    return VGGSpec(tuple(blocks), spec.in_channels, spec.num_classes, spec.input_size, spec.batch_norm)


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
    return [Move("drop_block", (("block", i + 1),), _with_blocks(spec, spec.blocks[:i] + spec.blocks[i + 1:]))
            for i in range(len(spec.blocks))]


@operator("shrink_widths")
def shrink_widths(spec: VGGSpec, params: dict) -> list[Move]:
    """Multiply the conv widths of one block (scope 'block') or of all blocks (scope 'all') by a factor."""
    factors = params.get("factors", [0.5])
    scopes = params.get("scope", ["block", "all"])
    scopes = [scopes] if isinstance(scopes, str) else scopes
    moves = []
    for f in factors:
        def shrink(b):
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
                    moves.append(Move("shrink_widths", (("block", i + 1), ("factor", f)), _with_blocks(spec, blocks)))
    return moves


@dataclass(frozen=True)
class MinModel:
    """The smallest model a space may produce; children below it are never proposed."""

    blocks: int = 1
    width: int = 1
    params: int = 0

    def admits(self, spec: VGGSpec) -> bool:
        return (len(spec.blocks) >= self.blocks and min(w for b in spec.blocks for w in b) >= self.width
                and spec.params() >= self.params)


@dataclass(frozen=True)
class SearchSpace:
    name: str
    description: str
    root_arch: str
    root_width: float
    root_blocks: tuple[tuple[int, ...], ...] | None
    operators: tuple[tuple[str, dict], ...]
    min_model: MinModel = field(default_factory=MinModel)
    kd: dict = field(default_factory=dict)  # alpha/temperature/hint_weight/lr: a number (fixed) or [low, high] (searched)
    step: float = 0.5  # preferred child/parent parameter ratio: moves closest to it come first

    def root_spec(self, in_channels: int, num_classes: int, input_size: int, width: float | None = None) -> VGGSpec:
        """The root architecture for a dataset; `width` overrides the space's width multiplier."""
        if self.root_blocks is not None:
            mult = self.root_width if width is None else width
            blocks = tuple(tuple(max(1, round(w * mult)) for w in b) for b in self.root_blocks)
            return VGGSpec(blocks, in_channels, num_classes, input_size)
        return vgg_spec(self.root_arch, self.root_width if width is None else width, in_channels, num_classes, input_size)

    def moves(self, spec: VGGSpec) -> list[Move]:
        """Every child the space allows from `spec`, those whose size ratio to the parent is closest
        to `step` first (on a log scale; ties: the smaller child, then YAML order). A step of 0.5
        halves the model per generation: big enough to compress, small enough that a few epochs of
        distillation recover the accuracy."""
        seen, moves = set(), []
        for name, params in self.operators:
            for m in OPERATORS[name](spec, params):
                if m.spec not in seen and m.spec != spec and self.min_model.admits(m.spec):
                    seen.add(m.spec)
                    moves.append(m)
        order = {m: i for i, m in enumerate(moves)}
        target = math.log(self.step)

        def preference(m: Move):
            return (round(abs(math.log(m.spec.params() / spec.params()) - target), 9), m.spec.params(), order[m])

        return sorted(moves, key=preference)


def _builtin_dir() -> Path:
    return Path(str(resources.files("iterkd.search_spaces")))


def available_spaces() -> dict[str, Path]:
    """Names of the shipped spaces, mapped to their YAML files."""
    return {p.stem: p for p in sorted(_builtin_dir().glob("*.yaml"))}


def load_space(name_or_path: str) -> SearchSpace:
    """A shipped space by name, or any YAML file by path."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        spaces = available_spaces()
        if name_or_path not in spaces:
            raise IterkdError(f"unknown search space {name_or_path!r}; choose one of {', '.join(spaces)} "
                              "or give the path of a space YAML")
        path = spaces[name_or_path]
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise IterkdError(f"search space {path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    return _parse_space(data, path)


def _parse_space(data, path: Path) -> SearchSpace:
    if not isinstance(data, dict):
        raise IterkdError(f"search space {path}: expected a mapping with 'root' and 'operators'")
    root = data.get("root") or {}
    arch = root.get("arch", "custom" if "blocks" in root else None)
    if arch not in (*VGG_PRESETS, "custom"):
        raise IterkdError(f"search space {path}: root.arch must be one of {', '.join(VGG_PRESETS)} "
                          "(or give root.blocks), got {arch!r}")
    ops = []
    for entry in data.get("operators") or []:
        name, params = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        if name not in OPERATORS:
            raise IterkdError(f"search space {path}: unknown operator {name!r}; known: {', '.join(OPERATORS)}")
        ops.append((name, dict(params or {})))
    if not ops:
        raise IterkdError(f"search space {path}: 'operators' must list at least one of {', '.join(OPERATORS)}")
    try:
        min_model = MinModel(**(data.get("min_model") or {}))
    except TypeError as e:
        raise IterkdError(f"search space {path}: bad min_model ({e}); keys are blocks, width, params") from None
    space = SearchSpace(
        name=data.get("name", path.stem), description=data.get("description", ""),
        root_arch=arch, root_width=float(root.get("width", 1.0)),
        root_blocks=tuple(tuple(b) for b in root["blocks"]) if "blocks" in root else None,
        operators=tuple(ops), min_model=min_model, kd=_parse_kd(data.get("kd") or {}, path),
        step=_parse_step(data.get("step", 0.5), path))
    probe = space.root_spec(3, 10, 32)
    if not min_model.admits(probe):
        raise IterkdError(f"search space {path}: min_model {min_model} is larger than the root {probe.summary()}")
    return space


KD_KEYS = ("alpha", "temperature", "hint_weight", "lr")


def _parse_kd(kd, path: Path) -> dict:
    """`kd:` maps alpha/temperature/hint_weight/lr to a number (fixed) or [low, high] (searched)."""
    if not isinstance(kd, dict) or set(kd) - set(KD_KEYS):
        raise IterkdError(f"search space {path}: 'kd' may only set {', '.join(KD_KEYS)}")
    for key, value in kd.items():
        ok = isinstance(value, (int, float)) or (isinstance(value, list) and len(value) == 2
                                                 and all(isinstance(v, (int, float)) for v in value)
                                                 and 0 <= value[0] < value[1])
        if not ok:
            raise IterkdError(f"search space {path}: kd.{key} must be a number or [low, high] with 0 <= low < high")
    return dict(kd)


def _parse_step(step, path: Path) -> float:
    if not isinstance(step, (int, float)) or not 0 < step < 1:
        raise IterkdError(f"search space {path}: step must be a number in (0, 1) (the preferred child/parent size ratio)")
    return float(step)
