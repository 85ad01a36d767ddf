"""VGG architecture specs as plain data, and their size and cost computed without building a model.

A spec is a frozen dataclass that round-trips through JSON; models are built from it (iterkd.models).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .errors import IterkdError

# Conv widths per block of the classic VGG configurations (Simonyan & Zisserman 2015, table 1).
VGG_PRESETS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


@dataclass(frozen=True)
class VGGSpec:
    """A VGG: blocks of 3x3 convs (+BN+ReLU), a 2x2 max-pool after each block while the map is
    larger than 1x1, then global average pooling and one linear classifier."""

    blocks: tuple[tuple[int, ...], ...]
    in_channels: int = 3
    num_classes: int = 10
    input_size: int = 32
    batch_norm: bool = True

    def __post_init__(self):
        blocks = tuple(tuple(int(w) for w in b) for b in self.blocks)
        object.__setattr__(self, "blocks", blocks)
        if not blocks or any(not b for b in blocks) or any(w < 1 for b in blocks for w in b):
            raise IterkdError(f"invalid VGG spec: every block needs at least one conv of width >= 1, got {blocks}")

    # -- serialisation -------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | dict) -> "VGGSpec":
        data = json.loads(text) if isinstance(text, str) else dict(text)
        data["blocks"] = tuple(tuple(b) for b in data["blocks"])
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

    def block_output_shapes(self) -> list[tuple[int, int]]:
        """(channels, spatial size) of each block's output after its pool: the hint points."""
        return [(b[-1], s // 2 if p else s) for b, s, p in zip(self.blocks, self.block_sizes(), self.pools())]

    def summary(self) -> str:
        """Compact human form, e.g. '5 conv [8x2|16x2|32]' (widths per block, 'x' repeats)."""
        parts = []
        for b in self.blocks:
            parts.append("-".join(str(w) for w in b) if len(set(b)) > 1 else f"{b[0]}x{len(b)}" if len(b) > 1 else str(b[0]))
        return f"{self.convs} conv [{'|'.join(parts)}]"

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
        return total + c_in * self.num_classes + self.num_classes

    def state_bytes(self) -> int:
        """Bytes of the fp32 state dict: parameters, BN running stats (fp32) and counters (int64)."""
        n_bn = sum(len(b) for b in self.blocks) if self.batch_norm else 0
        running = 2 * sum(w for b in self.blocks for w in b) if self.batch_norm else 0
        return 4 * (self.params() + running) + 8 * n_bn

    def flops(self) -> int:
        """Forward FLOPs for one image, counted like torch.utils.flop_counter: 2 per multiply-add
        of convs and the linear layer; BN, ReLU and pooling are not counted."""
        total, c_in = 0, self.in_channels
        for block, size in zip(self.blocks, self.block_sizes()):
            for w in block:
                total += 2 * c_in * w * 9 * size * size
                c_in = w
        return total + 2 * c_in * self.num_classes


def vgg_spec(name: str, width: float = 1.0, in_channels: int = 3, num_classes: int = 10,
             input_size: int = 32) -> VGGSpec:
    """A classic VGG (vgg11/13/16/19) with every conv width multiplied by `width` (at least 1)."""
    if name not in VGG_PRESETS:
        raise IterkdError(f"unknown architecture {name!r}; choose one of {', '.join(VGG_PRESETS)}")
    if not width > 0:
        raise IterkdError(f"width multiplier must be > 0, got {width}")
    blocks = tuple(tuple(max(1, round(w * width)) for w in b) for b in VGG_PRESETS[name])
    return VGGSpec(blocks, in_channels, num_classes, input_size)
