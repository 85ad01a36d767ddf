"""Weight inheritance: which parent weights a child gets, and that they carry the parent's knowledge."""

from __future__ import annotations

import pytest
import torch

from iterkd.arch import VGGSpec
from iterkd.data import load_data
from iterkd.inherit import conv_plan, inherit_weights, keep_channels
from iterkd.models import VGG
from iterkd.spaces import drop_block, drop_layer, shrink_widths
from iterkd.train import TrainSettings, evaluate, recalibrate_bn, train

PARENT = VGGSpec(((8, 8), (16, 16), (32, 32)), in_channels=3, num_classes=10, input_size=16)


def only(moves, **args):
    return next(m.spec for m in moves if dict(m.args) == args)


def test_shrinking_widths_keeps_every_conv_and_its_input():
    child = only(shrink_widths(PARENT, {"factors": [0.5], "scope": ["all"]}), block="all", factor=0.5)
    plan = conv_plan(PARENT, child)
    assert [(m.child, m.source, m.input_follows) for m in plan] == [
        ((b, k), (b, k), True) for b in range(3) for k in range(2)
    ]


def test_dropping_a_layer_leaves_only_the_next_conv_without_its_input():
    child = only(drop_layer(PARENT, {}), block=2)  # block 2 loses its second conv
    plan = {m.child: m for m in conv_plan(PARENT, child)}
    assert plan[(1, 0)].source == (1, 0) and plan[(1, 0)].input_follows
    assert plan[(2, 0)].source == (2, 0) and not plan[(2, 0)].input_follows  # read (1,1), now reads (1,0)
    assert all(m.input_follows for c, m in plan.items() if c != (2, 0))


def test_dropping_a_block_maps_later_blocks_past_the_gap():
    child = only(drop_block(PARENT, {}), block=2)  # ((8,8),(32,32))
    plan = {m.child: m for m in conv_plan(PARENT, child)}
    assert plan[(1, 0)].source == (2, 0) and not plan[(1, 0)].input_follows
    assert plan[(1, 1)].source == (2, 1) and plan[(1, 1)].input_follows
    assert plan[(0, 1)].source == (0, 1) and plan[(0, 1)].input_follows


def test_most_important_channels_survive_in_their_order():
    assert keep_channels(torch.tensor([0.1, 3.0, 0.5, 2.0]), 2).tolist() == [1, 3]
    assert keep_channels(torch.tensor([1.0, 1.0, 1.0]), 2).tolist() == [0, 1]  # ties: lower index
    assert keep_channels(torch.tensor([1.0, 2.0]), 5).tolist() == [0, 1]


def test_same_spec_inherits_the_parent_exactly():
    torch.manual_seed(0)
    parent = VGG(PARENT).eval()
    _randomise_bn(parent)
    child = VGG(PARENT).eval()
    summary = inherit_weights(child, parent)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(child(x), parent(x))
    assert (
        summary["copied_params"] == PARENT.params() and summary["fresh_convs"] == 0 and summary["head_copied"]
    )


def test_pruning_dead_channels_keeps_the_function_and_slices_the_next_layer():
    """Channels whose BN scale and shift are zero output nothing: dropping exactly them (the least
    important by |gamma|) must leave the network's outputs unchanged, which only holds if the next
    conv's input channels were sliced to match."""
    torch.manual_seed(0)
    parent = VGG(PARENT).eval()
    _randomise_bn(parent)
    bn = parent.blocks[1][4]  # block 2's second BN: 16 channels, half of them dead
    dead = torch.tensor([0, 2, 3, 7, 8, 11, 12, 15])
    with torch.no_grad():
        bn.weight[dead] = 0.0
        bn.bias[dead] = 0.0
    child_spec = VGGSpec(((8, 8), (16, 8), (32, 32)), in_channels=3, num_classes=10, input_size=16)
    child = VGG(child_spec).eval()
    inherit_weights(child, parent)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(child(x), parent(x))


def _randomise_bn(model: VGG) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)


@pytest.fixture(scope="module")
def trained_parent():
    data = load_data("synthetic", None, val_size=400, seed=0)
    torch.manual_seed(0)
    parent = VGG(PARENT)
    result = train(parent, data, TrainSettings(epochs=4, batch_size=64, lr=0.05), progress=False)
    assert result.val_acc > 60  # the synthetic task is learnable: otherwise the test below means nothing
    return parent.eval(), data


@pytest.mark.parametrize("block", [2, 3])
def test_inherited_child_starts_far_above_chance_and_a_scratch_child_does_not(trained_parent, block):
    parent, data = trained_parent
    spec = only(shrink_widths(PARENT, {"factors": [0.5], "scope": ["block"]}), block=block, factor=0.5)
    torch.manual_seed(1)
    scratch = VGG(spec)
    inherited = VGG(spec)
    inherited.load_state_dict(scratch.state_dict())
    inherit_weights(inherited, parent)
    chance = 100 / data.info.num_classes
    for model in (inherited, scratch):
        recalibrate_bn(model, data)  # as the search does before measuring a child's starting accuracy
    assert evaluate(inherited, data.val_x, data.val_y, data) > chance + 40
    assert evaluate(scratch, data.val_x, data.val_y, data) < chance + 15


def test_a_search_child_records_how_it_started(tmp_path):
    from iterkd import run_search
    from iterkd.storage import open_study
    from tests.conftest import smoke_config

    cfg = smoke_config(tmp_path / "run", max_generations=1)
    run_search(cfg, progress=False)
    study = open_study(f"sqlite:///{tmp_path / 'run' / 'study.db'}", cfg.name, create=False)
    child = [t for t in study.trials if t.user_attrs.get("generation") == 1][0]
    a = child.user_attrs
    assert a["init"] == "inherit" and 0 < a["copied_params"] <= a["params"] and 0 <= a["init_val_acc"] <= 100
