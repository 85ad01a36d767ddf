"""Your own images: an ImageFolder tree as a dataset (iterkd.data.folder), decoded once into the
memory-mapped store (iterkd.data.store) that every path reads, and the refusals of bad input.
Trees are generated here, small; real Fashion-MNIST images are used when Debian's package is there."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iterkd.cli import main
from iterkd.data import FOLDER, Images, load_data, open_dataset, padded_side
from iterkd.data import store as store_mod
from iterkd.data.folder import IMG_EXTENSIONS, list_folder
from iterkd.data.info import FASHION_CLASSES
from tests.conftest import FASHION_DIR
from tests.test_cli import one_line_error, run

RNG = np.random.default_rng(0)


def save(path: Path, pixels: np.ndarray, mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path, **kw)
    return path


def tree(
    root: Path, parts=("train", "test"), classes=("ant", "bee", "cat"), n=12, side=16, grey=False
) -> Path:
    """A tree whose class c's images are a noisy constant c*80 (so a tiny CNN learns it)."""
    for part in parts:
        for c, name in enumerate(classes):
            for i in range(n):
                shape = (side, side) if grey else (side, side, 3)
                x = np.clip(c * 80 + RNG.integers(-20, 21, shape), 0, 255).astype(np.uint8)
                save(root / part / name / f"{i:03d}.png", x)
    return root


def test_extensions_are_torchvisions():
    from torchvision.datasets.folder import IMG_EXTENSIONS as TV

    assert IMG_EXTENSIONS == TV


def test_a_tree_is_decoded_once_into_a_memory_mapped_store_pixel_for_pixel(tmp_path):
    root = tree(tmp_path / "imgs")
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    store = open_dataset(FOLDER, root, progress=False)
    assert store.meta["classes"] == ["ant", "bee", "cat"] and store.meta["ignored_files"] == 1
    assert (store.meta["channels"], store.meta["size"], store.meta["raw_size"]) == (3, 16, 16)
    assert isinstance(store.images.numpy().base, np.memmap) or store.images.numpy().base is not None
    src = np.asarray(Image.open(root / "train" / "bee" / "003.png")).transpose(2, 0, 1)
    row = list_folder(root).files.index(root / "train" / "bee" / "003.png")
    assert np.array_equal(store.images[row].numpy(), src) and int(store.labels[row]) == 1
    # Reopened, not decoded again: the same store, found by its files' names, sizes and times.
    again = open_dataset(FOLDER, root, progress=False)
    assert again.path == store.path and again.content_hash == store.content_hash

    data = load_data(FOLDER, root, seed=0, progress=False)
    assert isinstance(data.train_x, Images) and data.train_x.base.data_ptr() == data.val_x.base.data_ptr()
    assert len(data.val_x) == 4 and torch.bincount(data.val_y, minlength=3).tolist() == [
        2,
        1,
        1,
    ]  # 10 %, stratified
    assert len(data.train_x) == 32 and len(data.test_x) == 36 and data.has_test
    # The normalisation: per-channel mean and std over every training pixel (not per-image stds).
    pixels = np.stack([np.asarray(Image.open(p)) for p in sorted((root / "train").rglob("*.png"))]).astype(
        np.float64
    )
    assert np.allclose(data.info.mean, pixels.mean((0, 1, 2)) / 255, atol=1e-5)
    assert np.allclose(data.info.std, pixels.std((0, 1, 2)) / 255, atol=1e-5)


def test_mixed_sizes_are_resized_to_the_most_common_side_then_centre_cropped(tmp_path):
    root = tree(tmp_path / "imgs", parts=("train",), n=5, side=16)
    save(root / "train" / "ant" / "big.png", np.full((24, 24, 3), 200, np.uint8))
    wide = np.zeros((16, 48, 3), np.uint8)  # left third red, middle blue, right green
    wide[:, :16, 0], wide[:, 16:32, 2], wide[:, 32:, 1] = 255, 255, 255
    save(root / "train" / "bee" / "wide.png", wide)
    jpeg = save(root / "train" / "cat" / "photo.jpg", np.full((16, 16, 3), 90, np.uint8), quality=95)
    store = open_dataset(FOLDER, root, progress=False)
    files = list_folder(root).files
    big, w, j = (
        store.images[files.index(p)].numpy()
        for p in (files[0].parent / "big.png", root / "train" / "bee" / "wide.png", jpeg)
    )
    assert store.meta["raw_size"] == 16 and store.meta["resized"]
    assert (big == 200).all()  # a uniform 24x24 image resized to 16x16 stays uniform
    assert tuple(w[:, 8, 8]) == (0, 0, 255)  # the centre square of the wide image is its blue middle
    assert np.abs(j.astype(int) - 90).max() <= 3  # JPEG decoded

    sized = open_dataset(FOLDER, root, image_size=8, progress=False)
    assert sized.path != store.path and (sized.meta["raw_size"], sized.meta["size"]) == (8, 8)


def test_exif_orientation_is_applied_and_alpha_dropped_like_imagefolder(tmp_path):
    root = tree(tmp_path / "imgs", parts=("train",), n=3)
    corner = np.zeros((16, 16, 3), np.uint8)
    corner[:8, :8] = 255  # top-left white as stored ...
    exif = Image.Exif()
    exif[0x0112] = 3  # ... shown rotated by 180 degrees
    save(root / "train" / "ant" / "rotated.jpg", corner, exif=exif, quality=100)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0
    save(root / "train" / "bee" / "alpha.png", rgba, "RGBA")
    store = open_dataset(FOLDER, root, progress=False)
    files = list_folder(root).files
    rotated = store.images[files.index(root / "train" / "ant" / "rotated.jpg")].numpy()
    assert rotated[:, 12, 12].min() > 200 and rotated[:, 4, 4].max() < 50  # now bottom-right
    alpha = store.images[files.index(root / "train" / "bee" / "alpha.png")].numpy()
    assert tuple(alpha[:, 0, 0]) == (10, 20, 30)


def test_grey_when_every_image_has_one_band_and_channels_overrides(tmp_path):
    root = tree(tmp_path / "imgs", parts=("train",), n=4, side=28, grey=True)
    grey = open_dataset(FOLDER, root, progress=False)
    assert (grey.meta["channels"], grey.meta["size"]) == (1, padded_side(28)) == (1, 32)
    rgb = open_dataset(FOLDER, root, channels=3, progress=False)
    assert rgb.meta["channels"] == 3 and torch.equal(rgb.images[:, 0], rgb.images[:, 2])


def test_a_folders_own_val_is_the_validation_split_and_a_missing_test_means_no_test(tmp_path):
    root = tree(tmp_path / "imgs", parts=("train", "val"), n=6)
    data = load_data(FOLDER, root, progress=False)
    assert len(data.val_x) == 18 and len(data.train_x) == 18 and data.val_from_folder
    assert not data.has_test and len(data.test_x) == 0
    half = load_data(FOLDER, tree(tmp_path / "noval", parts=("train",), n=10), val_size=0.5, progress=False)
    assert len(half.val_x) == 15 and torch.bincount(half.val_y).tolist() == [5, 5, 5]  # stratified


SMOKE = ["search", "--preset", "smoke", "--dataset", "imagefolder", "--max-drop", "60", "--no-progress"]


def truncated(root: Path) -> Path:
    path = root / "train" / "bee" / "000.png"
    path.write_bytes(path.read_bytes()[:60])
    return path


@pytest.mark.parametrize(
    "make, extra, needles",
    [
        (lambda r: r.mkdir(parents=True) or r, [], ["has no train/ folder", "DIR/train/<class>/<image>"]),
        (lambda r: tree(r, classes=("only",)), [], ["1 class folder(s); a classifier needs at least 2"]),
        (lambda r: (tree(r) / "train" / "empty").mkdir() or r, [], ["class folder", "empty has no images"]),
        (
            lambda r: (tree(r) / "test" / "zebra").mkdir() or r,
            [],
            ["class folder(s) that train/ lacks: zebra"],
        ),
        (
            lambda r: truncated(tree(r)).parent.parent.parent,
            [],
            ["1 of 72 images cannot be read", "000.png", "--skip-bad-images"],
        ),
        (lambda r: (r.write_text("x"), r)[1], [], ["is a file"]),
        (lambda r: tree(r), ["--image-size", "4"], ["--image-size must be between 8 and 512, got 4"]),
        (lambda r: tree(r), ["--channels", "2"], ["--channels must be 1 or 3, got 2"]),
    ],
    ids=["no-train", "one-class", "empty-class", "unknown-class", "truncated", "file", "size", "channels"],
)
def test_bad_folders_are_one_line_and_record_nothing(tmp_path, capsys, make, extra, needles):
    root = make(tmp_path / "imgs")
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, *SMOKE, "--data-dir", str(root), "--run-dir", str(run_dir), *extra)
    one_line_error(code, err, *needles)
    assert not run_dir.exists()


def test_a_decompression_bomb_is_a_bad_image(tmp_path, monkeypatch, capsys):
    root = tree(tmp_path / "imgs")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 16x16 = 256 pixels: over the bound
    code, _, err = run(capsys, *SMOKE, "--data-dir", str(root), "--run-dir", str(tmp_path / "run"))
    one_line_error(code, err, "cannot be read", "DecompressionBomb")


def test_a_disk_too_full_for_the_store_is_one_line_and_leaves_no_store(tmp_path, monkeypatch, capsys):
    root = tree(tmp_path / "imgs")
    monkeypatch.setattr(store_mod, "free_bytes", lambda path: 1000)
    code, _, err = run(capsys, *SMOKE, "--data-dir", str(root), "--run-dir", str(tmp_path / "run"))
    one_line_error(code, err, "not enough disk space for the decoded dataset", "ITERKD_STORE")
    assert not (tmp_path / "run").exists()
    assert not [p for p in store_mod.store_root().iterdir() if p.name.startswith(".tmp-")]


def test_skip_bad_images_leaves_them_out_and_records_how_many(tmp_path):
    root = tree(tmp_path / "imgs")
    bad = truncated(root)
    store = open_dataset(FOLDER, root, skip_bad=True, progress=False)
    assert store.meta["skipped_images"] == 1 and store.identity()["skipped_images"] == 1  # the run records it
    row = list_folder(root).files.index(bad)
    assert all(row not in idx.tolist() for idx in store.parts.values())


def test_a_search_on_a_folder_resumes_from_a_moved_copy_reports_and_exports_class_names(tmp_path, capsys):
    import onnx

    root = tree(tmp_path / "imgs", n=16)
    run_dir = tmp_path / "run"
    code, out, err = run(
        capsys, *SMOKE, "--max-generations", "1", "--data-dir", str(root), "--run-dir", str(run_dir)
    )
    assert code == 0, err
    moved = tmp_path / "elsewhere"
    shutil.move(root, moved)
    code, out, err = run(capsys, "resume", str(run_dir), "--data-dir", str(moved), "--no-progress")
    assert code == 0, err
    assert main(["report", str(run_dir)]) == 0
    assert main(["export", str(run_dir), "--format", "onnx", "--data-dir", str(moved)]) == 0
    export = next((run_dir / "export").iterdir())
    card = (export / "MODEL_CARD.md").read_text()
    assert "0: ant, 1: bee, 2: cat" in card
    props = {p.key: p.value for p in onnx.load(str(export / "model.onnx")).metadata_props}
    assert json.loads(props["classes"]) == ["ant", "bee", "cat"]
    from iterkd.checkpoints import read_checkpoint

    _, _, meta = read_checkpoint(run_dir / "checkpoints" / "node-0.safetensors")
    assert meta["classes"] == ["ant", "bee", "cat"] and len(meta["mean"]) == 3

    # Other images under the same path: refused in one line, the run untouched.
    img = moved / "train" / "ant" / "000.png"
    save(img, np.zeros((16, 16, 3), np.uint8))
    code, _, err = run(capsys, "resume", str(run_dir), "--data-dir", str(moved), "--no-progress")
    one_line_error(code, err, "are not the ones this run was made with")


def test_a_folder_without_test_searches_and_reports_no_test_accuracy(tmp_path, capsys):
    root = tree(tmp_path / "imgs", parts=("train",), n=20)
    run_dir = tmp_path / "run"
    code, out, err = run(
        capsys,
        *SMOKE,
        "--max-generations",
        "1",
        "--data-dir",
        str(root),
        "--run-dir",
        str(run_dir),
        "--flip",
        "off",
    )
    assert code == 0, err
    import pandas as pd

    lineage = pd.read_csv(run_dir / "lineage.csv")
    assert lineage.test_acc.isna().all() and lineage.val_acc.notna().all()
    assert json.loads((run_dir / "config.json").read_text())["flip"] == "off"


def test_data_list_and_remove(tmp_path, capsys):
    store = open_dataset(FOLDER, tree(tmp_path / "imgs", n=2), progress=False)
    code, out, _ = run(capsys, "data", "list")
    assert code == 0 and store.key in out and str(tmp_path / "imgs") in out
    code, out, _ = run(capsys, "data", "remove", store.key)
    assert code == 0 and "removed store" in out and not store.path.exists()
    code, _, err = run(capsys, "data", "remove", store.key)
    one_line_error(code, err, "no store", "iterkd data list")


def idx_arrays(kind: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(FASHION_DIR / f"{kind}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_DIR / f"{kind}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return x, y


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_pngs_give_the_idx_pixels_and_statistics(tmp_path):
    """A few hundred real Fashion-MNIST images written as PNGs: the folder's store holds exactly the
    IDX path's uint8 tensors (28 -> 32, zero-padded the same way), and the statistics formula gives
    the published normalisation over the whole training set."""
    x, y = idx_arrays("train")
    names = [c.replace("/", "_") for c in FASHION_CLASSES]  # a folder name has no "/"
    root = tmp_path / "fmnist"
    for i in range(300):
        save(root / "train" / f"{y[i]}-{names[y[i]]}" / f"{i:05d}.png", x[i])
    folder = open_dataset(FOLDER, root, progress=False)
    assert (folder.meta["channels"], folder.meta["size"], folder.meta["raw_size"]) == (1, 32, 28)
    named = open_dataset("fashion-mnist", tmp_path / "data", progress=False)
    files = list_folder(root).files
    for row, path in enumerate(files):
        i = int(path.stem)
        assert torch.equal(folder.images[row], named.images[i]) and int(folder.labels[row]) == int(
            named.labels[i]
        )
    # The per-pixel statistics formula over all 60,000 training images gives the registry's values.
    xs = x.astype(np.float64) / 255
    assert (round(xs.mean(), 4), round(xs.std(), 4)) == (0.2860, 0.3530)
