"""iterkd.compress: a trained nn.Module and in-memory datasets in, the same search out (run directory,
resume); Python datasets go into the same memory-mapped store as folders, one way for every kind of
image; `import iterkd` stays light."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import iterkd
import iterkd.trainer
from iterkd.data import STORED, load_data, python_store
from iterkd.errors import IterkdError
from iterkd.models import VGG
from iterkd.run import open_run
from tests.conftest import he_fill
from tests.test_import import CifarVGG


class Blobs(torch.utils.data.Dataset):
    """4 classes of 16-pixel RGB images: a class pattern plus noise, as `kind` images."""

    def __init__(self, n, seed, kind="uint8", side=16):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 4, (n,), generator=g)
        patterns = torch.rand(4, 3, side, side, generator=torch.Generator().manual_seed(9))
        self.x = (0.7 * patterns[self.y] + 0.3 * torch.rand(n, 3, side, side, generator=g)).clamp(0, 1)
        self.x = (self.x * 255).round() / 255  # exact in uint8, so every kind stores the same pixels
        self.kind = kind

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        if self.kind == "float":
            return x, int(self.y[i])
        pixels = (x * 255).round().to(torch.uint8)
        if self.kind == "pil":
            return Image.fromarray(pixels.permute(1, 2, 0).numpy()), int(self.y[i])
        return pixels, self.y[i]  # a 0-d int64 tensor label, as TensorDataset gives


def small_vgg() -> nn.Module:
    net = he_fill(CifarVGG([8, "M", 16, "M"], classes=4))
    net.classifier = nn.Linear(16 * 16, 4)
    return he_fill(net)


SEARCH = dict(max_drop=60.0, preset="smoke", max_generations=1, progress=False, width=1 / 16)


def test_compress_shrinks_a_vgg_module_on_in_memory_datasets_and_resumes(tmp_path):
    model = small_vgg()
    run_dir = tmp_path / "run"
    out = iterkd.compress(model, Blobs(300, 0), Blobs(100, 1, "float"), run_dir=run_dir, **SEARCH)
    cfg = open_run(run_dir).cfg
    assert cfg.dataset == STORED and cfg.teacher == (str(run_dir / "model" / "model.safetensors"),)
    assert out.root.operator == "teacher:model.safetensors" and out.final.generation >= 1
    # The final model, ready to use: eval mode, the final checkpoint's weights.
    assert isinstance(out.model, VGG) and not out.model.training and out.model.spec == out.final.spec
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(out.model(x), iterkd.load(run_dir / out.final.checkpoint)(x))
    # The given validation set is the run's validation split (not a share of train).
    data = cfg.load_data()
    assert len(data.val_y) == 100 and len(data.train_y) == 300
    trained = len(open_run(run_dir).nodes)
    again = iterkd.compress(model, Blobs(300, 0), Blobs(100, 1, "float"), run_dir=run_dir, **SEARCH)
    assert again.final.node == out.final.node and len(open_run(run_dir).nodes) == trained
    # The CLI resumes the same run from its directory: the store is found by its key.
    assert iterkd.cli.main(["search", "--run-dir", str(run_dir), "--no-progress"]) == 0


class ViewNet(nn.Module):
    """Not a VGG, and strict about its input: 12x12 pixels, flattened with .view (contiguous only)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 12 * 12, 4)

    def forward(self, x):
        return self.fc(x.view(x.shape[0], -1))


def test_compress_makes_any_other_module_a_frozen_teacher_on_the_images_own_size(tmp_path, capsys):
    # nn.Sequential's forward names its argument `input`; the 12 px images are padded to 16 for the
    # VGGs, but the teacher sees them as they are, contiguous, exported and run at 12 px.
    torch.manual_seed(0)
    model = nn.Sequential(ViewNet())
    run_dir = tmp_path / "run"
    out = iterkd.compress(model, Blobs(300, 0, side=12), run_dir=run_dir, **SEARCH)
    said = capsys.readouterr().out
    assert "is no VGG iterkd can shrink" in said and "frozen teacher" in said
    assert (run_dir / "model" / "model.pt2").is_file() and out.root.operator == "kd:model.pt2"
    assert out.root.frozen[0]["params"] == sum(p.numel() for p in model.parameters())
    assert isinstance(out.model, VGG) and out.model.spec.input_size == 16
    # The program reproduces the module on the images, whatever the batch size.
    teacher = iterkd.trainer.frozen_teacher(
        run_dir, out.root.frozen[0], open_run(run_dir).cfg, open_run(run_dir).cfg.data_info()
    )
    x = torch.rand(5, 3, 12, 12)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2)).contiguous(memory_format=torch.channels_last)
    assert torch.allclose(teacher(padded), model(x), atol=1e-5)


def test_every_kind_of_image_is_stored_alike_once_under_its_content(tmp_path):
    stores = [
        python_store(Blobs(40, 3, kind), progress=False, log=lambda s: None)
        for kind in ("uint8", "float", "pil")
    ]
    assert len({s.key for s in stores}) == 1  # same pixels and labels: one store, reused
    store = stores[0]
    assert store.key.startswith("python-") and store.meta["raw_size"] == 16 and store.meta["channels"] == 3
    expected = (Blobs(40, 3).x * 255).round().to(torch.uint8)
    assert torch.equal(store.images[:40], expected) and torch.equal(store.labels, Blobs(40, 3).y)
    info = store.info()
    assert info.class_names == ["0", "1", "2", "3"]
    assert np.allclose(info.mean, Blobs(40, 3).x.mean((0, 2, 3)).numpy(), atol=1e-5)
    named = python_store(Blobs(40, 3), classes=["a", "b", "c", "d"], progress=False, log=lambda s: None)
    assert named.key != store.key and named.info().class_names == ["a", "b", "c", "d"]
    data = load_data(STORED, store=store, seed=0)  # read as every store is: a stratified validation share
    assert len(data.val_y) + len(data.train_y) == 40


class Items(torch.utils.data.Dataset):
    def __init__(self, *items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


GOOD = torch.rand(3, 16, 16)


@pytest.mark.parametrize(
    "items, needle",
    [
        ((GOOD, (GOOD - 0.5) / 0.25), "outside [0, 1]: give images as ToTensor leaves them, not normalised"),
        ((torch.rand(3, 16, 12),), "iterkd needs square images"),
        ((GOOD, torch.rand(3, 20, 20)), "train[1] is [3, 20, 20] (C, H, W), but train[0] is [3, 16, 16]"),
        ((GOOD, torch.rand(4, 16, 16)), "train[1] has shape [4, 16, 16]"),
        (("a picture",), "train[0] is a str"),
    ],
    ids=["normalised", "not-square", "sizes", "channels", "not-an-image"],
)
def test_datasets_that_are_not_images_in_0_1_are_one_line(items, needle):
    with pytest.raises(IterkdError, match=None) as e:
        python_store(Items(*[(x, 0) for x in items]), progress=False, log=lambda s: None)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "label, needle", [(1.0, "has label 1.0"), (-1, "has label -1"), ("cat", "has label 'cat'")]
)
def test_labels_must_be_class_indices(label, needle):
    with pytest.raises(IterkdError, match="labels are class indices") as e:
        python_store(Items((GOOD, 0), (GOOD, label)), progress=False, log=lambda s: None)
    assert needle in str(e.value)


def test_a_run_whose_store_is_gone_is_one_line(tmp_path, capsys):
    code = iterkd.cli.main(
        ["search", "--dataset", STORED, "--data-dir", "python-nothing", "--run-dir", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'python-nothing' is not there" in err[0]
    assert not (tmp_path / "r").exists()


def test_import_iterkd_stays_light():
    # What `import iterkd` loaded before iterkd.compress existed (torch, optuna, pandas and their
    # dependencies): compress must not add torchvision, PIL, ONNX or plotting to it.
    code = (
        "import sys, iterkd;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torchvision', 'PIL', 'onnx', 'onnxruntime', "
        "'matplotlib', 'torch_pruning', 'optuna_dashboard'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("'", '"')) == []
    assert "compress" in iterkd.__all__ and callable(iterkd.compress)


class Augmenting(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.rand(3, 16, 16), 0  # a random transform: other pixels at every read


def test_a_dataset_with_a_random_transform_is_refused_and_colour_modes_stay_colour():
    with pytest.raises(IterkdError, match="differs each time it is read: the dataset has a random transform"):
        python_store(Augmenting(), progress=False, log=lambda s: None)
    rgba = Image.fromarray((np.random.default_rng(0).random((16, 16, 4)) * 255).astype(np.uint8), "RGBA")
    store = python_store(Items((rgba, 0), (rgba.convert("RGB"), 1)), progress=False, log=lambda s: None)
    assert store.meta["channels"] == 3 and torch.equal(store.images[0], store.images[1])
