"""train(): the hint term a student gets, and the ensemble accuracy a root made of several models has."""
from __future__ import annotations

import pytest
import torch

from iterkd.arch import VGGSpec
from iterkd.data import load_data, normalize
from iterkd.losses import LossWeights
from iterkd.models import VGG
from iterkd.train import TrainSettings, evaluate, evaluate_ensemble, train

TEACHER = VGGSpec(((8,), (16,), (16,)), in_channels=3, num_classes=10, input_size=16)
STUDENT = VGGSpec(((4,), (8,)), in_channels=3, num_classes=10, input_size=16)


@pytest.fixture(scope="module")
def data():
    return load_data("synthetic", None, val_size=400, train_subset=600, seed=0)


def _student_losses(data, hint: str, weight: float) -> list[float]:
    torch.manual_seed(0)
    teacher = VGG(TEACHER)
    student = VGG(STUDENT)
    settings = TrainSettings(epochs=1, batch_size=100, loss=LossWeights(0.9, 4.0, weight, hint), augment=False)
    return train(student, data, settings, teachers=[teacher], hint_teacher=teacher, progress=False).losses


def test_each_hint_kind_adds_its_own_term_to_the_loss(data):
    none = _student_losses(data, "none", 5.0)
    assert _student_losses(data, "fitnet", 0.0) == none  # weight 0 is no hint at all
    fitnet, sp = _student_losses(data, "fitnet", 5.0), _student_losses(data, "sp", 5.0)
    assert fitnet[0] > none[0] and sp[0] > none[0] and fitnet != sp


def test_an_ensemble_is_scored_on_its_averaged_probabilities(data):
    torch.manual_seed(0)
    a, b = VGG(TEACHER).eval(), VGG(STUDENT).eval()
    with torch.no_grad():
        x = normalize(data.val_x, data.info)
        probs = (a(x).softmax(1) + b(x).softmax(1)) / 2
    expected = 100.0 * (probs.argmax(1) == data.val_y).float().mean().item()
    assert evaluate_ensemble([a, b], data.val_x, data.val_y, data) == pytest.approx(expected)
    assert evaluate_ensemble([a], data.val_x, data.val_y, data) == evaluate(a, data.val_x, data.val_y, data)
