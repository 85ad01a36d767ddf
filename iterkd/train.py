"""One training function for the root (labels only) and every child (teachers + labels + hint).

Reads top to bottom: settings -> optimiser and schedule -> epochs of device-resident batches ->
validation each epoch -> final validation/test accuracy. Teachers run in eval mode without grad.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .data import DataSplits, eval_batches, train_batches
from .errors import IterkdError, TrainingDiverged
from .losses import LossWeights, composite_loss, hint_loss, teacher_probs
from .models import VGG, HintRegressor, hint_blocks


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05  # peak of the one-cycle schedule, for SGD+Nesterov at this batch size
    weight_decay: float = 5e-4
    momentum: float = 0.9
    loss: LossWeights = field(default_factory=LossWeights)
    seed: int = 0
    augment: bool = True


@dataclass
class TrainResult:
    val_acc: float  # percent
    test_acc: float  # percent
    seconds: float
    epochs: int
    history: list[float]  # validation accuracy after each epoch
    images_per_s: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise IterkdError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise IterkdError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def _autocast(device: torch.device):
    # bf16 autocast on GPUs: tensor-core speed without loss scaling; on CPU fp32 is faster for these convs.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(model: VGG, x: torch.Tensor, y: torch.Tensor, data: DataSplits) -> float:
    """Top-1 accuracy in percent."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with _autocast(device):
        for xb, yb in eval_batches(x, y, data.info):
            correct += (model(xb.contiguous(memory_format=_memory_format(device))).argmax(1) == yb).sum()
    model.train(was_training)
    return 100.0 * correct.item() / max(1, len(y))


def _memory_format(device: torch.device):
    # channels_last lets cuDNN pick NHWC tensor-core kernels; on CPU it brings nothing here.
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def train(model: VGG, data: DataSplits, settings: TrainSettings, *, teachers: list[VGG] = (),
          teacher_weights: list[float] | None = None, hint_teacher: VGG | None = None,
          on_epoch: Callable[[int, float], None] | None = None, desc: str = "train",
          progress: bool = True) -> TrainResult:
    """Train `model` in place on `data` (already on the target device) and return its accuracies.

    With `teachers` the loss is alpha*KD + (1-alpha)*CE (+ hint from `hint_teacher`); without,
    plain CE. `on_epoch(epoch, val_acc)` may raise to stop training (e.g. Optuna pruning).
    Raises TrainingDiverged when the loss becomes NaN/inf."""
    device = data.train_x.device
    torch.manual_seed(settings.seed)
    model.to(device, memory_format=_memory_format(device)).train()
    for t in teachers:
        t.to(device, memory_format=_memory_format(device)).eval().requires_grad_(False)

    regressor, hint_idx = None, None
    if hint_teacher is not None and settings.loss.hint_weight > 0 and teachers:
        hint_idx = hint_blocks(model.spec, hint_teacher.spec)
        s_ch = model.spec.block_output_shapes()[hint_idx[0]][0]
        t_ch = hint_teacher.spec.block_output_shapes()[hint_idx[1]][0]
        regressor = HintRegressor(s_ch, t_ch).to(device)

    params = list(model.parameters()) + (list(regressor.parameters()) if regressor else [])
    # foreach/fused kernels: one launch for all parameters instead of one per tensor (matters on GPU).
    opt = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, nesterov=True,
                          weight_decay=settings.weight_decay, foreach=True)
    n = len(data.train_x)
    steps_per_epoch = max(1, n // settings.batch_size) if n >= settings.batch_size else 1
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, epochs=settings.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.25)
    history, images, start = [], 0, time.perf_counter()
    bar = tqdm(total=settings.epochs * steps_per_epoch, desc=desc, unit="step", disable=not progress,
               leave=False, dynamic_ncols=True, mininterval=0.5)
    try:
        for epoch in range(settings.epochs):
            loss_sum = torch.zeros((), device=device)
            for step, (_, x, y) in enumerate(train_batches(data, settings.batch_size, epoch, settings.seed,
                                                           augmented=settings.augment)):
                x = x.contiguous(memory_format=_memory_format(device))
                with _autocast(device):
                    logits, feats = model.forward_features(x)
                    target, hint = None, None
                    if teachers:
                        with torch.no_grad():
                            outs = [t.forward_features(x) for t in teachers]
                        target = teacher_probs([o[0] for o in outs], settings.loss.temperature, teacher_weights)
                        if regressor is not None:
                            t_feat = outs[list(teachers).index(hint_teacher)][1][hint_idx[1]] \
                                if hint_teacher in teachers else hint_teacher.forward_features(x)[1][hint_idx[1]]
                            hint = hint_loss(regressor(feats[hint_idx[0]], t_feat.shape[-2:]), t_feat)
                    loss = composite_loss(logits, y, settings.loss, target, hint)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach()
                images += len(y)
                bar.update(1)
                if step % 20 == 0:  # one host sync every 20 steps: NaN check + progress text
                    value = loss.item()
                    if not math.isfinite(value):
                        raise TrainingDiverged(f"{desc}: loss became {value} at epoch {epoch + 1}, step {step}")
                    bar.set_postfix(loss=f"{value:.3f}", epoch=epoch + 1)
            mean_loss = loss_sum.item() / steps_per_epoch
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(f"{desc}: loss became {mean_loss} in epoch {epoch + 1}")
            val = evaluate(model, data.val_x, data.val_y, data)
            history.append(val)
            bar.set_postfix(loss=f"{mean_loss:.3f}", val=f"{val:.2f}%", epoch=epoch + 1)
            if on_epoch is not None:
                on_epoch(epoch, val)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    test = evaluate(model, data.test_x, data.test_y, data)
    return TrainResult(history[-1], test, seconds, settings.epochs, history, images / max(seconds, 1e-9))
