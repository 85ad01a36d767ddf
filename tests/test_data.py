"""iterkd.data: loading through torchvision from tiny files written in torchvision's on-disk
formats (never the network), Debian's gzipped IDX files, user-facing errors, the seeded
validation split, and on-device augmentation / batching."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import urllib.error

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd

import iterkd.data.named as named
from iterkd.data import (
    DATASETS,
    DataSplits,
    augment,
    augment_draws,
    eval_batches,
    load_data,
    normalize,
    train_batches,
    view_batches,
)
from iterkd.errors import IterkdError

TV_CLASS = {
    "fashion-mnist": "FashionMNIST",
    "mnist": "MNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "svhn": "SVHN",
}
N_TRAIN, N_TEST = 50, 12


@pytest.fixture(autouse=True)
def no_debian_datasets(tmp_path_factory, monkeypatch):
    """Point the Debian auto-detect at an empty folder: this machine may have the real
    /usr/share/datasets/fashion-mnist, which would otherwise be unpacked into every tmp_path."""
    monkeypatch.setattr(named, "DEBIAN_DATASETS", tmp_path_factory.mktemp("no_debian"))


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks CIFAR / SVHN files against the md5 sums of the real downloads, which our
    tiny files cannot match. Replace the module-level check_integrity with an existence check:
    that covers CIFAR10/100._check_integrity and SVHN._check_integrity, and also CIFAR's
    _load_meta, which calls check_integrity(meta, md5) directly (patching only the method would
    still fail there). Missing files still count as missing."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.svhn as svhn

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(cifar, "check_integrity", exists)
    monkeypatch.setattr(svhn, "check_integrity", exists)


# ---------------------------------------------------------------- tiny files in torchvision's formats


def idx_images(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", 2051, n, h, w) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def digit_images(n: int, test: bool) -> np.ndarray:
    """28x28 images that are 255 everywhere except pixel (0, 0) = index and, for test, (0, 1) = 7,
    so every loaded image can be traced back to the file row it came from."""
    x = np.full((n, 28, 28), 255, np.uint8)
    x[:, 0, 0] = np.arange(n)
    x[:, 0, 1] = 7 if test else 255
    return x


def digit_labels(n: int, test: bool) -> np.ndarray:
    i = np.arange(n)
    return (3 * i + 1) % 10 if test else i % 10


def mnist_files(n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict[str, bytes]:
    return {
        "train-images-idx3-ubyte": idx_images(digit_images(n_train, False)),
        "train-labels-idx1-ubyte": idx_labels(digit_labels(n_train, False)),
        "t10k-images-idx3-ubyte": idx_images(digit_images(n_test, True)),
        "t10k-labels-idx1-ubyte": idx_labels(digit_labels(n_test, True)),
    }


def write_mnist(root, cls_name: str = "MNIST", **kw) -> None:
    raw = root / cls_name / "raw"
    raw.mkdir(parents=True)
    for name, blob in mnist_files(**kw).items():
        (raw / name).write_bytes(blob)


def colour_images(n: int) -> np.ndarray:
    """(n, 3, 32, 32): channel c is 40 * (c + 1), red (0, 0) = index and red (0, 1) = 99, so both the
    channel order and the row/column orientation are visible after loading."""
    x = np.empty((n, 3, 32, 32), np.uint8)
    for c in range(3):
        x[:, c] = 40 * (c + 1)
    x[:, 0, 0, 0] = np.arange(n)
    x[:, 0, 0, 1] = 99
    return x


def pickle_to(path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root, per_batch: int = 10, n_test: int = N_TEST) -> None:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for b in range(5):
        idx = np.arange(b * per_batch, (b + 1) * per_batch)
        x = colour_images(5 * per_batch)[idx]
        pickle_to(
            base / f"data_batch_{b + 1}", {"data": x.reshape(per_batch, 3072), "labels": list(idx % 10)}
        )
    pickle_to(
        base / "test_batch",
        {"data": colour_images(n_test).reshape(n_test, 3072), "labels": list((np.arange(n_test) * 3) % 10)},
    )
    pickle_to(base / "batches.meta", {"label_names": list(DATASETS["cifar10"].classes)})


def write_cifar100(root, n_train: int = 120, n_test: int = N_TEST) -> None:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        i = np.arange(n)
        pickle_to(
            base / name,
            {
                "data": colour_images(n).reshape(n, 3072),
                "fine_labels": list((i * 7) % 100),
                "coarse_labels": list(i % 20),
            },
        )
    pickle_to(
        base / "meta",
        {
            "fine_label_names": [f"c{k}" for k in range(100)],
            "coarse_label_names": [f"s{k}" for k in range(20)],
        },
    )


def write_svhn(root, n_train: int = N_TRAIN, n_test: int = N_TEST) -> None:
    sio = pytest.importorskip("scipy.io")
    (root / "svhn").mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        x = colour_images(n).transpose(2, 3, 1, 0)  # the .mat files store X as (H, W, C, N)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, 10 is the digit 0
        sio.savemat(str(root / "svhn" / f"{name}_32x32.mat"), {"X": np.ascontiguousarray(x), "y": y})


def loaded_index(x: torch.Tensor, at: tuple[int, int]) -> torch.Tensor:
    return x[:, 0, at[0], at[1]].long()


# ---------------------------------------------------------------- MNIST-style datasets


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_files_load_padded_to_32_with_labels_and_a_permuted_split(tmp_path, name):
    write_mnist(tmp_path, TV_CLASS[name])
    d = load_data(name, data_dir=tmp_path, val_size=10, download=False)

    assert d.train_x.shape == (N_TRAIN - 10, 1, 32, 32) and d.val_x.shape == (10, 1, 32, 32)
    assert d.test_x.shape == (N_TEST, 1, 32, 32)
    assert d.train_x.dtype == d.val_x.dtype == d.test_x.dtype == torch.uint8
    assert d.train_y.dtype == torch.int64

    originals = torch.from_numpy(digit_images(N_TRAIN, False))
    # The 28x28 content sits at offset 2 (pixel (0, 0) of the file lands at (2, 2)); the border is zero.
    for x, y, test in ((d.train_x, d.train_y, False), (d.val_x, d.val_y, False), (d.test_x, d.test_y, True)):
        x = x[:]  # the split's images, read from the store's memory map
        idx = loaded_index(x, (2, 2))
        src = torch.from_numpy(digit_images(N_TEST, True)) if test else originals
        assert torch.equal(x[:, 0, 2:30, 2:30], src[idx])
        border = x.clone()
        border[:, :, 2:30, 2:30] = 0
        assert border.sum() == 0
        assert torch.equal(y, torch.from_numpy(digit_labels(N_TEST if test else N_TRAIN, test))[idx])

    # train + validation is a permutation of the file's training set; test keeps its file order.
    both = torch.cat([loaded_index(d.train_x, (2, 2)), loaded_index(d.val_x, (2, 2))])
    assert torch.equal(both.sort().values, torch.arange(N_TRAIN))
    assert torch.equal(loaded_index(d.test_x, (2, 2)), torch.arange(N_TEST))
    assert torch.bincount(torch.cat([d.train_y, d.val_y]), minlength=10).tolist() == [5] * 10


def test_data_dir_defaults_to_iterkd_data_env(tmp_path, monkeypatch):
    write_mnist(tmp_path)
    monkeypatch.setenv("ITERKD_DATA", str(tmp_path))
    d = load_data("mnist", val_size=5, download=False)
    assert len(d.train_x) + len(d.val_x) == N_TRAIN


# ---------------------------------------------------------------- CIFAR and SVHN


def check_colour_images(x: torch.Tensor, n_expected: int) -> torch.Tensor:
    assert x.shape == (n_expected, 3, 32, 32) and x.dtype == torch.uint8
    assert (x[:, 1] == 80).all() and (x[:, 2] == 120).all()  # channels in R, G, B order
    assert (x[:, 0, 0, 1] == 99).all() and (x[:, 0, 1, 0] == 40).all()  # rows are rows, columns are columns
    return loaded_index(x, (0, 0))


def test_cifar10_loads_all_five_batches_channels_first(tmp_path, no_md5):
    write_cifar10(tmp_path)
    d = load_data("cifar10", data_dir=tmp_path, val_size=10, download=False)
    idx = torch.cat([check_colour_images(d.train_x, 40), check_colour_images(d.val_x, 10)])
    assert torch.equal(idx.sort().values, torch.arange(50))  # every batch file contributed
    assert torch.equal(torch.cat([d.train_y, d.val_y]), idx % 10)
    assert torch.equal(check_colour_images(d.test_x, N_TEST), torch.arange(N_TEST))
    assert torch.equal(d.test_y, (torch.arange(N_TEST) * 3) % 10)


def test_cifar100_uses_fine_labels(tmp_path, no_md5):
    write_cifar100(tmp_path)
    d = load_data("cifar100", data_dir=tmp_path, val_size=20, download=False)
    idx = torch.cat([check_colour_images(d.train_x, 100), check_colour_images(d.val_x, 20)])
    assert torch.equal(idx.sort().values, torch.arange(120))
    assert torch.equal(torch.cat([d.train_y, d.val_y]), (idx * 7) % 100)
    assert int(torch.cat([d.train_y, d.val_y]).max()) > 20  # fine (100-way), not coarse (20-way) labels
    assert d.info.num_classes == 100
    assert torch.equal(check_colour_images(d.test_x, N_TEST), torch.arange(N_TEST))


def test_svhn_maps_label_10_to_digit_0_and_is_channels_first(tmp_path, no_md5):
    write_svhn(tmp_path)
    d = load_data("svhn", data_dir=tmp_path, val_size=10, download=False)
    idx = torch.cat([check_colour_images(d.train_x, N_TRAIN - 10), check_colour_images(d.val_x, 10)])
    assert torch.equal(idx.sort().values, torch.arange(N_TRAIN))
    y = torch.cat([d.train_y, d.val_y])
    assert torch.equal(y, (idx % 10 + 1) % 10)  # file label 10 -> class 0, 1..9 unchanged
    assert y.dtype == torch.int64 and int(y.min()) == 0 and int(y.max()) == 9
    assert torch.equal(check_colour_images(d.test_x, N_TEST), torch.arange(N_TEST))


# ---------------------------------------------------------------- Debian's dataset packages


def test_debian_gzipped_idx_files_are_unpacked_into_torchvision_layout(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    (debian / "fashion-mnist").mkdir(parents=True)
    files = mnist_files()
    for name, blob in files.items():
        with gzip.open(debian / "fashion-mnist" / f"{name}.gz", "wb") as f:
            f.write(blob)
    monkeypatch.setattr(named, "DEBIAN_DATASETS", debian)
    data_dir = tmp_path / "data"

    d = load_data("fashion-mnist", data_dir=data_dir, val_size=10, download=False)
    assert len(d.train_x) + len(d.val_x) == N_TRAIN and len(d.test_x) == N_TEST
    raw = data_dir / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(files)  # no leftover .part files
    for name, blob in files.items():
        assert (raw / name).read_bytes() == blob

    # Debian's fashion-mnist is not offered as mnist.
    with pytest.raises(IterkdError):
        load_data("mnist", data_dir=data_dir, val_size=10, download=False)


# ---------------------------------------------------------------- missing files, offline


def expected_dir(tmp_path, name):
    return tmp_path / "svhn" if name == "svhn" else tmp_path / TV_CLASS[name]


@pytest.mark.parametrize("name", list(TV_CLASS))
def test_missing_files_without_download_name_the_directory(tmp_path, name):
    with pytest.raises(IterkdError) as err:
        load_data(name, data_dir=tmp_path, val_size=10, download=False)
    msg = str(err.value)
    assert str(expected_dir(tmp_path, name)) in msg and "\n" not in msg
    assert "download" in msg


@pytest.mark.parametrize("name", list(TV_CLASS))
def test_failed_download_is_a_one_line_error(tmp_path, monkeypatch, name):
    def offline(self):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(getattr(tvd, TV_CLASS[name]), "download", offline)
    with pytest.raises(IterkdError) as err:
        load_data(name, data_dir=tmp_path, val_size=10, download=True)
    msg = str(err.value)
    assert "download failed" in msg and "offline" in msg and "\n" not in msg
    assert str(expected_dir(tmp_path, name)) in msg


def test_real_mnist_download_failure_is_still_one_line(tmp_path, monkeypatch):
    """What actually happens offline: torchvision's own MNIST.download tries every mirror and raises
    RuntimeError('Error downloading ...:\\nTried ..., got:\\n...\\n')."""
    import torchvision.datasets.mnist as mnist

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(mnist, "download_and_extract_archive", offline)
    with pytest.raises(IterkdError) as err:
        load_data("mnist", data_dir=tmp_path, val_size=10, download=True)
    assert "download failed" in str(err.value)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- argument errors


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(IterkdError) as err:
        load_data("imagenet", data_dir=tmp_path, download=False)
    msg = str(err.value)
    assert "imagenet" in msg
    assert all(name in msg for name in DATASETS)


@pytest.mark.parametrize("val_size", [0, -1, 2000, 5000])
def test_val_size_out_of_range(tmp_path, val_size):
    with pytest.raises(IterkdError, match="val-size"):
        load_data("synthetic", data_dir=tmp_path, val_size=val_size)


# ---------------------------------------------------------------- validation split


def split_indices(d: DataSplits) -> tuple[set[int], set[int]]:
    return set(loaded_index(d.train_x, (2, 2)).tolist()), set(loaded_index(d.val_x, (2, 2)).tolist())


def test_validation_split_is_disjoint_seeded_and_train_subset_limits_train(tmp_path):
    write_mnist(tmp_path, n_train=200)
    load = lambda **kw: load_data("mnist", data_dir=tmp_path, download=False, **kw)  # noqa: E731

    a = load(val_size=30, seed=0)
    train, val = split_indices(a)
    assert len(train) == 170 and len(val) == 30 and not train & val and train | val == set(range(200))

    b = load(val_size=30, seed=0)
    assert (
        torch.equal(a.val_x[:], b.val_x[:])
        and torch.equal(a.train_x[:], b.train_x[:])
        and torch.equal(a.val_y, b.val_y)
    )
    assert split_indices(load(val_size=30, seed=1))[1] != val

    sub = load(val_size=30, seed=0, train_subset=25)
    sub_train, sub_val = split_indices(sub)
    assert len(sub.train_x) == len(sub.train_y) == 25
    assert sub_val == val and sub_train <= train  # subsetting never leaks validation images into train

    small_test = load(val_size=30, test_subset=5)
    assert (
        torch.equal(loaded_index(small_test.test_x, (2, 2)), torch.arange(5)) and len(small_test.test_y) == 5
    )


# ---------------------------------------------------------------- augmentation


def test_augment_draws_are_a_pure_function_of_seed_and_view():
    torch.manual_seed(1)
    o1, f1 = augment_draws(500, seed=3, view=2)
    torch.manual_seed(2)  # the global RNG plays no part
    o2, f2 = augment_draws(500, seed=3, view=2)
    assert torch.equal(o1, o2) and torch.equal(f1, f2)
    assert o1.shape == (500, 2) and f1.shape == (500,) and f1.dtype == torch.bool
    assert int(o1.min()) == 0 and int(o1.max()) == 8  # crop offsets span the whole 4-pixel padding
    o3, f3 = augment_draws(500, seed=3, view=3)
    assert not torch.equal(o1, o3) and not torch.equal(f1, f3)
    o4, _ = augment_draws(500, seed=4, view=2)
    assert not torch.equal(o1, o4)


def test_augment_crops_with_zero_padding_and_flips_horizontally():
    x = torch.randint(1, 256, (3, 2, 8, 8), dtype=torch.uint8)
    centre = torch.full((3, 2), 4)
    assert torch.equal(augment(x, centre, None), x)
    assert torch.equal(augment(x, centre, torch.zeros(3, dtype=torch.bool)), x)

    down_right = augment(x, torch.zeros(3, 2, dtype=torch.long), None)
    assert torch.equal(down_right[:, :, 4:, 4:], x[:, :, :4, :4])
    assert (down_right[:, :, :4, :] == 0).all() and (down_right[:, :, :, :4] == 0).all()

    up_only = augment(x, torch.tensor([[8, 4]] * 3), None)
    assert torch.equal(up_only[:, :, :4], x[:, :, 4:]) and (up_only[:, :, 4:] == 0).all()

    flips = torch.tensor([True, False, True])
    flipped = augment(x, centre, flips)
    assert torch.equal(flipped[flips], x[flips].flip(-1)) and torch.equal(flipped[1], x[1])

    mixed = augment(x, torch.tensor([[4, 4], [0, 0], [4, 4]]), None)  # offsets apply per sample
    assert torch.equal(mixed[0], x[0]) and torch.equal(mixed[1], down_right[1])


def test_augment_is_every_pixel_taken_from_its_crop_window_as_defined():
    """The window gather gives exactly the images of the definition, pixel by pixel: the padded
    image at (row + dy, col + dx), the column mirrored when flipped."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g)
    offsets, flips = torch.randint(0, 9, (16, 2), generator=g), torch.rand(16, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    expected = torch.empty_like(x)
    for i in range(16):
        dy, dx = offsets[i].tolist()
        for col in range(8):
            src = 7 - col if flips[i] else col
            expected[i, :, :, col] = padded[i, :, dy : dy + 8, dx + src]
    assert torch.equal(augment(x, offsets, flips), expected)
    unflipped = augment(x, offsets, None)
    assert torch.equal(torch.where(flips.view(16, 1, 1, 1), unflipped.flip(-1), unflipped), expected)


def dot_splits(name: str, n: int = 60) -> DataSplits:
    """Black 32x32 images with one bright pixel at (8, 8) and labels = index."""
    info = DATASETS[name]
    x = torch.zeros(n, info.channels, 32, 32, dtype=torch.uint8)
    x[:, :, 8, 8] = 255
    y = torch.arange(n)
    return DataSplits(info, x, y, x[:2], y[:2], x[:2], y[:2])


def test_train_batches_cover_each_sample_once_and_are_reproducible():
    d = dot_splits("mnist", n=60)
    batches = list(train_batches(d, batch_size=16, epoch=0, seed=5))
    assert len(batches) == 3  # the last partial batch (12 samples) is dropped
    idx = torch.cat([b[0] for b in batches])
    assert len(set(idx.tolist())) == len(idx) == 48
    for i, x, y in batches:
        assert x.dtype == torch.float32 and x.shape == (16, 1, 32, 32)
        assert torch.equal(y, d.train_y[i])

    again = list(train_batches(d, batch_size=16, epoch=0, seed=5))
    assert all(torch.equal(p, q) for a, b in zip(batches, again) for p, q in zip(a, b))
    next_epoch = torch.cat([b[0] for b in train_batches(d, batch_size=16, epoch=1, seed=5)])
    assert not torch.equal(next_epoch, idx)

    whole = list(train_batches(d, batch_size=100, epoch=0, seed=5))  # batch larger than the set: one batch
    assert len(whole) == 1 and sorted(whole[0][0].tolist()) == list(range(60))


def dot_columns(batches) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batches = list(batches)
    idx = torch.cat([b[0] for b in batches])
    x = torch.cat([b[1] for b in batches])
    bright = x[:, 0] == x.max()
    assert (bright.flatten(1).sum(1) == 1).all()  # the dot is always inside the crop
    pos = bright.flatten(1).to(torch.uint8).argmax(1)
    return idx, pos // 32, pos % 32


def test_train_batches_normalise_and_augment_per_dataset():
    # Unaugmented: exactly the normalised stored images.
    d = dot_splits("cifar10", n=40)
    for i, x, _ in train_batches(d, 8, epoch=0, seed=0, augmented=False):
        mean = torch.tensor(d.info.mean).view(1, 3, 1, 1)
        std = torch.tensor(d.info.std).view(1, 3, 1, 1)
        assert torch.allclose(x, (d.train_x[i].float() / 255 - mean) / std)

    # Digits are shifted by at most 4 pixels but never flipped: the dot stays in columns 4..12.
    _, rows, cols = dot_columns(train_batches(dot_splits("mnist"), 20, epoch=0, seed=0))
    assert rows.min() >= 4 and rows.max() <= 12 and cols.min() >= 4 and cols.max() <= 12
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 1

    # Clothes are flipped too: some dots move to the mirrored columns 19..27.
    _, _, cols = dot_columns(train_batches(dot_splits("fashion-mnist"), 20, epoch=0, seed=0))
    assert ((cols <= 12) | (cols >= 19)).all() and (cols >= 19).any() and (cols <= 12).any()


def test_train_batches_reuse_augmentation_views():
    d = dot_splits("fashion-mnist")

    def images(epoch):
        idx, rows, cols = dot_columns(train_batches(d, 20, epoch=epoch, seed=0, views=2))
        return {int(i): (int(r), int(c)) for i, r, c in zip(idx, rows, cols)}

    e0, e1, e2 = images(0), images(1), images(2)
    assert e0 == e2  # same view: every sample gets the same crop and flip again
    assert e0 != e1


def dot_positions(batches) -> dict[int, tuple[int, int]]:
    idx, rows, cols = dot_columns(batches)
    return {int(i): (int(r), int(c)) for i, r, c in zip(idx, rows, cols)}


def test_view_batches_are_the_images_train_batches_show_in_that_view():
    d = dot_splits("fashion-mnist")
    views = [dot_positions(view_batches(d, seed=7, view=v, batch_size=25)) for v in (0, 1)]
    assert views[0] != views[1]
    for epoch, shuffle_seed in (
        (0, 1),
        (1, 2),
        (2, 3),
    ):  # shuffling has its own seed; augmentation follows augment_seed
        shown = dot_positions(train_batches(d, 20, epoch, seed=shuffle_seed, views=2, augment_seed=7))
        assert len(shown) == 60 and all(views[epoch % 2][i] == pos for i, pos in shown.items())
    order = torch.cat([i for i, _ in view_batches(d, seed=7, view=0, batch_size=25)])
    assert torch.equal(order, torch.arange(60))  # every sample once, in index order, the last batch partial


def test_eval_batches_are_normalised_in_order():
    x = torch.arange(0, 250, dtype=torch.uint8).view(10, 1, 5, 5)
    y = torch.arange(10)
    info = DATASETS["mnist"]
    out = list(eval_batches(x, y, info, batch_size=4))
    assert [len(b[1]) for b in out] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in out]), y)
    assert torch.allclose(torch.cat([b[0] for b in out]), normalize(x, info))
    assert normalize(
        torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1), info
    ).flatten().tolist() == pytest.approx([-0.1307 / 0.3081, (1 - 0.1307) / 0.3081])


# ---------------------------------------------------------------- synthetic


def test_synthetic_dataset_shapes_classes_and_determinism(tmp_path):
    a = load_data("synthetic", data_dir=tmp_path, val_size=200)
    assert a.train_x.shape == (1800, 3, 16, 16) and a.val_x.shape == (200, 3, 16, 16)
    assert a.test_x.shape == (500, 3, 16, 16) and a.train_x.dtype == torch.uint8
    for y in (a.train_y, a.val_y, a.test_y):
        assert set(y.tolist()) == set(range(10))
    b = load_data("synthetic", data_dir=tmp_path, val_size=200)
    assert all(
        torch.equal(getattr(a, k)[:], getattr(b, k)[:])
        for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
    )
    other_seed = load_data("synthetic", data_dir=tmp_path, val_size=200, seed=1)
    assert torch.equal(other_seed.test_x[:], a.test_x[:]) and not torch.equal(other_seed.val_x[:], a.val_x[:])
    assert not (tmp_path.exists() and any(tmp_path.iterdir()))  # nothing downloaded or written

    # Learnable: nearest class mean on the training images classifies most test images.
    means = torch.stack([a.train_x[a.train_y == c].float().mean(0) for c in range(10)])
    dist = ((a.test_x[:].float()[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    assert (dist.argmin(1) == a.test_y).float().mean() > 0.5


def test_present_but_truncated_files_are_reported_as_unreadable_not_missing(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (raw / name).write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x05")  # header says 5 images, no pixels
    with pytest.raises(IterkdError, match="unreadable") as err:
        load_data("mnist", data_dir=tmp_path, val_size=2, download=False)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- hostile files


def write_idx_pair(root, images: np.ndarray, labels: np.ndarray, cls_name: str = "MNIST") -> tuple:
    """MNIST files whose training pair is `images`, `labels` (the test pair is intact)."""
    write_mnist(root, cls_name)
    raw = root / cls_name / "raw"
    (raw / "train-images-idx3-ubyte").write_bytes(idx_images(images))
    (raw / "train-labels-idx1-ubyte").write_bytes(idx_labels(labels))
    return raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"


def load_error(tmp_path) -> str:
    with pytest.raises(IterkdError) as err:
        load_data("mnist", data_dir=tmp_path, val_size=5, download=False)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("n_images, n_labels", [(N_TRAIN, 40), (20, N_TRAIN)])
def test_images_and_labels_of_different_counts_are_refused_naming_both_files(tmp_path, n_images, n_labels):
    # 20 images against 50 labels used to train on misaligned labels; 40 labels for 50 images was an IndexError.
    images, labels = write_idx_pair(tmp_path, digit_images(n_images, False), digit_labels(n_labels, False))
    msg = load_error(tmp_path)
    assert f"{images} holds {n_images} images but {labels} holds {n_labels} labels" in msg


def test_a_label_outside_the_classes_is_refused_at_load_time(tmp_path):
    y = digit_labels(N_TRAIN, False)
    y[17] = 250  # was "Target 250 is out of bounds" in the middle of training
    _, labels = write_idx_pair(tmp_path, digit_images(N_TRAIN, False), y)
    assert f"{labels}: label 250 (sample 17) is not a class; mnist has classes 0..9" in load_error(tmp_path)


@pytest.mark.parametrize("h, w", [(40, 40), (28, 30)])
def test_images_larger_than_the_dataset_or_not_square_are_refused(tmp_path, h, w):
    images, _ = write_idx_pair(tmp_path, np.zeros((N_TRAIN, h, w), np.uint8), digit_labels(N_TRAIN, False))
    assert f"{images} holds images of shape (1, {h}, {w})" in load_error(tmp_path)


@pytest.mark.parametrize(
    "blob, message",
    [
        (
            b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x01\x02\x03",
            "not an IDX file of 3-D unsigned bytes",
        ),
        (
            b"\x00\x00\x0d\x03" + struct.pack(">III", 2, 2, 2) + b"\x00" * 32,
            "(its header starts 00000d03, expected 00000803)",
        ),
        (b"", "its header starts empty"),
        (
            struct.pack(">IIII", 2051, 4_000_000_000, 28, 28) + b"\x00" * 784,
            "promises 4000000000 x 28 x 28 bytes",
        ),
        (struct.pack(">IIII", 2051, 1, 28, 28) + b"\x00" * 785, "bytes of data but it holds 785"),
    ],
)
def test_idx_headers_are_checked_before_torchvision_reads_the_file(tmp_path, blob, message):
    write_mnist(tmp_path)
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(blob)
    msg = load_error(tmp_path)
    assert msg.startswith(f"mnist file {images} is unreadable") and message in msg


def test_data_dir_that_is_a_file_is_one_line(tmp_path):
    blocker = tmp_path / "data.tar"
    blocker.write_text("")
    for data_dir in (blocker, blocker / "sub"):
        with pytest.raises(IterkdError, match=f"{blocker} is a file, not a directory; pass --data-dir DIR"):
            load_data("mnist", data_dir=data_dir, val_size=5, download=False)


def test_cifar_labels_outside_the_classes_name_the_folder(tmp_path, no_md5):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    with open(batch, "rb") as f:
        content = pickle.load(f)
    content["labels"][4] = 10
    pickle_to(batch, content)
    with pytest.raises(
        IterkdError, match="cifar-10-batches-py: label 10 .* is not a class; cifar10 has classes 0..9"
    ):
        load_data("cifar10", data_dir=tmp_path, val_size=5, download=False)
