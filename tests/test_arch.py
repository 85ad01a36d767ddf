import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from iterkd.arch import VGG_PRESETS, VGGSpec, vgg_spec
from iterkd.errors import IterkdError
from iterkd.models import VGG

SPECS = [
    vgg_spec("vgg16", 1 / 8, in_channels=1, num_classes=10, input_size=32),
    vgg_spec("vgg11", 1 / 16, in_channels=3, num_classes=100, input_size=32),
    vgg_spec("vgg19", 1 / 16, in_channels=3, num_classes=10, input_size=16),  # blocks at 1x1 skip pooling
    VGGSpec(((8, 8), (16,)), in_channels=3, num_classes=7, input_size=16),
    VGGSpec(((5,),), in_channels=2, num_classes=3, input_size=8, batch_norm=False),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.summary())
def test_params_and_bytes_match_the_built_module(spec):
    model = VGG(spec)
    assert spec.params() == sum(p.numel() for p in model.parameters())
    assert spec.state_bytes() == sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.summary())
def test_flops_match_torch_flop_counter(spec):
    model = VGG(spec).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, spec.in_channels, spec.input_size, spec.input_size))
    assert spec.flops() == counter.get_total_flops()


def test_vgg16_full_width_has_the_known_size():
    spec = vgg_spec("vgg16", 1.0, 3, 10, 32)
    assert spec.params() == 14_728_266  # VGG-16-BN, CIFAR-style single linear head
    assert spec.convs == 13
    assert spec.block_sizes() == [32, 16, 8, 4, 2]
    assert spec.block_output_shapes()[-1] == (512, 1)


def test_width_multiplier_scales_every_block_and_keeps_at_least_one_channel():
    spec = vgg_spec("vgg16", 0.001)
    assert all(w == 1 for b in spec.blocks for w in b)
    assert vgg_spec("vgg13", 0.5).blocks == ((32, 32), (64, 64), (128, 128), (256, 256), (256, 256))


def test_spec_round_trips_through_json_and_is_hashable():
    for spec in SPECS:
        again = VGGSpec.from_json(spec.to_json())
        assert again == spec and hash(again) == hash(spec)
        assert VGGSpec.from_json(json.loads(spec.to_json())) == spec


def test_bad_specs_and_names_are_user_errors():
    with pytest.raises(IterkdError, match="unknown architecture"):
        vgg_spec("resnet50")
    with pytest.raises(IterkdError):
        VGGSpec(((8,), ()))
    with pytest.raises(IterkdError):
        VGGSpec(((0,),))
    with pytest.raises(IterkdError, match="width"):
        vgg_spec("vgg11", -1)
    assert set(VGG_PRESETS) == {"vgg11", "vgg13", "vgg16", "vgg19"}
