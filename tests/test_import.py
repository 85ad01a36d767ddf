"""Importing a trained VGG: torchvision's eight and CIFAR-style layouts become iterkd specs whose
logits match the file's own model; every file that cannot be one is refused in one line."""

from __future__ import annotations

import functools
import math
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from iterkd import importers, models, run_search
from iterkd.arch import VGGSpec
from iterkd.checkpoints import read_checkpoint
from iterkd.cli import main
from iterkd.errors import IterkdError
from iterkd.importers import files, import_vgg, load_teacher, vgg
from iterkd.inherit import inherit_weights
from iterkd.models import VGG
from iterkd.run import open_run
from tests.conftest import he_fill, smoke_config

TORCHVISION = ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]


@functools.cache
def torchvision_classifier() -> nn.Module:
    """The classifier all eight torchvision VGGs share (25,088 -> 4,096 -> 4,096 -> 5), filled once."""
    with torch.device("meta"):
        model = torchvision.models.vgg11(weights=None, num_classes=5)
    return he_fill(model.classifier.to_empty(device="cpu"))


def torchvision_classifier_for(channels: int, classes: int) -> nn.Module:
    """torchvision's classifier layout (7x7 grid, 4096-4096) after `channels` conv channels."""
    with torch.device("meta"):
        head = nn.Sequential(
            nn.Linear(channels * 49, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, classes),
        )  # fmt: skip
    return he_fill(head.to_empty(device="cpu"))


@functools.cache
def torchvision_vgg(name: str) -> nn.Module:
    """torchvision's constructor, built on the meta device and given He-scaled random weights (its
    default init of the 25,088 x 4,096 layer alone takes seconds); the classifier is shared."""
    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None, num_classes=5)
    model.features = he_fill(model.features.to_empty(device="cpu"))
    model.classifier = torchvision_classifier()
    return model.eval()


class CifarVGG(nn.Module):
    """The CIFAR-style layouts in common use: features of conv (+BN) + ReLU and max-pools, an average
    pool (kuangliu/pytorch-cifar: AvgPool2d(1, 1)), then one linear layer or a few with ReLU and
    dropout (chenyaofo/pytorch-cifar-models), under `classifier` or another name."""

    def __init__(self, cfg, *, in_channels=3, classes=10, hidden=(), bn=True, head="classifier", bias=True):
        super().__init__()
        layers, c = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=bias)] + ([nn.BatchNorm2d(v)] if bn else [])
                layers.append(nn.ReLU(inplace=True))
                c = v
        layers.append(nn.AvgPool2d(1, 1))
        self.features = nn.Sequential(*layers)
        if hidden:
            fc, w = [], c
            for h in hidden:
                fc += [nn.Linear(w, h), nn.ReLU(True), nn.Dropout()]
                w = h
            classifier = nn.Sequential(*fc, nn.Linear(w, classes))
        else:
            classifier = nn.Linear(c, classes)
        self.head_name = head
        setattr(self, head, classifier)

    def forward(self, x):
        return getattr(self, self.head_name)(torch.flatten(self.features(x), 1))


CFG = [8, "M", 16, 16, "M", 16, "M", 16, "M", 16, "M"]  # a 5-block VGG-11 shape, 1/32 wide: 32 px -> 1 x 1


def logits_gap(teacher, reference: nn.Module, size: int = 32, channels: int = 3) -> float:
    x = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference.eval()(x)
        assert ref.std() > 0.05  # the logits carry signal: a wrong mapping cannot hide in zeros
        return float((teacher.model(x) - ref).abs().max())


@pytest.mark.parametrize("name", TORCHVISION)
def test_every_torchvision_vgg_imports_with_its_logits(name):
    reference = torchvision_vgg(name)
    imported = import_vgg(dict(reference.state_dict()), size=32, path=Path(f"{name}.pth"))
    spec = imported.model.spec
    assert imported.layout == f"torchvision {name}" and imported.max_diff <= imported.limit
    assert (spec.grid, spec.hidden, spec.num_classes, spec.batch_norm) == (
        7,
        (4096, 4096),
        5,
        name.endswith("_bn"),
    )
    assert spec.params() == sum(p.numel() for p in reference.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(imported.model(x), reference(x), atol=1e-4)


def test_teacher_arch_names_the_torchvision_vgg_and_is_checked():
    state = dict(torchvision_vgg("vgg11").state_dict())
    assert import_vgg(state, size=32, path=Path("v.pth"), arch="vgg11").layout == "torchvision vgg11"
    for wrong, needle in [("vgg13", "its convs are [64, 128, 256"), ("vgg11_bn", "without batch norm")]:
        with pytest.raises(IterkdError, match=r"is not a vgg1\d(_bn)? \(--teacher-arch\)") as e:
            import_vgg(state, size=32, path=Path("v.pth"), arch=wrong)
        assert needle in str(e.value)


def test_the_logits_limit_is_relative_for_large_logits(tmp_path):
    """1e-4 for logits up to 1; a barely trained model with logits in the thousands (fp32 sums in
    another order differ by ~1e-7 of the values) gets the same relative limit."""
    net = he_fill(CifarVGG(CFG))
    with torch.no_grad():
        net.classifier.weight.mul_(1e4)
    torch.save(net.state_dict(), tmp_path / "loud.pth")
    teacher = load_teacher(tmp_path / "loud.pth", size=32)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scale = float(net.eval()(x).abs().max())
    assert scale > 100 and teacher.imported.limit == pytest.approx(vgg.TOLERANCE * scale)
    assert f"(limit {teacher.imported.limit:.1e})" in teacher.describe(tmp_path / "loud.pth")


def test_the_logits_check_catches_a_wrong_reading(monkeypatch):
    """The check is not a formality: an iterkd head that pooled wrongly is refused."""
    reference = torchvision_vgg("vgg11")
    monkeypatch.setattr(
        models, "pool_to_grid", lambda x, grid, size: nn.functional.adaptive_max_pool2d(x, grid) * 0.5
    )
    with pytest.raises(IterkdError, match="does not reproduce the file's own model"):
        import_vgg(dict(reference.state_dict()), size=32, path=Path("vgg11.pth"))


LAYOUTS = {
    "one linear (kuangliu)": dict(),
    "three linear (chenyaofo)": dict(hidden=(12, 12)),
    "no batch norm, fc": dict(bn=False, head="fc"),
    "convs without bias": dict(bias=False, head="linear"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_cifar_style_layouts_import_from_both_formats(tmp_path, layout, fmt):
    net = he_fill(CifarVGG(CFG, **LAYOUTS[layout]))
    path = tmp_path / f"net.{fmt}"
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    torch.save(state, path) if fmt == "pth" else save_file(state, str(path))
    teacher = load_teacher(path, size=32)
    spec = teacher.model.spec
    assert teacher.imported.layout == "CIFAR-style VGG" and logits_gap(teacher, net) <= 1e-4
    assert spec.blocks == ((8,), (16, 16), (16,), (16,), (16,)) and spec.grid == 1
    assert spec.hidden == LAYOUTS[layout].get("hidden", ())
    assert "imported as a CIFAR-style VGG" in teacher.describe(path) and "logits match" in teacher.describe(
        path
    )


def test_a_map_larger_than_one_cell_sets_the_grid(tmp_path):
    """Four pools on 32 px leave a 2x2 map that the classifier reads flattened: grid 2."""
    net = he_fill(CifarVGG([8, "M", 16, "M", 16, "M", 16, "M"], classes=4))
    net.classifier = nn.Linear(16 * 4, 4)
    he_fill(net)
    torch.save(net.state_dict(), tmp_path / "n.pth")
    teacher = load_teacher(tmp_path / "n.pth", size=32)
    assert teacher.model.spec.grid == 2 and logits_gap(teacher, net) <= 1e-4


@pytest.mark.parametrize("wrapper", [*files.WRAPPERS, None])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod.", "model."])
def test_wrapping_dictionaries_and_key_prefixes_are_undone(tmp_path, wrapper, prefix):
    net = he_fill(CifarVGG(CFG, classes=3))
    state = {prefix + k: v for k, v in net.state_dict().items()}
    saved = state if wrapper is None else {wrapper: state, "epoch": 7, "best_acc": torch.tensor(91.5)}
    torch.save(saved, tmp_path / "w.pth")
    assert logits_gap(load_teacher(tmp_path / "w.pth", size=32), net) <= 1e-4


def test_files_are_told_apart_by_content_not_extension(tmp_path):
    net = he_fill(CifarVGG(CFG))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "weights.pt"))
    torch.save(net.state_dict(), tmp_path / "weights.safetensors")
    torch.jit.trace(net, torch.zeros(1, 3, 32, 32)).save(str(tmp_path / "scripted.pth"))
    assert files.file_kind(tmp_path / "weights.pt") == "safetensors"
    assert files.file_kind(tmp_path / "weights.safetensors") == "torch-save"
    assert files.file_kind(tmp_path / "scripted.pth") == "torchscript"
    for name in ("weights.pt", "weights.safetensors"):
        assert logits_gap(load_teacher(tmp_path / name, size=32), net) <= 1e-4


# -- refusals: one line, nothing unpickled, nothing recorded ------------------------------------------


MARKER = Path("/tmp/iterkd-test-unpickled-code-ran")


class Booby(nn.Linear):
    """A module whose unpickling runs code: it writes MARKER."""

    def __setstate__(self, state):
        MARKER.write_text("ran")
        super().__setstate__(state)


def test_a_pickled_module_is_refused_without_running_its_code(tmp_path):
    MARKER.unlink(missing_ok=True)
    torch.save(Booby(4, 2), tmp_path / "module.pth")
    with pytest.raises(pickle.UnpicklingError):  # what torch.load would otherwise have run
        torch.load(tmp_path / "module.pth", weights_only=True)
    with pytest.raises(IterkdError) as e:
        load_teacher(tmp_path / "module.pth", size=32)
    line = str(e.value)
    assert "\n" not in line and "torch.save(model.state_dict(), 'model.pth')" in line and "Booby" in line
    assert not MARKER.exists()  # nothing of the module was built


def _resnet_like() -> dict:
    return {
        "conv1.weight": torch.ones(8, 3, 7, 7),
        "layer1.0.conv1.weight": torch.ones(8, 8, 3, 3),
        "fc.weight": torch.ones(2, 8),
    }


def _state(**changes) -> dict:
    state = dict(he_fill(CifarVGG(CFG)).state_dict())
    for key, value in changes.items():
        state[key.replace("_", ".")] = value
    return state


@pytest.mark.parametrize(
    "state, needle",
    [
        (_resnet_like(), "not a VGG layout iterkd recognises: conv1, layer1.0.conv1"),
        (
            _state(features_4_weight=torch.ones(16, 9, 3, 3)),
            "contradict each other: features.4 reads 9 channels",
        ),
        (_state(classifier_weight=torch.ones(10, 24)), "classifier takes 24 inputs, not the 16 channels"),
        (
            _state(features_0_weight=torch.full((8, 3, 3, 3), math.nan)),
            "features.0.weight holds NaN or infinite",
        ),
        ({"features.0.weight": torch.ones(8, 3, 5, 5), "classifier.weight": torch.ones(2, 8)}, "a 5x5 conv"),
        ({"features.0.weight": torch.ones(8, 3, 3, 3)}, "no classifier"),
    ],
    ids=["resnet", "conv shapes", "head shape", "nan", "5x5", "headless"],
)
def test_files_iterkd_cannot_describe_are_refused_in_one_line(tmp_path, state, needle):
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(IterkdError, match="^teacher ") as e:
        load_teacher(tmp_path / "bad.pth", size=32)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_more_than_max_params_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(vgg, "MAX_PARAMS", 1000)
    torch.save(he_fill(CifarVGG(CFG)).state_dict(), tmp_path / "big.pth")
    with pytest.raises(IterkdError, match="values, more than the 1e\\+03 iterkd builds"):
        load_teacher(tmp_path / "big.pth", size=32)


@pytest.mark.parametrize("what", ["torchscript", "corrupt", "legacy garbage", "text", "optimizer only"])
def test_other_files_get_a_line_that_says_what_they_are(tmp_path, what):
    path = tmp_path / "t.pt"
    if what == "torchscript":
        torch.jit.trace(CifarVGG(CFG).eval(), torch.zeros(1, 3, 32, 32)).save(str(path))
    elif what == "corrupt":
        torch.save(CifarVGG(CFG).state_dict(), path)
        path.write_bytes(path.read_bytes()[:300])
    elif what == "legacy garbage":
        path.write_bytes(b"\x80\x02" + bytes(range(7, 200)))  # a pickle protocol byte, then noise
    elif what == "text":
        path.write_text("not weights")
    else:
        torch.save({"optimizer": {"lr": 0.1}, "epoch": 3}, path)
    with pytest.raises(IterkdError) as e:
        load_teacher(path, size=32)
    expected = {
        "torchscript": "TorchScript archive, not a state dict",
        "corrupt": "corrupt torch.save file",
        "legacy garbage": "corrupt torch.save file",
        "text": "neither a safetensors file nor a torch.save file",
        "optimizer only": "holds no state dict (found 'optimizer', 'epoch')",
    }[what]
    assert expected in str(e.value) and "\n" not in str(e.value)


# -- the spec's head --------------------------------------------------------------------------------


def test_inheritance_carries_a_hidden_head_through_a_narrower_last_conv():
    parent = he_fill(VGG(VGGSpec(((8,), (16,)), 3, 4, 8, grid=2, hidden=(6,))))
    child = VGG(VGGSpec(((8,), (12,)), 3, 4, 8, grid=2, hidden=(6,)))
    summary = inherit_weights(child, parent)
    assert summary["head_copied"]
    rows = [
        next(i for i in range(16) if torch.equal(w, parent.blocks[1][0].weight[i]))
        for w in child.blocks[1][0].weight
    ]
    kept = torch.tensor(rows)  # the parent channels the narrower conv kept, in order
    cols = (kept[:, None] * 4 + torch.arange(4)).reshape(-1)  # each channel's 2x2 grid cells
    assert torch.equal(child.hidden[0].weight, parent.hidden[0].weight[:, cols])
    assert torch.equal(child.head.weight, parent.head.weight)
    # A child whose head is no head move of its parent's (here: one more layer) starts it afresh.
    other = VGG(VGGSpec(((8,), (16,)), 3, 4, 8, grid=2, hidden=(6, 6)))
    assert not inherit_weights(other, parent)["head_copied"]


# -- the search from an imported root ---------------------------------------------------------------


def test_a_search_starts_from_an_imported_vgg_and_resumes(tmp_path, capsys):
    net = he_fill(CifarVGG([8, 8, "M", 16, 16, "M", 16, "M"], classes=10))
    net.classifier = nn.Linear(16 * 4, 10)  # 16 px -> a 2x2 map, read flattened
    he_fill(net)
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, tmp_path / "mine.pth")
    cfg = smoke_config(tmp_path / "run", teacher=(str(tmp_path / "mine.pth"),), max_generations=1)
    out = run_search(cfg, progress=False)
    said = capsys.readouterr().out
    line = next(
        x for x in said.splitlines() if x.startswith("teacher mine.pth: imported as a CIFAR-style VGG")
    )
    assert "logits match the module its keys describe to" in line and "validation accuracy" in line
    assert "near chance" in line and "class order" in line  # random weights: about 10 % on 10 classes
    assert out.root.spec.grid == 2 and out.root.operator == "teacher:mine.pth"
    assert any(n.generation == 1 and n.ok for n in open_run(cfg.run_dir).nodes.values())
    trained = len(open_run(cfg.run_dir).nodes)
    again = run_search(cfg, progress=False)  # resumed: nothing retrained, the root read from the run
    assert again.root.node == out.root.node and len(open_run(cfg.run_dir).nodes) == trained


def test_a_teacher_for_other_inputs_is_refused_before_anything_is_recorded(tmp_path, capsys):
    net = he_fill(CifarVGG([8, "M", 16, "M"], in_channels=1, classes=10))
    net.classifier = nn.Linear(16 * 16, 10)
    torch.save(net.state_dict(), tmp_path / "gray.pth")
    run_dir = tmp_path / "run"
    code = main(
        [
            "search",
            "--preset",
            "smoke",
            "--run-dir",
            str(run_dir),
            "--teacher",
            str(tmp_path / "gray.pth"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert (
        "takes 1-channel 16px input with 10 classes, but synthetic has 3 channels" in err[0]
        and "--channels" in err[0]
    )
    assert not (run_dir / "study.db").exists()
    assert importers.TOLERANCE == 1e-4


# -- --normalize: the inputs the root was trained on --------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("dataset", None),
        ("imagenet", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))),
        ("0.5,0.5,0.5/0.25,0.25,0.25", ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))),
        ("0.1/0.3", ((0.1,), (0.3,))),
    ],
)
def test_normalize_names_the_statistics(text, expected):
    from iterkd.config import parse_normalize

    assert parse_normalize(text) == expected


@pytest.mark.parametrize("text", ["mnist", "0.5,0.5/0.2", "0.5/0", "a,b/c,d", "0.5,0.5,0.5"])
def test_a_bad_normalize_is_one_line(text, capsys):
    code = main(["search", "--preset", "smoke", "--run-dir", "/tmp/never-made", "--normalize", text])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--normalize is dataset, imagenet or M1,M2,M3/S1,S2,S3" in err[0]
    assert not Path("/tmp/never-made").exists()


def test_normalize_reaches_training_checkpoints_and_a_resume_keeps_it(tmp_path, capsys):
    cfg = smoke_config(tmp_path / "run", normalize="imagenet", max_generations=1)
    data = cfg.load_data()
    assert (data.info.mean, data.info.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    out = run_search(cfg, progress=False)
    _, _, meta = read_checkpoint(Path(cfg.run_dir) / out.final.checkpoint)
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    code = main(["search", "--run-dir", cfg.run_dir, "--normalize", "dataset"])
    assert code == 2 and "--normalize dataset (run has imagenet)" in capsys.readouterr().err
    gray = smoke_config(tmp_path / "gray", dataset="fashion-mnist", normalize="imagenet")
    with pytest.raises(IterkdError, match="--normalize imagenet gives 3 channel.*fashion-mnist has 1"):
        gray.data_info()


def test_dataparallel_around_the_features_alone_is_undone(tmp_path):
    """PyTorch's ImageNet example wraps only model.features: keys features.module.N.*."""
    net = he_fill(CifarVGG(CFG))
    state = {k.replace("features.", "features.module.", 1): v for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "dp.pth")
    assert logits_gap(load_teacher(tmp_path / "dp.pth", size=32), net) <= 1e-4


@pytest.mark.parametrize(
    "drop, needle",
    [
        ("last bn", "features.5 does not fit"),
        ("extra bn", "does not fit"),
        ("only bn", "features has no conv"),
    ],
)
def test_batch_norm_that_does_not_follow_every_conv_is_one_line(tmp_path, drop, needle):
    state = dict(he_fill(CifarVGG([8, "M", 16, "M"])).state_dict())  # features.0 conv, .1 BN, .4 conv, .5 BN
    if drop == "last bn":
        state = {k: v for k, v in state.items() if not k.startswith("features.5.")}
    elif drop == "extra bn":
        state.update({f"features.7.{k}": v for k, v in nn.BatchNorm2d(16).state_dict().items()})
    else:
        state = {k: v for k, v in state.items() if k.startswith(("features.1.", "classifier"))}
    torch.save(state, tmp_path / "bn.pth")
    with pytest.raises(IterkdError, match="^teacher ") as e:
        load_teacher(tmp_path / "bn.pth", size=32)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_last_block_without_its_pool_is_refused_not_misread(tmp_path):
    """The keys cannot show a max-pool after the last conv; iterkd assumes one. A classifier that
    reads a 2x2 map where that pool would leave 1x1 means the model has none: refused, since the
    rebuilt reference would share iterkd's assumption and the logits check could not catch it."""
    net = he_fill(CifarVGG([8, "M", 16, "M", 16, "M", 16, "M", 8]))  # 32 px: the last block at 2x2
    net.features = nn.Sequential(*list(net.features)[:-1])  # no AvgPool either: the 2x2 map is flattened
    net.classifier = nn.Linear(8 * 4, 10)
    torch.save(he_fill(net).state_dict(), tmp_path / "nopool.pth")
    with pytest.raises(
        IterkdError, match="reads a 2x2 map, but after a max-pool closing the last block the map is 1x1"
    ):
        load_teacher(tmp_path / "nopool.pth", size=32)


def test_torchvisions_vgg_class_on_its_own_widths_imports_against_torchvision():
    """torchvision.models.vgg.VGG(make_layers(cfg)) with a cfg of the user's: checked against that
    class itself, so the 3x3 grid its adaptive pool makes of a 1x1 map is torchvision's, not assumed."""
    with torch.device("meta"):
        features = torchvision.models.vgg.make_layers(
            [8, "M", 16, "M", 16, 16, "M", 32, "M", 32, "M"], batch_norm=True
        )
        model = torchvision.models.vgg.VGG(features, num_classes=3, init_weights=False)
    model.features = he_fill(model.features.to_empty(device="cpu"))
    model.classifier = torchvision_classifier_for(32, 3)
    imported = import_vgg(dict(model.state_dict()), size=32, path=Path("own.pth"))
    assert imported.layout == "torchvision VGG (own conv widths)" and imported.max_diff <= imported.limit
    assert (
        imported.model.spec.blocks == ((8,), (16,), (16, 16), (32,), (32,)) and imported.model.spec.grid == 7
    )
