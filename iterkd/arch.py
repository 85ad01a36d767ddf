"""VGG architecture specs as plain data, and their size and cost computed without building a model.

A spec is a frozen dataclass that round-trips through JSON; models are built from it (iterkd.models).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from numbers import Integral

from .errors import IterkdError

# Conv widths per block of the classic VGG configurations (Simonyan & Zisserman 2015, table 1).
VGG_PRESETS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}

# torchvision's constructors of those, each with and without batch norm (iterkd imports their state dicts).
TORCHVISION_VGGS = tuple(f"{name}{bn}" for name in VGG_PRESETS for bn in ("", "_bn"))

# The largest model iterkd will describe, checked by arithmetic before anything is allocated (specs
# come from YAML files and checkpoint metadata, which anyone can write). 2e9 parameters are 8 GB of
# fp32 weights, and training needs about four times that (grads, momentum, activations): 136x the
# largest shipped root (VGG-19-BN, 20 M), so no real search meets it. 1000 convs bounds the time a
# deep-but-thin spec takes to build (VGG-19 has 16).
MAX_PARAMS = 2_000_000_000
MAX_CONVS = 1000
MAX_GRID = 64  # the pooled grid before the classifier (torchvision's VGG: 7)
MAX_HIDDEN = 16  # hidden fully connected layers (torchvision's VGG: 2)
HEAD_FIELDS = ("grid", "hidden", "dropout")  # left out of a spec's JSON at their defaults


@dataclass(frozen=True)
class VGGSpec:
    """A VGG: blocks of 3x3 convs (+BN+ReLU), a 2x2 max-pool after each block while the map is
    larger than 1x1, then average pooling to a `grid` x `grid` map (1: global average pooling), the
    `hidden` fully connected layers (each Linear, ReLU, Dropout(`dropout`)) and one linear classifier.

    iterkd's own VGGs have grid 1 and no hidden layer; torchvision's have grid 7 and hidden
    (4096, 4096), CIFAR-style VGGs grid 1 and none or a few. A spec's JSON leaves out the head fields
    at their defaults, so the specs (and the candidate keys made from them) of runs from before the
    head existed read and write as they did."""

    blocks: tuple[tuple[int, ...], ...]
    in_channels: int = 3
    num_classes: int = 10
    input_size: int = 32
    batch_norm: bool = True
    grid: int = 1
    hidden: tuple[int, ...] = ()
    dropout: float = 0.5

    def __post_init__(self):
        """The one validation of a spec, wherever it comes from (code, a space YAML, a checkpoint's
        metadata): types, positive sizes and the size ceiling, all before any tensor exists."""
        blocks = self.blocks
        if (
            not isinstance(blocks, (list, tuple))
            or not blocks
            or not all(isinstance(b, (list, tuple)) and b and all(_is_count(w) for w in b) for b in blocks)
        ):
            raise IterkdError(
                "invalid VGG spec: blocks must be a non-empty list of blocks, each a non-empty list "
                f"of conv widths >= 1, got {short_repr(blocks)}"
            )
        if sum(len(b) for b in blocks) > MAX_CONVS:
            raise IterkdError(
                f"invalid VGG spec: {sum(len(b) for b in blocks)} convs, more than the {MAX_CONVS} "
                "iterkd builds"
            )
        object.__setattr__(self, "blocks", tuple(tuple(int(w) for w in b) for b in blocks))
        for name in ("in_channels", "num_classes", "input_size"):
            if not _is_count(getattr(self, name)):
                raise IterkdError(
                    f"invalid VGG spec: {name} must be an integer >= 1, got {short_repr(getattr(self, name))}"
                )
            object.__setattr__(self, name, int(getattr(self, name)))
        if not isinstance(self.batch_norm, bool):
            raise IterkdError(
                f"invalid VGG spec: batch_norm must be true or false, got {short_repr(self.batch_norm)}"
            )
        if not _is_count(self.grid) or self.grid > MAX_GRID:
            raise IterkdError(
                f"invalid VGG spec: grid must be an integer from 1 to {MAX_GRID}, got {short_repr(self.grid)}"
            )
        object.__setattr__(self, "grid", int(self.grid))
        hidden = self.hidden
        if (
            not isinstance(hidden, (list, tuple))
            or len(hidden) > MAX_HIDDEN
            or not all(map(_is_count, hidden))
        ):
            raise IterkdError(
                f"invalid VGG spec: hidden must be a list of at most {MAX_HIDDEN} layer widths >= 1, "
                f"got {short_repr(hidden)}"
            )
        object.__setattr__(self, "hidden", tuple(int(w) for w in hidden))
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0 <= self.dropout < 1
        ):
            raise IterkdError(
                f"invalid VGG spec: dropout must be a number in [0, 1), got {short_repr(self.dropout)}"
            )
        object.__setattr__(self, "dropout", float(self.dropout))
        if self.params() > MAX_PARAMS:
            raise IterkdError(
                f"invalid VGG spec: {_approx(self.params())} parameters, more than the {MAX_PARAMS:.0e} "
                f"iterkd builds ({4 * MAX_PARAMS / 1e9:.0f} GB of fp32 weights)"
            )

    # -- serialisation -------------------------------------------------------------------------
    def to_json(self) -> str:
        """The spec as compact JSON, the head fields only where they differ from their defaults."""
        data = asdict(self)
        for f in fields(self):
            if f.name in HEAD_FIELDS and data[f.name] == f.default:
                del data[f.name]
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | dict) -> VGGSpec:
        """A spec from its JSON (a string or the parsed mapping); anything that is not one raises
        IterkdError, since the text may come from a file someone else wrote."""
        try:
            data = json.loads(text) if isinstance(text, (str, bytes)) else text
        except (ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a 5000-digit number
            raise IterkdError(f"invalid VGG spec: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise IterkdError(
                f"invalid VGG spec: expected a JSON object with 'blocks', got {short_repr(data)}"
            )
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown or "blocks" not in data:
            problem = f"unknown key {unknown[0]!r}" if unknown else "no 'blocks'"
            raise IterkdError(f"invalid VGG spec: {problem}; its keys are {', '.join(known)}")
        return cls(**data)

    # -- shape ---------------------------------------------------------------------------------
    @property
    def convs(self) -> int:
        """Number of conv layers (VGG-16 has 13; its name also counts the classic 3 FC layers)."""
        return sum(len(b) for b in self.blocks)

    @property
    def out_width(self) -> int:
        return self.blocks[-1][-1]

    def block_sizes(self) -> list[int]:
        """Spatial size (H = W) of each block's convs; the pool after block i halves it."""
        sizes, size = [], self.input_size
        for _ in self.blocks:
            sizes.append(size)
            if size > 1:
                size //= 2
        return sizes

    def pools(self) -> list[bool]:
        return [s > 1 for s in self.block_sizes()]

    @property
    def map_size(self) -> int:
        """Spatial size (H = W) of the last block's output: what the head's pooling reads."""
        return self.block_output_shapes()[-1][1]

    @property
    def head_in(self) -> int:
        """Inputs of the first fully connected layer: the last conv's channels at each grid position."""
        return self.out_width * self.grid * self.grid

    def head_layers(self) -> list[tuple[int, int]]:
        """(inputs, outputs) of each fully connected layer: the hidden ones, then the classifier."""
        widths = [self.head_in, *self.hidden, self.num_classes]
        return list(zip(widths, widths[1:]))

    def block_output_shapes(self) -> list[tuple[int, int]]:
        """(channels, spatial size) of each block's output after its pool: the hint points."""
        return [(b[-1], s // 2 if p else s) for b, s, p in zip(self.blocks, self.block_sizes(), self.pools())]

    def summary(self) -> str:
        """Compact human form, e.g. '5 conv [8x2|16x2|32]' (widths per block, 'x' repeats)."""
        parts = []
        for b in self.blocks:
            parts.append(
                "-".join(str(w) for w in b)
                if len(set(b)) > 1
                else f"{b[0]}x{len(b)}"
                if len(b) > 1
                else str(b[0])
            )
        text = f"{self.convs} conv [{'|'.join(parts)}]"
        if self.grid > 1 or self.hidden:
            fc = "-".join(map(str, self.hidden)) or "none"
            text += f" fc[{fc}]" + (f"@{self.grid}x{self.grid}" if self.grid > 1 else "")
        return text

    # -- cost ----------------------------------------------------------------------------------
    def params(self) -> int:
        """Trainable parameters (conv weights+bias, BN affine, linear)."""
        total, c_in = 0, self.in_channels
        for block in self.blocks:
            for w in block:
                total += c_in * w * 9 + w  # conv weight + bias
                if self.batch_norm:
                    total += 2 * w
                c_in = w
        return total + sum(i * o + o for i, o in self.head_layers())

    def state_numel(self) -> int:
        """Elements of the state dict: parameters, BN running stats and BN batch counters."""
        return self.params() + self._running() + self._n_bn()

    def state_bytes(self) -> int:
        """Bytes of the fp32 state dict: parameters, BN running stats (fp32) and counters (int64)."""
        return 4 * (self.params() + self._running()) + 8 * self._n_bn()

    def _n_bn(self) -> int:
        return sum(len(b) for b in self.blocks) if self.batch_norm else 0

    def _running(self) -> int:
        return 2 * sum(w for b in self.blocks for w in b) if self.batch_norm else 0

    def flops(self) -> int:
        """Forward FLOPs for one image, counted like torch.utils.flop_counter: 2 per multiply-add
        of convs and linear layers; BN, ReLU, dropout and pooling are not counted."""
        total, c_in = 0, self.in_channels
        for block, size in zip(self.blocks, self.block_sizes()):
            for w in block:
                total += 2 * c_in * w * 9 * size * size
                c_in = w
        return total + sum(2 * i * o for i, o in self.head_layers())


def vgg_spec(
    name: str, width: float = 1.0, in_channels: int = 3, num_classes: int = 10, input_size: int = 32
) -> VGGSpec:
    """A classic VGG (vgg11/13/16/19) with every conv width multiplied by `width` (at least 1)."""
    if name not in VGG_PRESETS:
        raise IterkdError(f"unknown architecture {name!r}; choose one of {', '.join(VGG_PRESETS)}")
    if not 0 < width < math.inf:
        raise IterkdError(f"width multiplier must be a finite number > 0, got {width}")
    blocks = tuple(tuple(max(1, round(w * width)) for w in b) for b in VGG_PRESETS[name])
    return VGGSpec(blocks, in_channels, num_classes, input_size)


def _is_count(value) -> bool:
    """An integer >= 1; not a bool (JSON `true` is not a width) and not a float (8.7 is not a width)."""
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= 1


def _approx(n: int) -> str:
    """A huge int as '1.5e+13'; past float range from its bit length (a hostile width may have 4000 digits)."""
    return f"{n:.3g}" if n < 10**300 else f"about 1e{int(n.bit_length() * math.log10(2))}"


def short_repr(value) -> str:
    """repr cut to a line: the value may be a hostile file's megabyte-long list."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
