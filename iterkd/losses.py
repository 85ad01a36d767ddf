"""The composite distillation loss: Hinton KD + cross-entropy + a hint on block activations.

total = alpha * KD + (1 - alpha) * CE + hint_weight * hint

The hint kinds live in a registry (`register_hint`): FitNets' (a regressor maps a student block
onto a teacher block, MSE) and similarity-preserving (Tung & Mori 2019: the students' and
teachers' batch-wise similarity matrices must match). The trainer calls the kind the config names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import IterkdError
from .models import HintRegressor

# (student block output, teacher block output, the kind's regressor or None) -> scalar loss
HintFn = Callable[[torch.Tensor, torch.Tensor, nn.Module | None], torch.Tensor]


@dataclass(frozen=True)
class HintKind:
    """One registered hint term. `regressor(student_channels, teacher_channels)`, when given, builds
    a trainable module that trains with the student (and is thrown away after); the trainer passes
    it to `loss`, which decides how to apply it."""

    name: str
    loss: HintFn
    default_weight: float
    regressor: Callable[[int, int], nn.Module] | None = None


_HINT_KINDS: dict[str, HintKind] = {}
# Valid --hint names, "none" (no hint term) last; rebuilt by register_hint/unregister_hint, so read
# it as `losses.HINTS` at the time of use rather than importing the tuple once at module level.
HINTS: tuple[str, ...] = ("none",)
# The hint weight when none is given, per kind (a dict updated in place, so every importer sees new kinds).
DEFAULT_HINT_WEIGHT: dict[str, float] = {"none": 0.0}


def register_hint(
    name: str, *, default_weight: float, regressor: Callable[[int, int], nn.Module] | None = None
) -> Callable[[HintFn], HintFn]:
    """Decorator: register `fn(student_feat, teacher_feat, regressor) -> loss` as hint kind `name`,
    usable as `--hint name` / `LossWeights(hint=name)` with no change to the trainer."""
    if name == "none" or name in _HINT_KINDS:
        raise ValueError(f"hint kind {name!r} is already taken")

    def register(fn: HintFn) -> HintFn:
        _HINT_KINDS[name] = HintKind(name, fn, default_weight, regressor)
        _refresh_names()
        return fn

    return register


def unregister_hint(name: str) -> None:
    """Remove a registered hint kind (tests register toy kinds and clean up after themselves)."""
    del _HINT_KINDS[name]
    _refresh_names()


def hint_kind(name: str) -> HintKind:
    """The registered hint kind `name`; a user error listing the valid names otherwise."""
    if name not in _HINT_KINDS:
        raise IterkdError(f"unknown --hint {name!r}; choose one of {', '.join(HINTS)}")
    return _HINT_KINDS[name]


def _refresh_names() -> None:
    global HINTS
    HINTS = (*_HINT_KINDS, "none")
    DEFAULT_HINT_WEIGHT.clear()
    DEFAULT_HINT_WEIGHT.update({k.name: k.default_weight for k in _HINT_KINDS.values()}, none=0.0)


def fp32_loss(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Decorator: compute `fn` in fp32 even under autocast. Its floating tensor arguments (also in
    lists) are cast up and autocast is off inside: under bf16 autocast a matmul runs in bf16 even on
    fp32 inputs, which put SP's Gram matrices ~0.4 % off; losses are small next to the model's passes."""

    @functools.wraps(fn)
    def in_fp32(*args: Any, **kwargs: Any) -> torch.Tensor:
        args, kwargs = tuple(map(_fp32, args)), {k: _fp32(v) for k, v in kwargs.items()}
        device = next(t.device.type for t in _tensors([*args, *kwargs.values()]))
        if not torch.is_autocast_enabled(device):  # nested or plain fp32: skip the context's ~10 us
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return in_fp32


def _fp32(value: Any) -> Any:
    if type(value) in (list, tuple):  # several teachers' logits
        return type(value)(map(_fp32, value))
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _tensors(values: list[Any]):
    for v in values:
        if type(v) in (list, tuple):
            yield from _tensors(list(v))
        elif isinstance(v, torch.Tensor):
            yield v


@dataclass(frozen=True)
class LossWeights:
    """alpha weighs KD against CE (alpha=0: labels only); temperature softens both distributions
    (Hinton et al. 2015 use 2-20; 4 is common for CIFAR-scale data); hint_weight scales the hint
    term of kind `hint` (0 or 'none' disables it)."""

    alpha: float = 0.9
    temperature: float = 4.0
    hint_weight: float = 1.0
    hint: str = "fitnet"

    def __post_init__(self):
        if self.hint != "none":
            hint_kind(self.hint)  # raises the user error listing the registered kinds
        if not 0.0 <= self.alpha <= 1.0:
            raise IterkdError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise IterkdError(f"--temperature must be > 0, got {self.temperature}")
        if not self.hint_weight >= 0:
            raise IterkdError(f"--hint-weight must be >= 0, got {self.hint_weight}")


@fp32_loss
def teacher_probs(
    teacher_logits: list[torch.Tensor], temperature: float, weights: list[float] | None = None
) -> torch.Tensor:
    """Temperature-softened target distribution; several teachers are averaged in probability
    space (optionally weighted), so one teacher is the plain Hinton target."""
    probs = torch.stack([F.softmax(t / temperature, dim=1) for t in teacher_logits])
    if weights is None:
        return probs.mean(0)
    w = torch.as_tensor(weights, dtype=probs.dtype, device=probs.device)
    return (probs * (w / w.sum()).view(-1, 1, 1)).sum(0)


@fp32_loss
def kd_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on softened outputs, times T^2 so its gradients keep the scale of
    the CE term as T changes (Hinton et al. 2015, section 2)."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_p, target_probs, reduction="batchmean") * temperature**2


@fp32_loss
def hint_loss(regressed: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """FitNets hint: mean squared error between the regressed student map and the teacher's."""
    return F.mse_loss(regressed, teacher_feat)


@fp32_loss
def similarity_matrix(feat: torch.Tensor) -> torch.Tensor:
    """b x b matrix of a batch's activations: G = Q Q^T with Q the batch flattened to b x (c*h*w),
    each row then L2-normalised (Tung & Mori 2019, eq. 1-2). G does not depend on the order of a
    sample's values, so a channels-last map is flattened in memory order: a view, not a copy
    (a quarter of SP's cost for the bench child's hint)."""
    if feat.dim() == 4 and feat.is_contiguous(memory_format=torch.channels_last):
        feat = feat.permute(0, 2, 3, 1)
    q = feat.flatten(1)
    return F.normalize(q @ q.t(), p=2, dim=1)


@fp32_loss
def sp_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving distillation loss for one pair of blocks: ||G_S - G_T||_F^2 / b^2
    (Tung & Mori 2019, eq. 3). Channels and spatial sizes may differ; only the batch must match."""
    b = student_feat.shape[0]
    diff = similarity_matrix(student_feat) - similarity_matrix(teacher_feat)
    return (diff * diff).sum() / (b * b)


# The two built-in kinds, in the order --hint lists them.
@register_hint("fitnet", default_weight=1.0, regressor=HintRegressor)
def fitnet_hint(student_feat: torch.Tensor, teacher_feat: torch.Tensor, regressor: nn.Module) -> torch.Tensor:
    """FitNets (Romero et al. 2015): the student map through the regressor (channels, then spatial
    size) against the teacher's. Its MSE is of order 1, comparable with KD: default weight 1."""
    return hint_loss(regressor(student_feat, teacher_feat.shape[-2:]), teacher_feat)


@register_hint("sp", default_weight=3000.0)
def sp_hint(student_feat: torch.Tensor, teacher_feat: torch.Tensor, regressor: None) -> torch.Tensor:
    """Similarity-preserving: no regressor, maps of any channels and size. The loss is divided by
    b^2 and so tiny; Tung & Mori weigh it by gamma = 3000 (their CIFAR-10 setting)."""
    return sp_loss(student_feat, teacher_feat)


@fp32_loss
def composite_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    weights: LossWeights,
    target_probs: torch.Tensor | None = None,
    hint: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss of one batch; without teachers it is plain cross-entropy."""
    ce = F.cross_entropy(student_logits, labels)
    if target_probs is None:
        return ce
    total = (
        weights.alpha * kd_loss(student_logits, target_probs, weights.temperature) + (1 - weights.alpha) * ce
    )
    if hint is not None and weights.hint_weight > 0:
        total = total + weights.hint_weight * hint
    return total
