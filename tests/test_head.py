"""The VGG head a spec can describe (a pooled grid, hidden fully connected layers), its moves and
their inheritance: what an imported torchvision VGG needs to be shrunk."""

from __future__ import annotations

import json

import pytest
import torch

from iterkd.arch import VGGSpec
from iterkd.errors import IterkdError
from iterkd.inherit import inherit_weights
from iterkd.models import VGG
from iterkd.quantize import fold_batch_norm
from iterkd.spaces import load_space
from tests.conftest import he_fill

# Three blocks on 8 px: the last map is 1x1, as torchvision's VGGs' on 32 px.
PARENT = VGGSpec(((8,), (16,), (16,)), 3, 4, 8, grid=3, hidden=(12, 10))


def logits(model, spec=PARENT, n=4):
    x = torch.randn(
        n, spec.in_channels, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        return model.eval()(x)


def test_a_head_spec_round_trips_and_old_specs_keep_their_json():
    spec = VGGSpec(((8,), (16,)), 3, 10, 32, grid=7, hidden=(64, 32), dropout=0.3)
    assert VGGSpec.from_json(spec.to_json()) == spec and spec.summary().endswith("fc[64-32]@7x7")
    plain = VGGSpec(((8,), (16,)), 3, 10, 32)
    assert json.loads(plain.to_json()) == {
        "blocks": [[8], [16]], "in_channels": 3, "num_classes": 10, "input_size": 32, "batch_norm": True
    }  # fmt: skip
    keys = VGG(spec).state_dict().keys()
    assert set(VGG(plain).state_dict()) == {k for k in keys if not k.startswith("hidden.")}
    model = VGG(spec)
    assert spec.params() == sum(p.numel() for p in model.parameters())
    assert spec.flops() == VGGSpec(((8,), (16,)), 3, 10, 32).flops() - 2 * 16 * 10 + 2 * (
        16 * 49 * 64 + 64 * 32 + 32 * 10
    )
    for bad, needle in [
        (dict(grid=0), "grid must be an integer"),
        (dict(hidden=(4, -1)), "hidden must be a list"),
        (dict(dropout=1.0), "dropout must be a number"),
    ]:
        with pytest.raises(IterkdError, match=needle):
            VGGSpec(((8,),), **bad)


def test_the_head_folds_with_batch_norm_and_keeps_its_function():
    model = he_fill(VGG(PARENT))
    assert torch.allclose(logits(fold_batch_norm(model)), logits(model), atol=1e-5)


def test_the_space_adds_head_moves_for_a_spec_with_a_head():
    space = load_space("vgg16_blocks")
    labels = [m.label for m in space.moves(PARENT)]
    assert (
        "shrink_grid(grid=1)" in labels
        and "drop_fc(layer=1)" in labels
        and "shrink_fc(layer=2, factor=0.5)" in labels
    )
    assert not any(
        label.startswith(("shrink_grid", "drop_fc", "shrink_fc"))
        for label in [m.label for m in space.moves(VGGSpec(((8,), (16,)), 3, 4, 8))]
    )
    conv_move = next(m for m in space.moves(PARENT) if m.operator == "drop_block")
    assert (conv_move.spec.grid, conv_move.spec.hidden) == (3, (12, 10))  # conv moves keep the head


def test_shrinking_the_grid_of_a_1x1_map_is_exact():
    parent = he_fill(VGG(PARENT))
    for grid in (1, 2):
        child = VGG(VGGSpec(PARENT.blocks, 3, 4, 8, grid=grid, hidden=PARENT.hidden))
        assert inherit_weights(child, parent)["head_copied"]
        assert torch.allclose(logits(child), logits(parent), atol=1e-5)
        assert child.spec.params() < parent.spec.params()


def test_narrowing_or_dropping_a_hidden_layer_keeps_what_still_fits():
    parent = he_fill(VGG(PARENT))
    narrow = VGG(VGGSpec(PARENT.blocks, 3, 4, 8, grid=3, hidden=(6, 10)))
    summary = inherit_weights(narrow, parent)
    assert summary["head_copied"]
    units = [
        next(i for i in range(12) if torch.equal(row, parent.hidden[0].weight[i]))
        for row in narrow.hidden[0].weight
    ]
    norms = parent.hidden[0].weight.abs().sum(dim=1)
    assert sorted(units) == sorted(norms.argsort(descending=True)[:6].tolist())  # the largest L1 norms
    assert torch.equal(narrow.hidden[3].weight, parent.hidden[3].weight[:, sorted(units)])
    assert torch.equal(narrow.head.weight, parent.head.weight)

    dropped = VGG(VGGSpec(PARENT.blocks, 3, 4, 8, grid=3, hidden=(12,)))
    summary = inherit_weights(dropped, parent)
    assert not summary["head_copied"]  # the classifier now reads the first layer: it starts afresh
    assert torch.equal(dropped.hidden[0].weight, parent.hidden[0].weight)
    assert summary["copied_params"] == dropped.spec.params() - (12 * 4 + 4)


def test_a_search_from_a_root_with_a_head_shrinks_the_head_too(tmp_path):
    """An imported VGG with a head (a 2x2 grid, two hidden layers): the head moves join the space's
    conv moves with no flag, and every node's model is built and saved."""
    from torch import nn

    from iterkd import run_search
    from iterkd.run import open_run
    from tests.conftest import smoke_config
    from tests.test_import import CifarVGG

    net = CifarVGG([8, 8, "M", 16, 16, "M", 16, "M"], classes=10, hidden=(64, 64))
    net.classifier[0] = nn.Linear(16 * 4, 64)  # 16 px: a 2x2 map, read whole
    torch.save(he_fill(net).state_dict(), tmp_path / "headnet.pth")
    cfg = smoke_config(tmp_path / "run", teacher=(str(tmp_path / "headnet.pth"),), max_generations=2)
    run_search(cfg, progress=False)
    run = open_run(cfg.run_dir)
    assert (run.root.spec.grid, run.root.spec.hidden) == (2, (64, 64))
    operators = [n.operator.split("(")[0] for n in run.nodes.values() if n.generation > 0 and n.ok]
    assert {"shrink_fc", "drop_fc"} & set(operators) and len(operators) == 2
    for n in run.nodes.values():
        if n.ok:
            assert run.model(n).spec == n.spec


@pytest.mark.parametrize("grid, size", [(3, 8), (2, 16), (3, 16)])  # 1x1 map repeated, divided, adaptive
def test_a_head_exports_to_onnx_with_the_same_logits(tmp_path, grid, size):
    pytest.importorskip("onnxruntime")
    from iterkd.deploy import onnx_session, write_onnx

    spec = VGGSpec(((8,), (16,), (16,)), 3, 4, size, grid=grid, hidden=(12,))
    model = he_fill(VGG(spec))
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    session = onnx_session(write_onnx(model, tmp_path / "m.onnx"))
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert abs(out - model(x).numpy()).max() < 1e-4


def test_dropping_one_of_two_equal_hidden_layers_keeps_the_larger_copy():
    """torchvision's 4096-4096: dropping either leaves the same spec; the second goes, so the large
    first layer (25,088 x 4,096 there) is inherited rather than drawn afresh."""
    parent = he_fill(VGG(VGGSpec(((8,), (16,), (16,)), 3, 4, 8, grid=3, hidden=(10, 10))))
    child = VGG(VGGSpec(((8,), (16,), (16,)), 3, 4, 8, grid=3, hidden=(10,)))
    inherit_weights(child, parent)
    assert torch.equal(child.hidden[0].weight, parent.hidden[0].weight)


def test_the_grid_sum_stays_on_the_weights_device():
    from iterkd.inherit import _grid_columns

    weight = torch.empty(4, 2 * 9, device="meta")
    assert _grid_columns(weight, torch.arange(2), 3, 1).device.type == "meta"  # cuda in a GPU run
