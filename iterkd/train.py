"""One training function for the root (labels only) and every child (teachers + labels + hint).

Reads top to bottom: settings -> optimiser and schedule -> epochs of device-resident batches ->
validation each epoch -> final validation/test accuracy. Teachers run in eval mode without grad:
`teacher_targets` is what they say about a batch (with a teacher cache their logits are looked up
instead of computed), `active_hint` the hint term of the kind the loss settings name.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .cache import TeacherCache
from .data import DataSplits, epoch_view, eval_batch_size, eval_batches, train_batches
from .device import autocast, compile_mode, memory_format, resolve_precision
from .errors import TrainingDiverged
from .faults import fault_point
from .losses import HintKind, LossWeights, composite_loss, hint_kind, teacher_probs
from .models import VGG, hint_blocks


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
    views: int | None = (
        None  # augmentation views cycled through (epoch e uses e mod views); None: one per epoch
    )
    augment_seed: int | None = None  # seed of the crops and flips (default: seed); shared by siblings
    compile: str = "off"  # torch.compile mode, or auto (see device.compile_mode)
    precision: str = "auto"  # auto, fp32 or bf16 autocast (see device.resolve_precision)


@dataclass
class TrainResult:
    val_acc: float  # percent
    test_acc: float  # percent
    seconds: float
    epochs: int
    history: list[float]  # validation accuracy after each epoch
    images_per_s: float
    epoch_seconds: list[float] = field(
        default_factory=list
    )  # training steps only: no validation, no cache filling
    losses: list[float] = field(default_factory=list)  # mean training loss of each epoch
    cache_hit_rate: float | None = (
        None  # share of teacher-output lookups already used before (None: no cache)
    )
    precision: str | None = None  # what training ran in: "fp32" or "bf16" (None: nothing was trained)


@torch.no_grad()
def evaluate(
    model: VGG, x: torch.Tensor, y: torch.Tensor, data: DataSplits, precision: str = "auto"
) -> float:
    """Top-1 accuracy in percent."""
    return evaluate_ensemble([model], x, y, data, precision)


@torch.no_grad()
def evaluate_ensemble(
    models: Sequence[VGG], x: torch.Tensor, y: torch.Tensor, data: DataSplits, precision: str = "auto"
) -> float | None:
    """Top-1 accuracy in percent of the models' averaged probabilities (softmax keeps the order of
    the logits, so one model scores as its own argmax); None when there are no images (a folder
    without test/ has no test accuracy)."""
    if len(y) == 0:
        return None
    # Buffers too: a frozen TorchScript teacher (torch.jit.freeze) may hold no parameter at all.
    device = next(itertools.chain(models[0].parameters(), models[0].buffers())).device
    states = [m.training for m in models]
    for m in models:
        m.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)  # summed on the device: one sync at the end
    with autocast(device, precision):
        for xb, yb in eval_batches(x, y, data.info):
            xb = xb.contiguous(memory_format=memory_format(device))
            probs = torch.stack([m(xb).float().softmax(1) for m in models]).mean(0)
            correct += (probs.argmax(1) == yb).sum()
    for m, was_training in zip(models, states):
        m.train(was_training)
    return 100.0 * correct.item() / max(1, len(y))


@torch.no_grad()
def recalibrate_bn(model: VGG, data: DataSplits, images: int = 2048, precision: str = "auto") -> None:
    """Re-estimate BN running statistics from the first `images` training images (un-augmented,
    exact averages), leaving every weight alone: a child's inherited statistics describe its parent."""
    device = next(model.parameters()).device
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    with autocast(device, precision):
        # 1000 a batch: with momentum None every batch weighs the same, so the size is part of the result.
        for xb, _ in eval_batches(
            data.train_x[:images], data.train_y[:images], data.info, eval_batch_size(data.info, 1000)
        ):
            model(xb.contiguous(memory_format=memory_format(device)))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.eval()


@dataclass
class ActiveHint:
    """The hint term of one training run: block `student_block` of the student against block
    `teacher_block` of `teacher`, scored by the registered kind (through its regressor, if any)."""

    kind: HintKind
    teacher: VGG
    student_block: int
    teacher_block: int
    regressor: nn.Module | None
    teacher_pos: (
        int | None
    )  # the hint teacher's place among the live teachers: its forward gives the features
    cache: TeacherCache | None = None  # the hint teacher's cache, when it serves this block's features

    def __call__(self, student_feats: list[torch.Tensor], teacher_feat: torch.Tensor) -> torch.Tensor:
        return self.kind.loss(student_feats[self.student_block], teacher_feat, self.regressor)

    def parameters(self) -> list[torch.Tensor]:
        """What trains with the student: the regressor's weights, if the kind has one."""
        return [] if self.regressor is None else list(self.regressor.parameters())


def active_hint(
    model: VGG,
    hint_teacher: VGG | None,
    teachers: Sequence[VGG],
    loss: LossWeights,
    device: torch.device,
    caches: Sequence[TeacherCache] = (),
) -> ActiveHint | None:
    """The hint `loss.hint` names between `model` and `hint_teacher` (on `device`), or None when
    there is none to give: no hint teacher, no teachers at all, hint 'none' or weight 0. When the
    hint teacher teaches through a cache (`caches`, one per teacher) that holds its hint block's
    outputs, they come from there (no teacher forward at all); else the teacher runs to that block."""
    if hint_teacher is None or not teachers or loss.hint == "none" or loss.hint_weight <= 0:
        return None
    kind = hint_kind(loss.hint)
    s_block, t_block = hint_blocks(model.spec, hint_teacher.spec)
    regressor = None
    if kind.regressor is not None:
        s_ch = model.spec.block_output_shapes()[s_block][0]
        t_ch = hint_teacher.spec.block_output_shapes()[t_block][0]
        regressor = kind.regressor(s_ch, t_ch).to(device)
    hint_teacher.to(device, memory_format=memory_format(device)).eval().requires_grad_(False)
    pos = next((i for i, t in enumerate(teachers) if t is hint_teacher), None)
    cache = caches[pos] if caches and pos is not None else None
    if cache is not None and not cache.cache_features(t_block):  # over its size bound: live hint
        cache = None
    return ActiveHint(kind, hint_teacher, s_block, t_block, regressor, pos, cache)


@torch.no_grad()
def teacher_targets(
    x: torch.Tensor,
    idx: torch.Tensor,
    view: int,
    teachers: Sequence[VGG],
    cache: Sequence[TeacherCache],
    hint: ActiveHint | None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """What the teachers say about batch `x` (samples `idx` in augmentation `view`): each teacher's
    logits, and the hint teacher's block output when a hint is active (else None)."""
    if cache:  # stored soft labels: a gather instead of a teacher forward
        logits = [c.logits(idx, view) for c in cache]
        outs = []
    else:
        outs = [t.forward_features(x) for t in teachers]
        logits = [o[0] for o in outs]
    if hint is None:
        return logits, None
    if hint.cache is not None:  # stored block outputs: a gather, no teacher forward at all
        return logits, hint.cache.features(idx, view, hint.teacher_block)
    if outs and hint.teacher_pos is not None:  # the hint teacher already ran in full
        return logits, outs[hint.teacher_pos][1][hint.teacher_block]
    return logits, hint.teacher.block_output(x, hint.teacher_block)  # runs no block after the hint's


def finite_loss(value: float, where: str, desc: str) -> float:
    """`value`, or TrainingDiverged when it is NaN or infinite (the node fails, the search goes on)."""
    if not math.isfinite(value):
        raise TrainingDiverged(f"{desc}: loss became {value} {where}")
    return value


def sgd(params: list[torch.Tensor], settings: TrainSettings) -> torch.optim.SGD:
    """SGD with Nesterov momentum, all parameters updated by one fused kernel (CUDA, and CPU since
    PyTorch 2.4): on CPU 3x faster than the foreach kernels it replaces there (0.08 against 0.25 ms
    a step for the 71.6k-param child, 0.23 against 0.72 for the quick root), the same update up to
    float rounding."""
    return torch.optim.SGD(
        params,
        lr=settings.lr,
        momentum=settings.momentum,
        nesterov=True,
        weight_decay=settings.weight_decay,
        fused=True,
    )


def train(
    model: VGG,
    data: DataSplits,
    settings: TrainSettings,
    *,
    teachers: Sequence[VGG] = (),
    teacher_weights: list[float] | None = None,
    hint_teacher: VGG | None = None,
    teacher_cache: Sequence[TeacherCache] = (),
    on_epoch: Callable[[int, float], None] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> TrainResult:
    """Train `model` in place on `data` (already on the target device) and return its accuracies.

    With `teachers` the loss is alpha*KD + (1-alpha)*CE (+ the `settings.loss.hint` term between
    `hint_teacher` and the student, of a kind from the hint registry in `losses`); without, plain
    CE. `teacher_cache`, one per teacher in the same order, replaces the teachers' forward
    passes by lookups, the hint's too when the hint teacher is one of them and its block's outputs
    fit the cache's bound (else the hint teacher runs only up to its hint block). `on_epoch(epoch,
    val_acc)` may raise to stop training (e.g. Optuna pruning), or return True to end it after
    this epoch with the weights it has (a converged child); the result's `epochs` is the number
    trained. Raises TrainingDiverged when the loss becomes NaN/inf."""
    device = data.train_x.device
    fmt = memory_format(device)
    precision = resolve_precision(settings.precision, device)
    torch.manual_seed(settings.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = (
            True  # same shapes every step: cuDNN times its kernels once, keeps the fastest
        )
    model.to(device, memory_format=fmt).train()
    for t in teachers:
        t.to(device, memory_format=fmt).eval().requires_grad_(False)
    augment_seed = settings.seed if settings.augment_seed is None else settings.augment_seed
    if teacher_cache and (
        len(teacher_cache) != len(teachers)
        or not settings.augment
        or any(
            (c.seed, c.views, c.n) != (augment_seed, settings.views, len(data.train_x)) for c in teacher_cache
        )
    ):
        raise ValueError(
            "the teacher cache must hold one entry per teacher, built for this training set's "
            "augment_seed and views"
        )
    # After manual_seed: a regressor's random init is the same for the same seed.
    hint = active_hint(model, hint_teacher, teachers, settings.loss, device, teacher_cache)
    # Copied to the device once, not in every step.
    weights = None if teacher_weights is None else torch.tensor(teacher_weights, device=device)

    opt = sgd(list(model.parameters()) + (hint.parameters() if hint else []), settings)
    n = len(data.train_x)
    steps_per_epoch = max(1, n // settings.batch_size) if n >= settings.batch_size else 1
    total_steps = settings.epochs * steps_per_epoch
    # Warm-up over a quarter of the steps, but over 1.5 at least: OneCycleLR divides by zero at exactly one.
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=settings.lr,
        total_steps=total_steps,
        pct_start=0.25 if total_steps == 1 else max(0.25, 1.5 / total_steps),
    )
    mode = compile_mode(settings.compile, device, model.spec)
    # Compiled forward (CUDA graphs for small, launch-bound models); batches always have the same shape.
    forward = torch.compile(model.forward_features, mode=mode) if mode else model.forward_features

    lookups_before = [c.counts() for c in teacher_cache]
    history, losses, epoch_seconds, images, start = [], [], [], 0, time.perf_counter()
    bar = tqdm(
        total=total_steps,
        desc=desc,
        unit="step",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    try:
        for epoch in range(settings.epochs):
            view = epoch_view(epoch, settings.views)
            for c in teacher_cache:  # the first epoch on a view runs the teacher over every sample once
                c.ensure_view(view, hint.teacher_block if hint and hint.cache is c else None)
            epoch_start = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for step, (idx, x, y) in enumerate(
                train_batches(
                    data,
                    settings.batch_size,
                    epoch,
                    settings.seed,
                    views=settings.views,
                    augmented=settings.augment,
                    augment_seed=settings.augment_seed,
                )
            ):
                if step == steps_per_epoch // 2:
                    fault_point("mid-epoch")  # crash tests (iterkd.faults); a no-op otherwise
                x = x.contiguous(memory_format=fmt)
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are dead
                with autocast(device, precision):
                    logits, feats = forward(x)
                    t_logits, t_feat = teacher_targets(x, idx, view, teachers, teacher_cache, hint)
                    target = teacher_probs(t_logits, settings.loss.temperature, weights) if teachers else None
                    loss = composite_loss(
                        logits, y, settings.loss, target, hint(feats, t_feat) if hint else None
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach()
                images += len(y)
                bar.update(1)
                if step % 20 == 0:  # one host sync every 20 steps: NaN check + progress text
                    value = finite_loss(loss.item(), f"at epoch {epoch + 1}, step {step}", desc)
                    bar.set_postfix(loss=f"{value:.3f}", epoch=epoch + 1)
            # .item() waits for the device: the epoch's steps are done
            mean_loss = finite_loss(loss_sum.item() / steps_per_epoch, f"in epoch {epoch + 1}", desc)
            epoch_seconds.append(time.perf_counter() - epoch_start)
            losses.append(mean_loss)
            val = evaluate(model, data.val_x, data.val_y, data, precision)
            history.append(val)
            bar.set_postfix(loss=f"{mean_loss:.3f}", val=f"{val:.2f}%", epoch=epoch + 1)
            if on_epoch is not None and on_epoch(epoch, val):
                break
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    test = evaluate(model, data.test_x, data.test_y, data, precision)
    return TrainResult(
        history[-1],
        test,
        seconds,
        len(history),
        history,
        images / max(seconds, 1e-9),
        epoch_seconds,
        losses,
        _hit_rate(lookups_before, [c.counts() for c in teacher_cache]),
        precision,
    )


def _hit_rate(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> float | None:
    lookups = sum(a[0] - b[0] for a, b in zip(after, before))
    misses = sum(a[1] - b[1] for a, b in zip(after, before))
    return None if not lookups else 1 - misses / lookups
