"""The composite distillation loss: Hinton KD + cross-entropy + FitNets hint.

total = alpha * KD + (1 - alpha) * CE + hint_weight * hint
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import IterkdError


@dataclass(frozen=True)
class LossWeights:
    """alpha weighs KD against CE (alpha=0: labels only); temperature softens both distributions
    (Hinton et al. 2015 use 2-20; 4 is common for CIFAR-scale data); hint_weight scales the
    FitNets MSE term (0 disables it)."""

    alpha: float = 0.9
    temperature: float = 4.0
    hint_weight: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise IterkdError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise IterkdError(f"--temperature must be > 0, got {self.temperature}")
        if not self.hint_weight >= 0:
            raise IterkdError(f"--hint-weight must be >= 0, got {self.hint_weight}")


def teacher_probs(teacher_logits: list[torch.Tensor], temperature: float,
                  weights: list[float] | None = None) -> torch.Tensor:
    """Temperature-softened target distribution; several teachers are averaged in probability
    space (optionally weighted), so one teacher is the plain Hinton target."""
    probs = torch.stack([F.softmax(t.float() / temperature, dim=1) for t in teacher_logits])
    if weights is None:
        return probs.mean(0)
    w = torch.as_tensor(weights, dtype=probs.dtype, device=probs.device)
    return (probs * (w / w.sum()).view(-1, 1, 1)).sum(0)


def kd_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on softened outputs, times T^2 so its gradients keep the scale of
    the CE term as T changes (Hinton et al. 2015, section 2)."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_p, target_probs, reduction="batchmean") * temperature**2


def hint_loss(regressed: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """FitNets hint: mean squared error between the regressed student map and the teacher's."""
    return F.mse_loss(regressed.float(), teacher_feat.float())


def composite_loss(student_logits: torch.Tensor, labels: torch.Tensor, weights: LossWeights,
                   target_probs: torch.Tensor | None = None,
                   hint: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of one batch; without teachers it is plain cross-entropy."""
    ce = F.cross_entropy(student_logits.float(), labels)
    if target_probs is None:
        return ce
    total = weights.alpha * kd_loss(student_logits, target_probs, weights.temperature) + (1 - weights.alpha) * ce
    if hint is not None and weights.hint_weight > 0:
        total = total + weights.hint_weight * hint
    return total
