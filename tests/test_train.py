"""train(): the hint term a student gets (any registered kind), what the teachers say about a batch,
and the ensemble accuracy a root made of several models has."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from iterkd import device, losses
from iterkd.arch import VGGSpec
from iterkd.data import load_data, normalize
from iterkd.errors import IterkdError
from iterkd.losses import LossWeights, register_hint, unregister_hint
from iterkd.models import VGG
from iterkd.train import TrainSettings, active_hint, evaluate, evaluate_ensemble, teacher_targets, train

TEACHER = VGGSpec(((8,), (16,), (16,)), in_channels=3, num_classes=10, input_size=16)
STUDENT = VGGSpec(((4,), (8,)), in_channels=3, num_classes=10, input_size=16)


@pytest.fixture(scope="module")
def data():
    return load_data("synthetic", None, val_size=400, train_subset=600, seed=0)


def _student_losses(data, hint: str, weight: float) -> list[float]:
    torch.manual_seed(0)
    teacher = VGG(TEACHER)
    student = VGG(STUDENT)
    settings = TrainSettings(
        epochs=1, batch_size=100, loss=LossWeights(0.9, 4.0, weight, hint), augment=False
    )
    return train(student, data, settings, teachers=[teacher], hint_teacher=teacher, progress=False).losses


def test_each_hint_kind_adds_its_own_term_to_the_loss(data):
    none = _student_losses(data, "none", 5.0)
    assert _student_losses(data, "fitnet", 0.0) == none  # weight 0 is no hint at all
    fitnet, sp = _student_losses(data, "fitnet", 5.0), _student_losses(data, "sp", 5.0)
    assert fitnet[0] > none[0] and sp[0] > none[0] and fitnet != sp


def test_a_third_hint_kind_is_one_registered_function(data):
    """A toy kind with its own regressor: pooled student channels mapped linearly onto the teacher's."""
    seen = {}

    def pooled_regressor(student_channels: int, teacher_channels: int) -> torch.nn.Module:
        seen["regressor"] = torch.nn.Linear(student_channels, teacher_channels)
        seen["init"] = seen["regressor"].weight.detach().clone()
        return seen["regressor"]

    @register_hint("pooled", default_weight=2.0, regressor=pooled_regressor)
    def pooled(student_feat, teacher_feat, regressor):
        term = (regressor(student_feat.mean((2, 3))) - teacher_feat.mean((2, 3))).pow(2).mean()
        seen.setdefault("shapes", (student_feat.shape, teacher_feat.shape))
        seen.setdefault("term", term.item())
        return term

    try:
        assert (
            losses.HINTS == ("fitnet", "sp", "pooled", "none") and losses.DEFAULT_HINT_WEIGHT["pooled"] == 2.0
        )
        base, hinted = _train_one_step(data, "none"), _train_one_step(data, "pooled")
    finally:
        unregister_hint("pooled")
    # Student block 0 (4 channels, 8x8 after its pool) against teacher block 1 (16 channels, 4x4).
    assert seen["shapes"] == (torch.Size([600, 4, 8, 8]), torch.Size([600, 16, 4, 4]))
    assert hinted == pytest.approx(
        base + 5.0 * seen["term"], rel=1e-5
    )  # the trainer adds weight x the kind's term
    assert not torch.equal(
        seen["regressor"].weight.detach(), seen["init"]
    )  # the regressor trained with the student
    assert "pooled" not in losses.HINTS and "pooled" not in losses.DEFAULT_HINT_WEIGHT
    with pytest.raises(IterkdError, match="unknown --hint 'pooled'; choose one of fitnet, sp, none$"):
        LossWeights(hint="pooled")


def _train_one_step(data, hint: str) -> float:
    """The loss of one step on the whole training set, before any update (same student, same teacher)."""
    torch.manual_seed(0)
    teacher, student = VGG(TEACHER), VGG(STUDENT)
    settings = TrainSettings(
        epochs=1, batch_size=len(data.train_x), loss=LossWeights(0.9, 4.0, 5.0, hint), augment=False
    )
    return train(student, data, settings, teachers=[teacher], hint_teacher=teacher, progress=False).losses[0]


def test_teacher_targets_are_the_teachers_logits_and_the_hint_teachers_block_output(data):
    torch.manual_seed(0)
    a, b, student = VGG(TEACHER).eval(), VGG(TEACHER).eval(), VGG(STUDENT)
    x, idx = normalize(data.val_x[:8], data.info), torch.arange(8)
    with torch.no_grad():
        block = a.block_output(x, 1)
        expected = [a(x), b(x)]
    loss = LossWeights(hint="sp", hint_weight=1.0)
    for teachers in ([a, b], [b, a], [b]):  # the hint teacher first, second, or not teaching at all
        hint = active_hint(student, a, teachers, loss, torch.device("cpu"))
        assert (hint.student_block, hint.teacher_block, hint.regressor) == (0, 1, None)
        logits, feat = teacher_targets(x, idx, 0, teachers, (), hint)
        assert all(
            torch.allclose(got, expected[[a, b].index(t)], atol=1e-6) for got, t in zip(logits, teachers)
        )
        assert torch.allclose(feat, block, atol=1e-6) and len(logits) == len(teachers)
    assert teacher_targets(x, idx, 0, [a], (), None)[1] is None  # no hint: no features
    for off in (LossWeights(hint="none"), LossWeights(hint="fitnet", hint_weight=0.0)):
        assert active_hint(student, a, [a], off, torch.device("cpu")) is None
    assert active_hint(student, a, [], loss, torch.device("cpu")) is None  # labels only: no hint either


def test_an_ensemble_is_scored_on_its_averaged_probabilities(data):
    torch.manual_seed(0)
    a, b = VGG(TEACHER).eval(), VGG(STUDENT).eval()
    with torch.no_grad():
        x = normalize(data.val_x, data.info)
        probs = (a(x).softmax(1) + b(x).softmax(1)) / 2
    expected = 100.0 * (probs.argmax(1) == data.val_y).float().mean().item()
    assert evaluate_ensemble([a, b], data.val_x, data.val_y, data) == pytest.approx(expected)
    assert evaluate_ensemble([a], data.val_x, data.val_y, data) == evaluate(a, data.val_x, data.val_y, data)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_runs_in_the_precision_asked_for_with_finite_losses_and_learns(data, monkeypatch, precision):
    """The probe says AMX, where auto would take bf16: explicit fp32 must still never autocast, and
    bf16 is allowed whatever the real CPU (emulated, it is slow but has the same dtypes)."""
    monkeypatch.setattr(device, "cpu_bf16_kind", lambda flags=None: "amx")
    torch.manual_seed(0)
    teacher, student = VGG(TEACHER), VGG(STUDENT)
    seen = []  # (autocast on, dtype of the student's logits) at every training forward
    student.head.register_forward_hook(
        lambda m, i, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
    )
    settings = TrainSettings(epochs=3, batch_size=50, precision=precision, augment=False)
    labels_only = train(student, data, settings, progress=False)
    autocasts = precision == "bf16"
    assert labels_only.precision == precision
    assert set(seen) == {(autocasts, torch.bfloat16 if autocasts else torch.float32)}
    assert (
        all(math.isfinite(v) for v in labels_only.losses) and labels_only.losses[-1] < labels_only.losses[0]
    )
    assert labels_only.val_acc > 25  # ten classes: chance is 10 %
    assert student.blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)  # on CPU too
    distilled = train(
        VGG(STUDENT),
        data,
        replace(settings, epochs=1, loss=LossWeights(hint="fitnet")),
        teachers=[teacher],
        hint_teacher=teacher,
        progress=False,
    )
    assert math.isfinite(distilled.losses[0]) and 0 <= distilled.test_acc <= 100


def test_auto_precision_is_recorded_as_what_it_resolved_to(data, monkeypatch):
    for kind, resolved in (("amx", "bf16"), (None, "fp32")):
        monkeypatch.setattr(device, "cpu_bf16_kind", lambda flags=None, kind=kind: kind)
        torch.manual_seed(0)
        assert (
            train(VGG(STUDENT), data, TrainSettings(epochs=1, batch_size=100), progress=False).precision
            == resolved
        )
    with pytest.raises(IterkdError, match="--precision bf16"):  # the probe still finds no native bf16
        train(VGG(STUDENT), data, TrainSettings(epochs=1, precision="bf16"), progress=False)
