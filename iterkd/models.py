"""nn.Modules built from specs: the VGG itself and the FitNets hint regressor.

Models are never edited in place: a child is a new model built from a new spec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .arch import VGGSpec


class VGG(nn.Module):
    """A VGG built from a VGGSpec; `forward_features` also returns every block's output (the hint points)."""

    def __init__(self, spec: VGGSpec):
        super().__init__()
        self.spec = spec
        blocks, c_in = [], spec.in_channels
        for widths, pool in zip(spec.blocks, spec.pools()):
            layers: list[nn.Module] = []
            for w in widths:
                layers.append(nn.Conv2d(c_in, w, 3, padding=1))
                if spec.batch_norm:
                    layers.append(nn.BatchNorm2d(w))
                layers.append(nn.ReLU(inplace=True))
                c_in = w
            if pool:
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        if spec.hidden:  # only then: the state dict of a VGG without hidden layers keeps its keys
            layers, width = [], spec.head_in
            for h in spec.hidden:
                layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(spec.dropout)]
                width = h
            self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(spec.head_layers()[-1][0], spec.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        x = torch.flatten(pool_to_grid(x, self.spec.grid, self.spec.map_size), 1)
        if self.spec.hidden:
            x = self.hidden(x)
        return self.head(x), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

    def block_output(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """The output of block `block`, running no block after it: a hint target for a fraction of
        a full forward pass when the logits come from elsewhere (the teacher cache)."""
        for b in self.blocks[: block + 1]:
            x = b(x)
        return x


def pool_to_grid(x: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """Average pooling of `x` (a `size` x `size` map, known from the spec) to a `grid` x `grid` map,
    as nn.AdaptiveAvgPool2d(grid) computes it, written with fixed-size operations where the sizes
    allow (every ONNX exporter takes those, and a trace records no shape test): a 1x1 map is
    repeated (each output cell averages that one input cell), a map whose side `grid` divides is
    average-pooled in equal windows."""
    if grid == 1:
        return F.adaptive_avg_pool2d(x, 1)
    if size == grid:
        return x
    if size == 1:
        return x.expand(-1, -1, grid, grid)
    if size % grid == 0:
        return F.avg_pool2d(x, size // grid)
    return F.adaptive_avg_pool2d(x, grid)


def hint_blocks(student: VGGSpec, teacher: VGGSpec) -> tuple[int, int]:
    """Which student block's output is regressed onto which teacher block's (FitNets' 'guided' and
    'hint' layers): the student's middle block and the teacher block at the same relative depth."""
    s = (len(student.blocks) - 1) // 2
    t = min(len(teacher.blocks) - 1, round((s + 1) / len(student.blocks) * len(teacher.blocks)) - 1)
    return s, max(0, t)


class HintRegressor(nn.Module):
    """1x1 conv from the student block's channels to the teacher block's, then bilinear resize
    to the teacher's spatial size when the two differ."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(student_channels, teacher_channels, 1)

    def forward(self, student_feat: torch.Tensor, teacher_size: tuple[int, int]) -> torch.Tensor:
        y = self.proj(student_feat)
        if y.shape[-2:] != teacher_size:
            y = F.interpolate(y, size=teacher_size, mode="bilinear", align_corners=False)
        return y
