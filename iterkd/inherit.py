"""Weight inheritance: a child starts from its parent's weights instead of a random draw.

A child spec is mapped onto its parent's, conv by conv: child block j takes the weights of a parent
block (blocks keep their order; a dropped block is skipped), conv k of a block those of the parent
block's conv k (a dropped layer is the block's last). Where a child conv is narrower than its source,
the source's most important filters survive — by the BN scale |gamma| (the network's own measure of
a channel's weight, as in Liu et al. 2017's network slimming), or the filter's L1 norm without BN (Li
et al. 2017) — and the next conv keeps the matching input channels. A conv whose input is no longer
what its source read (the first conv after a dropped layer or block) keeps its random init; every
other conv, BN and the classifier (when it still reads the parent's last conv) are copied. Everything
is decided from the two specs alone, so the plan can be inspected and tested without weights.

BN running statistics are copied too, but they describe the parent's activations; `train.recalibrate_bn`
re-estimates them from training images (Li et al. 2020's adaptive BN) before a child's starting
accuracy is measured. Training itself normalises with batch statistics, so it does not depend on them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from .arch import VGGSpec
from .models import VGG

INIT_MODES = ("inherit", "scratch")


@dataclass(frozen=True)
class ConvMap:
    """Where one child conv (block, index) takes its weights from; `source` None: no parent conv."""

    child: tuple[int, int]
    source: tuple[int, int] | None
    input_follows: bool  # the child conv reads what its source conv read (else its weights stay random)


def conv_plan(parent: VGGSpec, child: VGGSpec) -> list[ConvMap]:
    """The child-to-parent conv mapping (blocks in order) that keeps the most convs at their own
    width, then the most convs with their input, then the most parameters; ties: the earlier blocks
    (so dropping one of two identical blocks keeps the first)."""
    best, best_score = [], None
    n_p, n_c = len(parent.blocks), len(child.blocks)
    for kept in itertools.combinations(range(n_p), min(n_c, n_p)):
        plan = _plan_for_blocks(parent, child, list(kept) + [None] * (n_c - len(kept)))
        same_width = sum(
            m.source is not None
            and parent.blocks[m.source[0]][m.source[1]] == child.blocks[m.child[0]][m.child[1]]
            for m in plan
        )
        score = (same_width, sum(m.input_follows for m in plan), _copied_params(child, plan))
        if best_score is None or score > best_score:
            best, best_score = plan, score
    return best


def _plan_for_blocks(parent: VGGSpec, child: VGGSpec, block_map: list[int | None]) -> list[ConvMap]:
    plan, prev_source = [], "input"
    for j, widths in enumerate(child.blocks):
        b = block_map[j]
        for k in range(len(widths)):
            source = (b, k) if b is not None and k < len(parent.blocks[b]) else None
            if source is not None and parent.blocks[b][k] < widths[k]:
                source = None  # a wider child conv has no single source
            follows = source is not None and prev_source == _previous_conv(parent, source)
            plan.append(ConvMap((j, k), source, follows))
            prev_source = source
    return plan


def _previous_conv(spec: VGGSpec, conv: tuple[int, int]):
    b, k = conv
    if k > 0:
        return (b, k - 1)
    if b > 0:
        return (b - 1, len(spec.blocks[b - 1]) - 1)
    return "input"


def _copied_params(child: VGGSpec, plan: list[ConvMap]) -> int:
    c_in, total, bn = child.in_channels, 0, 2 if child.batch_norm else 0
    for m in plan:
        w = child.blocks[m.child[0]][m.child[1]]
        if m.source is not None:
            total += w * (c_in * 9 + 1 + bn if m.input_follows else bn)  # conv+bias+BN, or BN alone
        c_in = w
    return total


def _convs(model: VGG) -> dict[tuple[int, int], tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
    out = {}
    for b, block in enumerate(model.blocks):
        layers, k = list(block), 0
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Conv2d):
                bn = (
                    layers[i + 1]
                    if i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d)
                    else None
                )
                out[(b, k)] = (layer, bn)
                k += 1
    return out


def importance(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> torch.Tensor:
    """One score per output channel: |BN gamma| when there is BN, else the filter's L1 norm."""
    if bn is not None:
        return bn.weight.detach().abs().float().cpu()
    return conv.weight.detach().abs().sum(dim=(1, 2, 3)).float().cpu()


def keep_channels(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of the `width` highest scores, in their original order (ties: the lower index)."""
    if width >= len(scores):
        return torch.arange(len(scores))
    values = scores.tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))[:width]
    return torch.tensor(sorted(order))


def _linears(model: VGG) -> list[nn.Linear]:
    """The fully connected layers in order: the hidden ones, then the classifier."""
    hidden = [m for m in model.hidden if isinstance(m, nn.Linear)] if model.spec.hidden else []
    return [*hidden, model.head]


def _grid_columns(weight: torch.Tensor, kept: torch.Tensor, p_grid: int, c_grid: int) -> torch.Tensor:
    """The first linear layer's weights for the kept channels on the child's grid. Inputs are channel
    c at cell k as c * grid² + k. On a smaller grid each child cell takes the sum of the parent's
    cells inside it: exact while the map is 1x1 (every cell then holds the same value, so only each
    channel's sum over cells matters), an approximation of the parent's function otherwise."""
    w = weight.reshape(weight.shape[0], -1, p_grid, p_grid)[:, kept]
    if c_grid == p_grid:
        return w.reshape(weight.shape[0], -1)
    rows = torch.arange(p_grid) * c_grid // p_grid  # the child cell each parent row (and column) falls in
    out = torch.zeros(w.shape[0], w.shape[1], c_grid, c_grid, dtype=w.dtype, device=w.device)
    for i in range(p_grid):
        for j in range(p_grid):
            out[:, :, rows[i], rows[j]] += w[:, :, i, j]
    return out.reshape(weight.shape[0], -1)


def _inherit_head(child: VGG, parent: VGG, kept: torch.Tensor) -> list[int]:
    """Copy the parent's fully connected layers into the child where the head move allows (the child
    reads the parent's last conv, through `kept` channels); returns the child layers copied.

    Same hidden layers: all of them, the first on the child's grid (`_grid_columns`). One hidden
    layer narrower: its most important units by the L1 norm of their weights, and the next layer's
    matching inputs. One hidden layer dropped: the layers before it and after it; the one that now
    reads another input starts afresh."""
    p, c = _linears(parent), _linears(child)
    ph, ch = parent.spec.hidden, child.spec.hidden
    first = _grid_columns(p[0].weight, kept, parent.spec.grid, child.spec.grid)
    done: list[int] = []  # child layers copied in part: a narrowed one and the layer that reads it
    if ch == ph:
        pairs = [(i, i) for i in range(len(c))]  # (child layer, parent layer) copied whole
    elif len(ch) == len(ph):
        diff = [i for i, (a, b) in enumerate(zip(ch, ph)) if a != b]
        if len(diff) != 1 or ch[diff[0]] > ph[diff[0]]:
            return []
        k = diff[0]
        units = keep_channels(p[k].weight.abs().sum(dim=1), ch[k])
        c[k].weight.copy_((first if k == 0 else p[k].weight)[units])
        c[k].bias.copy_(p[k].bias[units])
        c[k + 1].weight.copy_(p[k + 1].weight[:, units])
        c[k + 1].bias.copy_(p[k + 1].bias)
        done = [k, k + 1]
        pairs = [(i, i) for i in range(len(c)) if i not in done]
    elif len(ph) == len(ch) + 1:
        # Which layer went: among those whose removal leaves the child's widths (with equal widths,
        # several), the one that lets the most weights be copied (torchvision's 4096-4096: the second,
        # keeping the 25,088 x 4,096 first layer).
        widths = parent.spec.head_layers()
        candidates = [i for i in range(len(ph)) if ph[:i] + ph[i + 1 :] == ch]
        if not candidates:
            return []

        def copied(k: int) -> int:
            return sum(a * b for n, (a, b) in enumerate(widths) if n != k and n != k + 1)

        k = max(candidates, key=copied)
        pairs = [(i, i) for i in range(k)] + [(i, i + 1) for i in range(k + 1, len(c))]
    else:
        return []
    for i, j in pairs:
        _copy_linear(c[i], p[j], first if i == 0 else None)
    return sorted(done + [i for i, _ in pairs])


def _copy_linear(dst: nn.Linear, src: nn.Linear, weight: torch.Tensor | None) -> None:
    dst.weight.copy_(src.weight if weight is None else weight)
    dst.bias.copy_(src.bias)


@torch.no_grad()
def inherit_weights(child: VGG, parent: VGG) -> dict:
    """Copy `parent`'s weights into `child` in place (see the module doc); returns a summary:
    how many of the child's parameters were copied and how many convs kept their random init."""
    plan = conv_plan(parent.spec, child.spec)
    p_convs, c_convs = _convs(parent), _convs(child)
    kept: dict[tuple[int, int], torch.Tensor] = {}  # source conv -> output channels the child kept
    prev_kept = torch.arange(child.spec.in_channels)  # the image's channels feed the first conv
    fresh = 0
    for m in plan:
        conv, bn = c_convs[m.child]
        if m.source is None:
            prev_kept, fresh = None, fresh + 1
            continue
        p_conv, p_bn = p_convs[m.source]
        out_idx = keep_channels(importance(p_conv, p_bn), conv.out_channels)
        kept[m.source] = out_idx
        if m.input_follows and prev_kept is not None:
            conv.weight.copy_(p_conv.weight[out_idx][:, prev_kept])
            conv.bias.copy_(p_conv.bias[out_idx])
        else:
            fresh += 1  # new input: the conv learns afresh, downstream layers still read its channels
        if bn is not None and p_bn is not None:
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(p_bn, name)[out_idx])
            bn.num_batches_tracked.copy_(p_bn.num_batches_tracked)
        prev_kept = out_idx
    last = plan[-1]
    reads_last = (
        last.source == (len(parent.spec.blocks) - 1, len(parent.spec.blocks[-1]) - 1)
        and prev_kept is not None
    )
    head = _inherit_head(child, parent, prev_kept) if reads_last else []
    head_copied = len(head) == len(child.spec.head_layers())
    copied = _copied_params(child.spec, plan) + sum(
        i * o + o for n, (i, o) in enumerate(child.spec.head_layers()) if n in head
    )
    return {
        "copied_params": copied,
        "params": child.spec.params(),
        "fresh_convs": fresh,
        "head_copied": bool(head_copied),
    }
