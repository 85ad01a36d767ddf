import math

import pytest
import torch

from iterkd import losses
from iterkd.errors import IterkdError
from iterkd.losses import (
    LossWeights,
    composite_loss,
    hint_kind,
    hint_loss,
    kd_loss,
    register_hint,
    similarity_matrix,
    sp_loss,
    teacher_probs,
)
from iterkd.models import HintRegressor


def softmax(xs, t):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def test_kd_loss_is_t_squared_kl_of_softened_distributions():
    s, t, T = [1.0, 0.0, -1.0], [2.0, -1.0, 0.5], 2.0
    p_t, p_s = softmax(t, T), softmax(s, T)
    expected = T**2 * sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    got = kd_loss(torch.tensor([s]), teacher_probs([torch.tensor([t])], T), T)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_is_zero_when_student_matches_teacher_and_averages_over_batch():
    logits = torch.tensor([[3.0, 1.0], [0.5, 0.2]])
    assert kd_loss(logits, teacher_probs([logits], 4.0), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    one = kd_loss(torch.tensor([[1.0, 0.0]]), teacher_probs([torch.tensor([[0.0, 1.0]])], 1.0), 1.0)
    two = kd_loss(torch.tensor([[1.0, 0.0]] * 2), teacher_probs([torch.tensor([[0.0, 1.0]] * 2)], 1.0), 1.0)
    assert one.item() == pytest.approx(two.item())


def test_several_teachers_average_probabilities_optionally_weighted():
    a, b = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    pa, pb = softmax([2.0, 0.0], 1.0), softmax([0.0, 2.0], 1.0)
    mean = teacher_probs([a, b], 1.0)
    assert mean[0].tolist() == pytest.approx([(pa[0] + pb[0]) / 2, (pa[1] + pb[1]) / 2])
    weighted = teacher_probs([a, b], 1.0, weights=[3.0, 1.0])
    assert weighted[0, 0].item() == pytest.approx(0.75 * pa[0] + 0.25 * pb[0])


def test_hint_loss_is_mean_squared_error():
    assert hint_loss(torch.ones(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)).item() == pytest.approx(1.0)
    assert hint_loss(torch.full((1, 1, 1, 2), 2.0), torch.tensor([[[[0.0, 2.0]]]])).item() == pytest.approx(
        2.0
    )


def test_composite_loss_weights_the_terms():
    logits, labels = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    ce = -math.log(softmax([1.0, 0.0], 1.0)[1])
    w = LossWeights(alpha=0.25, temperature=1.0, hint_weight=0.5)
    target = teacher_probs([torch.tensor([[0.0, 1.0]])], 1.0)
    kd = kd_loss(logits, target, 1.0).item()
    total = composite_loss(logits, labels, w, target, hint=torch.tensor(2.0))
    assert total.item() == pytest.approx(0.25 * kd + 0.75 * ce + 0.5 * 2.0, rel=1e-5)
    assert composite_loss(logits, labels, w).item() == pytest.approx(ce, rel=1e-5)  # no teacher: plain CE


def test_similarity_matrix_is_the_row_normalised_batch_gram_matrix():
    feat = torch.tensor([[3.0, 0.0], [3.0, 4.0]]).view(2, 2, 1, 1)  # Q Q^T = [[9, 9], [9, 25]]
    g = similarity_matrix(feat)
    n0, n1 = math.hypot(9, 9), math.hypot(9, 25)
    torch.testing.assert_close(g, torch.tensor([[9 / n0, 9 / n0], [9 / n1, 25 / n1]]))


def test_similarity_of_a_channels_last_map_is_that_of_the_same_values_in_nchw():
    torch.manual_seed(0)
    feat = torch.randn(6, 5, 3, 4)
    q = feat.reshape(6, -1)
    expected = torch.nn.functional.normalize(q @ q.t(), p=2, dim=1)
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.testing.assert_close(similarity_matrix(feat.contiguous(memory_format=layout)), expected)


def test_sp_loss_is_squared_frobenius_distance_over_b_squared():
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1)  # G_S = I
    teacher = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).view(2, 3, 1, 1)  # G_T rows = [1, 1] / sqrt 2
    # diff = [[1 - r, -r], [-r, 1 - r]] with r = 1/sqrt 2: 2 ((1 - r)^2 + r^2) / 2^2 = 1 - 1/sqrt 2
    assert sp_loss(student, teacher).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)
    # Maps of other shapes, same batch: only the similarity pattern matters, not scale or size.
    x = torch.randn(4, 8, 4, 4)
    assert sp_loss(x, 3 * x).item() == pytest.approx(0.0, abs=1e-6)
    assert sp_loss(x, torch.randn(4, 16, 2, 2)).item() > 0


@pytest.mark.parametrize(
    "kwargs", [dict(alpha=1.5), dict(temperature=0), dict(hint_weight=-1), dict(hint="attention")]
)
def test_invalid_weights_are_user_errors(kwargs):
    with pytest.raises(IterkdError):
        LossWeights(**kwargs)


def test_the_valid_hint_names_and_default_weights_come_from_the_registry():
    assert losses.HINTS == ("fitnet", "sp", "none")
    assert losses.DEFAULT_HINT_WEIGHT == {"fitnet": 1.0, "sp": 3000.0, "none": 0.0}
    assert hint_kind("fitnet").regressor is not None and hint_kind("sp").regressor is None
    with pytest.raises(IterkdError, match="unknown --hint 'at'; choose one of fitnet, sp, none$"):
        hint_kind("at")
    for taken in ("sp", "none"):  # a second kind under a taken name would silently replace the first
        with pytest.raises(ValueError, match="already taken"):
            register_hint(taken, default_weight=1.0)


def _bf16_exact(*shape: int) -> torch.Tensor:
    """Random fp32 values that bf16 holds exactly: a gap to the fp32 reference can only come from
    computing in bf16, not from rounding the inputs."""
    return torch.randn(*shape).bfloat16().float()


def test_every_loss_term_is_computed_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    s_feat, t_feat = _bf16_exact(64, 8, 4, 4), _bf16_exact(64, 16, 2, 2)
    logits, t_logits, labels = _bf16_exact(64, 10) * 4, _bf16_exact(64, 10) * 4, torch.randint(0, 10, (64,))
    weights = LossWeights(alpha=0.7, temperature=4.0, hint_weight=2.0)
    terms = {
        "teacher_probs": lambda: teacher_probs([t_logits, logits], 4.0, [2.0, 1.0]),
        "kd": lambda: kd_loss(logits, teacher_probs([t_logits], 4.0), 4.0),
        "ce+kd+hint": lambda: composite_loss(
            logits, labels, weights, teacher_probs([t_logits], 4.0), torch.tensor(0.5)
        ),
        "fitnet mse": lambda: hint_loss(t_feat * 0.5, t_feat),
        "similarity": lambda: similarity_matrix(s_feat),
        "sp": lambda: sp_loss(s_feat, t_feat),
    }
    for name, term in terms.items():
        reference = term()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = term()
        assert got.dtype == torch.float32, name
        # bf16 keeps 8 significant bits: SP's Gram matrices in bf16 are ~0.4 % off, 1e-5 catches that.
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-7, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # inputs already in bf16, as a student's maps are
        got = sp_loss(s_feat.bfloat16(), t_feat.bfloat16())
    torch.testing.assert_close(got, sp_loss(s_feat, t_feat), rtol=1e-5, atol=1e-7)
    for kind, regressor in (
        ("fitnet", HintRegressor(8, 16)),
        ("sp", None),
    ):  # the registered kinds as train() calls them
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert hint_kind(kind).loss(s_feat, t_feat, regressor).dtype == torch.float32, kind
