import math

import pytest

from iterkd.arch import VGGSpec, vgg_spec
from iterkd.errors import IterkdError
from iterkd.spaces import (
    MinModel,
    SearchSpace,
    available_spaces,
    drop_block,
    drop_layer,
    load_space,
    shrink_widths,
)

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
    assert [m.spec.blocks for m in drop_block(SPEC, {})] == [
        ((16, 16), (32,)),
        ((8, 8), (32,)),
        ((8, 8), (16, 16)),
    ]
    assert drop_block(VGGSpec(((8,),)), {}) == []


def test_shrink_widths_per_block_and_all():
    moves = shrink_widths(SPEC, {"factors": [0.5], "scope": ["block", "all"]})
    assert (
        moves[0].spec.blocks == ((4, 4), (8, 8), (16,))
        and moves[0].label == "shrink_widths(block=all, factor=0.5)"
    )
    assert ((8, 8), (8, 8), (32,)) in [m.spec.blocks for m in moves]


def test_moves_closest_to_halving_come_first_and_respect_min_model():
    space = load_space("tiny")
    moves = space.moves(SPEC)
    ratios = [abs(math.log(m.spec.params() / SPEC.params()) - math.log(0.5)) for m in moves]
    assert ratios == sorted(ratios) and all(m.spec.params() < SPEC.params() for m in moves)
    strict = SearchSpace("s", "", "custom", 1.0, SPEC.blocks, space.operators, MinModel(blocks=3, width=8))
    assert all(
        len(m.spec.blocks) == 3 and min(min(b) for b in m.spec.blocks) >= 8 for m in strict.moves(SPEC)
    )


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


OK = "root: {arch: vgg11}\noperators: [drop_layer]\n"
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)
)


@pytest.mark.parametrize(
    "text, where, message",
    [
        ("root: {arch: vgg16\noperators: [drop_layer", "2:", "not valid YAML"),
        ("root: {arch: vgg16}\noperators: [melt_layer]", "2: operators[0]", "unknown operator 'melt_layer'"),
        ("root: {arch: vgg16}\noperators: []", "2: operators", "at least one"),
        ("root: {arch: vgg16}", "1: operators", "at least one"),
        ("root: {arch: vgg16}\noperators: {drop_layer: {}}", "2: operators", "must list"),
        ("root: {arch: vgg16}\noperators:\n  - [drop_layer]", "3: operators[0]", "must be an operator name"),
        (
            "root: {arch: vgg16}\noperators:\n  - drop_layer\n  - shrink_widths: [0.5]",
            "4: operators[1].shrink_widths",
            "must be a mapping of factors, scope",
        ),
        (
            "root: {arch: vgg16}\noperators:\n  - shrink_widths: {factors: [0.5, 2]}",
            "3: operators[0].shrink_widths.factors[1]",
            "must be a width factor in (0, 1), got 2",
        ),
        (
            "root: {arch: vgg16}\noperators:\n  - shrink_widths: {factors: 0.5}",
            "3: operators[0].shrink_widths.factors",
            "must be a list",
        ),
        (
            "root: {arch: vgg16}\noperators:\n  - shrink_widths: {scope: everything}",
            "3: operators[0].shrink_widths.scope",
            "must be block, all",
        ),
        (
            "root: {arch: vgg16}\noperators:\n  - drop_layer: {block: 2}",
            "3: operators[0].drop_layer.block",
            "drop_layer may set nothing",
        ),
        ("root: [vgg16]\noperators: [drop_layer]", "1: root", "must be a mapping of arch, width, blocks"),
        ("operators: [drop_layer]", "1: root", "must be a mapping"),
        ("root: {arch: vgg99}\noperators: [drop_layer]", "1: root.arch", "must be one of vgg11"),
        ("root: {arch: custom}\noperators: [drop_layer]", "1: root.arch", "or give root.blocks"),
        (
            "root: {arch: vgg16, depth: 3}\noperators: [drop_layer]",
            "1: root.depth",
            "root may set arch, width, blocks",
        ),
        ("root: {arch: vgg16, width: wide}\noperators: [drop_layer]", "1: root.width", "a number > 0"),
        ("root: {arch: vgg16, width: .inf}\noperators: [drop_layer]", "1: root.width", "a number > 0"),
        ("root: {arch: vgg16, width: -1}\noperators: [drop_layer]", "1: root.width", "a number > 0"),
        ("root:\n  blocks: [[8, wide]]\noperators: [drop_layer]", "2: root.blocks[0][1]", "a conv width"),
        ("root: {blocks: 64}\noperators: [drop_layer]", "1: root.blocks", "must be a list of blocks"),
        (
            "root: {blocks: [64, 64]}\noperators: [drop_layer]",
            "1: root.blocks[0]",
            "non-empty list of conv widths",
        ),
        (
            "root: {blocks: [[8], []]}\noperators: [drop_layer]",
            "1: root.blocks[1]",
            "non-empty list of conv widths",
        ),
        (
            "root:\n  blocks:\n    - [8, 8]\n    - [16, -4]\noperators: [drop_layer]",
            "4: root.blocks[1][1]",
            "must be an integer >= 1 (a conv width), got -4",
        ),
        ("root: {blocks: [[0]]}\noperators: [drop_layer]", "1: root.blocks[0][0]", "got 0"),
        (
            "root: {blocks: [[1000000000, 1000000000]]}\noperators: [drop_layer]",
            "1: root",
            "describes an invalid VGG spec: 9e+18 parameters, more than the 2e+09",
        ),
        (
            "root: {arch: vgg16, width: 1000000000}\noperators: [drop_layer]",
            "1: root",
            "parameters, more than the 2e+09",
        ),
        (OK + "min_model: {params: 999999999}", "3: min_model", "larger than the root"),
        (OK + "min_model: {depth: 3}", "3: min_model.depth", "min_model may set blocks, width, params"),
        (OK + "min_model: {params: -1}", "3: min_model.params", "integer >= 0"),
        (OK + "min_model: [1]", "3: min_model", "must be a mapping"),
        (OK + "step: 2", "3: step", "a number in (0, 1)"),
        (OK + "kd: {temperature: [8, 2]}", "3: kd.temperature", "low < high"),
        (OK + "kd: {beta: 1}", "3: kd.beta", "kd may set alpha, temperature, hint_weight, lr"),
        (
            OK + "kd:\n  temperature: 4\n  alpha: 2",
            "5: kd.alpha",
            "must be a number in [0, 1] or [low, high], got 2",
        ),
        (OK + "kd: {alpha: [0.5, 1.5]}", "3: kd.alpha[1]", "must be a number in [0, 1], got 1.5"),
        (OK + "kd: {lr: [0, 0.1]}", "3: kd.lr[0]", "must be a number > 0"),
        (OK + "kd: {alpha: [0.1, 0.2, 0.3]}", "3: kd.alpha", "or [low, high]"),
        (OK + "kd: {temperature: true}", "3: kd.temperature", "got True"),
        (OK + "name: [a]", "3: name", "must be text"),
        (OK + "colour: red", "3: colour", "a space may set name, description"),
        ("- root\n- operators", "1: the document", "must be a mapping"),
        ("!!python/object/apply:os.system [echo hi]", "1:", "not valid YAML"),
        (
            BOMB + "root: {arch: vgg16}\noperators: *i",
            "",
            "more than 10000 values once its aliases are expanded",
        ),
        ("root: {arch: vgg16}\noperators: [drop_layer]\n" + "#" * 70_000, "", "larger than 64 KiB"),
        ("x: " + "[" * 5000 + "]" * 5000, "", "nested too deeply"),
    ],
    ids=lambda v: v[:50].replace("\n", " "),
)
def test_broken_space_files_are_one_line_errors_naming_file_line_and_key(tmp_path, text, where, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(IterkdError) as e:
        load_space(str(path))
    assert str(e.value).startswith(f"search space {path}:{where}"), str(e.value)
    assert message in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 400


def test_a_space_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_bytes(b"root: {arch: vgg16}\noperators: [drop_\xff\xfe]")
    with pytest.raises(IterkdError, match="not valid YAML") as e:
        load_space(str(path))
    assert "\n" not in str(e.value)


def test_every_shipped_space_passes_the_schema_with_its_operator_parameters():
    for name in available_spaces():
        space = load_space(name)
        for _, params in space.operators:
            assert set(params) <= {"factors", "scope"}
    shrink = ("shrink_widths", {"factors": [0.875, 0.75, 0.5], "scope": ["block", "all"]})
    assert load_space("vgg16_widths").operators == (shrink,)
