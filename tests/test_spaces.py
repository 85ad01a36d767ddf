import math

import pytest

from iterkd.arch import VGGSpec, vgg_spec
from iterkd.errors import IterkdError
from iterkd.spaces import MinModel, SearchSpace, available_spaces, drop_block, drop_layer, load_space, shrink_widths

SPEC = VGGSpec(((8, 8), (16, 16), (32,)))


def test_shipped_spaces_load_with_the_named_roots():
    names = set(available_spaces())
    assert {"vgg16_blocks", "vgg16_widths", "vgg19_blocks", "vgg19_widths", "tiny"} <= names
    assert load_space("vgg16_blocks").root_spec(3, 10, 32) == vgg_spec("vgg16")
    assert load_space("vgg19_widths").root_spec(1, 10, 32, width=0.5) == vgg_spec("vgg19", 0.5, 1)


def test_drop_layer_removes_the_last_conv_of_each_multi_conv_block():
    moves = drop_layer(SPEC, {})
    assert [m.spec.blocks for m in moves] == [((8,), (16, 16), (32,)), ((8, 8), (16,), (32,))]
    assert moves[0].label == "drop_layer(block=1)"


def test_drop_block_removes_whole_blocks_but_never_the_last_one():
    assert [m.spec.blocks for m in drop_block(SPEC, {})] == [((16, 16), (32,)), ((8, 8), (32,)), ((8, 8), (16, 16))]
    assert drop_block(VGGSpec(((8,),)), {}) == []


def test_shrink_widths_per_block_and_all():
    moves = shrink_widths(SPEC, {"factors": [0.5], "scope": ["block", "all"]})
    assert moves[0].spec.blocks == ((4, 4), (8, 8), (16,)) and moves[0].label == "shrink_widths(block=all, factor=0.5)"
    assert ((8, 8), (8, 8), (32,)) in [m.spec.blocks for m in moves]


def test_moves_closest_to_halving_come_first_and_respect_min_model():
    space = load_space("tiny")
    moves = space.moves(SPEC)
    ratios = [abs(math.log(m.spec.params() / SPEC.params()) - math.log(0.5)) for m in moves]
    assert ratios == sorted(ratios) and all(m.spec.params() < SPEC.params() for m in moves)
    strict = SearchSpace("s", "", "custom", 1.0, SPEC.blocks, space.operators, MinModel(blocks=3, width=8))
    assert all(len(m.spec.blocks) == 3 and min(min(b) for b in m.spec.blocks) >= 8 for m in strict.moves(SPEC))


def test_a_space_step_sets_how_much_each_child_shrinks():
    space = load_space("vgg16_blocks")
    root = space.root_spec(1, 10, 32, 1 / 8)
    gentle = SearchSpace("g", "", "vgg16", 1 / 8, None, space.operators, step=0.9)
    assert space.moves(root)[0].label == "drop_block(block=4)"  # 232k -> 121k, about half
    assert gentle.moves(root)[0].spec.params() > 0.8 * root.params()  # one conv fewer


def test_unknown_space_lists_the_valid_ones():
    with pytest.raises(IterkdError, match="vgg16_blocks") as e:
        load_space("resnet_blocks")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("root: {arch: vgg16\noperators: [drop_layer", "not valid YAML"),
    ("root: {arch: vgg16}\noperators: [melt_layer]", "unknown operator 'melt_layer'"),
    ("root: {arch: vgg16}\noperators: []", "at least one"),
    ("root: {arch: vgg99}\noperators: [drop_layer]", "root.arch"),
    ("root: {arch: vgg11}\noperators: [drop_layer]\nmin_model: {params: 999999999}", "larger than the root"),
    ("root: {arch: vgg11}\noperators: [drop_layer]\nmin_model: {depth: 3}", "bad min_model"),
    ("root: {arch: vgg11}\noperators: [drop_layer]\nstep: 2", "step must be"),
    ("root: {arch: vgg11}\noperators: [drop_layer]\nkd: {temperature: [8, 2]}", "kd.temperature"),
    ("root: {arch: vgg11}\noperators: [drop_layer]\nkd: {beta: 1}", "'kd' may only set"),
])
def test_broken_space_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(IterkdError, match=message) as e:
        load_space(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)
