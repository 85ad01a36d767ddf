"""Datasets as in-memory uint8 tensors (through torchvision), a seeded validation split, and a
batch iterator that augments on the device with tensor ops (no per-sample Python, no workers)."""

from __future__ import annotations

import functools
import gzip
import math
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import IterkdError

DIGITS = tuple("0123456789")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEBIAN_DATASETS = Path("/usr/share/datasets")
IDX_CLASSES = ("MNIST", "FashionMNIST")  # torchvision classes that read IDX files
# Batches of inference (validation, test, filling a teacher cache): on one CPU thread 256 images a
# batch ran 1.26-1.41x faster than 1000 (whose activations outgrow the caches), 128 no faster.
EVAL_BATCH = 256


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    torchvision_class: str | None
    channels: int
    num_classes: int
    size: int  # side after padding to a power of two, so five VGG pools end at 1x1
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool  # horizontal flips preserve the label (not for digits)
    classes: tuple[str, ...] = ()


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        "fashion-mnist",
        "FashionMNIST",
        1,
        10,
        32,
        (0.2860,),
        (0.3530,),
        True,
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
    "mnist": DatasetInfo("mnist", "MNIST", 1, 10, 32, (0.1307,), (0.3081,), False, DIGITS),
    "cifar10": DatasetInfo(
        "cifar10",
        "CIFAR10",
        3,
        10,
        32,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        True,
        CIFAR10_CLASSES,
    ),
    "cifar100": DatasetInfo(
        "cifar100", "CIFAR100", 3, 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True
    ),
    "svhn": DatasetInfo(
        "svhn", "SVHN", 3, 10, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False, DIGITS
    ),
    "synthetic": DatasetInfo("synthetic", None, 3, 10, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), False),
}


@dataclass
class DataSplits:
    """uint8 images (N, C, H, W) and int64 labels for train / validation / test.

    Validation is carved out of the training set and drives every selection and stop decision;
    test is only reported."""

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def to(self, device: torch.device) -> DataSplits:
        moved = {
            k: getattr(self, k).to(device)
            for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
        }
        return DataSplits(self.info, **moved)


def default_data_dir() -> Path:
    return Path(os.environ.get("ITERKD_DATA", Path.home() / ".cache" / "iterkd" / "data"))


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise IterkdError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def load_data(
    name: str,
    data_dir: str | Path | None = None,
    *,
    val_size: int = 5000,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    download: bool = True,
) -> DataSplits:
    """Load a dataset, split a seeded validation set off its training set, and subsample if asked."""
    info = dataset_info(name)
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if name == "synthetic":
        (tx, ty), (sx, sy) = synthetic_arrays(seed=1234)
    else:
        _check_data_dir(data_dir)
        (tx, ty), (sx, sy) = _torchvision_arrays(info, data_dir, download)
    tx, sx = _pad_to(tx, info.size), _pad_to(sx, info.size)
    if not 0 < val_size < len(tx):
        raise IterkdError(f"--val-size must be between 1 and {len(tx) - 1} for {name}, got {val_size}")
    perm = torch.randperm(len(tx), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if train_subset:
        train_idx = train_idx[:train_subset]
    if test_subset:
        sx, sy = sx[:test_subset], sy[:test_subset]
    return DataSplits(info, tx[train_idx], ty[train_idx], tx[val_idx], ty[val_idx], sx, sy)


def _pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    pad = size - x.shape[-1]
    return F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)) if pad > 0 else x


def synthetic_arrays(
    seed: int = 1234, n_train: int = 2000, n_test: int = 500, size: int = 16, classes: int = 10
):
    """Class-dependent patterns a small CNN learns in an epoch or two: each class is a fixed random
    low-frequency colour template, shown at a random shift with pixel noise."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(
        torch.rand(classes, 3, 4, 4, generator=g), size=size, mode="bilinear", align_corners=False
    )

    def draw(n):
        y = torch.randint(0, classes, (n,), generator=g)
        shifts = torch.randint(-2, 3, (n, 2), generator=g)
        x = torch.stack(
            [torch.roll(templates[c], (int(s[0]), int(s[1])), dims=(1, 2)) for c, s in zip(y, shifts)]
        )
        x = (x + 0.15 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        return (x * 255).to(torch.uint8), y

    return draw(n_train), draw(n_test)


def _prepare_debian_files(info: DatasetInfo, data_dir: Path) -> None:
    """Debian's dataset-* packages ship the original gzipped IDX files; unpack them once into
    torchvision's layout (<data_dir>/<Class>/raw/) so torchvision reads them as usual."""
    src = DEBIAN_DATASETS / info.name
    raw = data_dir / str(info.torchvision_class) / "raw"
    if not src.is_dir() or info.torchvision_class not in IDX_CLASSES:
        return
    for gz in src.glob("*-ubyte.gz"):
        target = raw / gz.name[:-3]
        if not target.exists():
            raw.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".part")
            with gzip.open(gz, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            tmp.rename(target)


def _torchvision_arrays(info: DatasetInfo, data_dir: Path, download: bool):
    import torchvision.datasets as tvd

    cls = getattr(tvd, str(info.torchvision_class))
    _prepare_debian_files(info, data_dir)

    def split(train: bool):
        kwargs = {"split": "train" if train else "test"} if info.name == "svhn" else {"train": train}
        root = data_dir / "svhn" if info.name == "svhn" else data_dir
        if info.torchvision_class in IDX_CLASSES:
            _check_idx(data_dir / str(info.torchvision_class) / "raw", train, info)
        try:
            return cls(str(root), download=False, **kwargs)
        except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError/ValueError/EOFError on bad files
            if not (
                isinstance(e, RuntimeError) and str(e).startswith("Dataset not found")
            ):  # present but unreadable (truncated, wrong shape)
                raise IterkdError(
                    f"{info.name} files under {root} are unreadable ({_one_line(e)}); "
                    "replace them with intact copies"
                ) from None
            if not download:
                raise _missing(info, data_dir, "downloads are off (--no-download)") from None
        try:
            return cls(str(root), download=True, **kwargs)
        except Exception as e:  # any network failure: URLError, socket errors, HTTP errors
            raise _missing(info, data_dir, f"download failed: {type(e).__name__}: {_one_line(e)}") from None

    arrays = []
    for train in (True, False):
        ds = split(train)
        x, y = _as_tensors(ds)
        _check_arrays(x, y, info, *_source_files(ds, train))
        arrays.append((x, y))
    return arrays


def _check_data_dir(data_dir: Path) -> None:
    """A data directory, or the first part of its path that exists, must be a directory: a file
    there fails deep inside torchvision with NotADirectoryError."""
    existing = next(p for p in (data_dir, *data_dir.parents) if p.exists())
    if not existing.is_dir():
        raise IterkdError(
            f"data directory {data_dir}: {existing} is a file, not a directory; "
            "pass --data-dir DIR (or set ITERKD_DATA) naming a directory"
        )


def _idx_dims(path: Path, ndim: int, info: DatasetInfo) -> tuple[int, ...]:
    """The dimensions in an IDX file's header, once the magic says unsigned bytes in `ndim` dims and
    the file holds exactly the bytes the header promises (torchvision trusts both)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4 + 4 * ndim)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise IterkdError(f"{info.name} file {path} is unreadable ({e.strerror or e})") from None
    magic = 0x0800 + ndim  # 0x08: unsigned bytes; then the number of dimensions
    if len(head) < 4 + 4 * ndim or struct.unpack(">I", head[:4])[0] != magic:
        raise IterkdError(
            f"{info.name} file {path} is unreadable: not an IDX file of {ndim}-D unsigned bytes "
            f"(its header starts {head[:4].hex() or 'empty'}, expected {magic:08x}); "
            "replace it with an intact copy"
        )
    dims = struct.unpack(f">{ndim}I", head[4:])
    if size != len(head) + math.prod(dims):
        raise IterkdError(
            f"{info.name} file {path} is unreadable: its header promises {' x '.join(map(str, dims))} "
            f"bytes of data but it holds {size - len(head)}; replace it with an intact copy"
        )
    return dims


def _check_idx(raw: Path, train: bool, info: DatasetInfo) -> None:
    """An IDX pair (images, labels) torchvision is about to read: sane headers and one label per image."""
    prefix = "train" if train else "t10k"
    images, labels = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    if not (images.is_file() and labels.is_file()):
        return  # missing: torchvision reports it and the download path takes over
    n_images, _, _ = _idx_dims(images, 3, info)
    (n_labels,) = _idx_dims(labels, 1, info)
    if n_images != n_labels:
        raise IterkdError(
            f"{info.name} files do not match: {images} holds {n_images} images but {labels} holds "
            f"{n_labels} labels; replace them with a matching pair"
        )


def _source_files(ds, train: bool) -> tuple[Path, Path]:
    """The files a torchvision dataset read its (images, labels) from, for error messages."""
    if hasattr(ds, "raw_folder"):  # MNIST family: IDX files
        prefix = "train" if train else "t10k"
        raw = Path(ds.raw_folder)
        return raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    path = Path(ds.root) / (
        getattr(ds, "base_folder", None) or getattr(ds, "filename", "")
    )  # CIFAR folder, SVHN .mat
    return path, path


def _check_arrays(x: torch.Tensor, y: torch.Tensor, info: DatasetInfo, images: Path, labels: Path) -> None:
    """One split as loaded, before anything trusts it: one label per image (a short labels file
    would misalign every label silently), images of the dataset's channels and at most its size,
    and labels that are classes of the dataset."""
    if len(x) != len(y) or len(x) == 0:
        raise IterkdError(
            f"{info.name} files do not match: {images} holds {len(x)} images but {labels} holds "
            f"{len(y)} labels; replace them with a matching pair"
        )
    if x.ndim != 4 or x.shape[1] != info.channels or x.shape[2] != x.shape[3] or x.shape[3] > info.size:
        raise IterkdError(
            f"{info.name} file {images} holds images of shape {tuple(x.shape[1:])}; {info.name} has "
            f"{info.channels}-channel square images of at most {info.size} pixels"
        )
    bad = ((y < 0) | (y >= info.num_classes)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise IterkdError(
            f"{info.name} file {labels}: label {int(y[i])} (sample {i}) is not a class; {info.name} has "
            f"classes 0..{info.num_classes - 1}"
        )


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]  # torchvision joins per-mirror errors with newlines


def _missing(info: DatasetInfo, data_dir: Path, why: str) -> IterkdError:
    where = data_dir / "svhn" if info.name == "svhn" else data_dir / str(info.torchvision_class)
    hint = (
        f" or install Debian's dataset-{info.name} package" if info.name in ("fashion-mnist", "mnist") else ""
    )
    return IterkdError(
        f"{info.name} files not found under {where} and {why}; put torchvision's files there "
        f"(or pass --data-dir DIR){hint}, or run once with network access"
    )


def _as_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    data = ds.data
    x = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.asarray(data))
    if x.ndim == 3:  # MNIST-style (N, H, W)
        x = x.unsqueeze(1)
    elif x.shape[-1] == 3 and x.shape[1] != 3:  # CIFAR stores (N, H, W, C)
        x = x.permute(0, 3, 1, 2)
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = ds.labels
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    return x.contiguous().to(torch.uint8), y


def normalize(x_uint8: torch.Tensor, info: DatasetInfo, dtype=torch.float32) -> torch.Tensor:
    mean, std = _mean_std(info, x_uint8.device, dtype)
    return (x_uint8.to(dtype) / 255 - mean) / std


@functools.cache
def _mean_std(info: DatasetInfo, device: torch.device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: building them per batch would be a blocking host-to-GPU copy every step.
    return (
        torch.tensor(info.mean, device=device, dtype=dtype).view(1, -1, 1, 1),
        torch.tensor(info.std, device=device, dtype=dtype).view(1, -1, 1, 1),
    )


def augment_draws(n: int, seed: int, view: int, pad: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop offsets (n, 2) and flip flags (n,) for one augmentation view of every sample: a pure
    function of (seed, view), so the same sample in the same view is always the same image."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + view)
    return torch.randint(0, 2 * pad + 1, (n, 2), generator=g), torch.rand(n, generator=g) < 0.5


def augment(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor | None, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and optional horizontal flip, for a whole batch at once.

    The crop takes each image's whole window from a view of every window (`unfold`: no copy), one
    gather of contiguous rows instead of one index computation per pixel: the same images, 2-3x
    faster on CPU (docs/performance.md)."""
    n, c, h, w = x.shape
    windows = F.pad(x, (pad, pad, pad, pad)).unfold(2, h, 1).unfold(3, w, 1)  # (n, c, dy, dx, h, w)
    out = windows[torch.arange(n, device=x.device), :, offsets[:, 0], offsets[:, 1]]  # (n, c, h, w)
    if flips is not None:
        out = torch.where(flips.view(n, 1, 1, 1), out.flip(-1), out)
    return out


def epoch_view(epoch: int, views: int | None) -> int:
    """The augmentation view epoch `epoch` uses: epoch mod `views` (each epoch its own when None)."""
    return epoch % views if views else epoch


def train_batches(
    data: DataSplits,
    batch_size: int,
    epoch: int,
    seed: int,
    views: int | None = None,
    augmented: bool = True,
    augment_seed: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Shuffled, augmented training batches for one epoch as (index, normalised images, labels).

    `seed` shuffles; `augment_seed` (default: `seed`) draws the crops and flips, so students that
    share it (siblings) see the same image for a sample in a view. Epoch e uses view epoch_view(e, views)."""
    device = data.train_x.device
    n = len(data.train_x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).to(device)
    offsets, flips = _draws_on(data, seed if augment_seed is None else augment_seed, epoch_view(epoch, views))
    for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
        idx = perm[start : start + batch_size]
        yield idx, _images(data, idx, offsets, flips, augmented), data.train_y[idx]


def view_batches(
    data: DataSplits, seed: int, view: int, batch_size: int = EVAL_BATCH
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every training sample in index order as (index, normalised images), augmented as in `view`:
    the very images train_batches yields in an epoch using that view with augment_seed `seed`."""
    device = data.train_x.device
    offsets, flips = _draws_on(data, seed, view)
    for start in range(0, len(data.train_x), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data.train_x)), device=device)
        yield idx, _images(data, idx, offsets, flips, True)


def _draws_on(data: DataSplits, seed: int, view: int) -> tuple[torch.Tensor, torch.Tensor]:
    offsets, flips = augment_draws(len(data.train_x), seed, view)
    return offsets.to(data.train_x.device), flips.to(data.train_x.device)


def _images(
    data: DataSplits, idx: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, augmented: bool
) -> torch.Tensor:
    x = data.train_x[idx]
    if augmented:
        x = augment(x, offsets[idx], flips[idx] if data.info.flip else None)
    return normalize(x, data.info)


def eval_batches(x: torch.Tensor, y: torch.Tensor, info: DatasetInfo, batch_size: int = EVAL_BATCH):
    for start in range(0, len(x), batch_size):
        yield normalize(x[start : start + batch_size], info), y[start : start + batch_size]
