import json
import re

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


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"in_channels": 3}', "no 'blocks'"),
        ('{"blocks": [[8]], "colour": "red"}', "unknown key 'colour'"),
        ('{"blocks": [[8, "wide"]]}', "blocks must be"),
        ('{"blocks": [8, 16]}', "blocks must be"),
        ('{"blocks": [[8], []]}', "blocks must be"),
        ('{"blocks": [[8.5]]}', "blocks must be"),
        ('{"blocks": [[true]]}', "blocks must be"),
        ('{"blocks": [[-4]]}', "blocks must be"),
        ('{"blocks": [[8]], "in_channels": 0}', "in_channels must be an integer >= 1"),
        ('{"blocks": [[8]], "num_classes": "10"}', "num_classes must be an integer >= 1"),
        ('{"blocks": [[8]], "batch_norm": 1}', "batch_norm must be true or false"),
        ('{"blocks": [[1000000, 1000000]]}', "9e+12 parameters, more than the 2e+09"),
        ('{"blocks": [[' + "9" * 5000 + "]]}", "not JSON"),  # beyond Python's int-parsing limit
        ('{"blocks": [[' + "9" * 4000 + "]]}", "about 1e4001 parameters"),
        ('{"blocks": [' + ",".join(["[1]"] * 1001) + "]}", "1001 convs, more than the 1000"),
    ],
    ids=lambda v: v[:40],
)
def test_hostile_spec_json_is_refused_before_anything_is_built(text, message):
    with pytest.raises(IterkdError, match=re.escape(message)) as e:
        VGGSpec.from_json(text)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_the_size_ceiling_is_arithmetic_on_astronomical_widths():
    with pytest.raises(IterkdError, match=r"about 1e1\d\d\d parameters"):
        VGGSpec(((10**900, 10**900),))
    with pytest.raises(IterkdError, match="more than the 2e\\+09"):
        vgg_spec("vgg16", 10**9)
    with pytest.raises(IterkdError, match="finite"):
        vgg_spec("vgg16", float("inf"))
    biggest = VGGSpec(((14_900,), (14_900,)), in_channels=1)  # 2.0e9 params: allowed, but not built here
    assert biggest.params() <= 2_000_000_000


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.summary())
def test_state_numel_counts_every_tensor_of_the_state_dict(spec):
    assert spec.state_numel() == sum(t.numel() for t in VGG(spec).state_dict().values())
