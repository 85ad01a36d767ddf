"""The named datasets as uint8 arrays: torchvision's readers (CIFAR, SVHN, the MNIST family's IDX
files, Debian's gzipped copies unpacked into torchvision's layout) and the generated `synthetic`
set. Every array is checked before anything trusts it; a missing file offline is one line naming
the folder. iterkd.data.store writes what this reads into the one store every path trains from."""

from __future__ import annotations

import gzip
import math
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import IterkdError
from .info import DatasetInfo

DEBIAN_DATASETS = Path("/usr/share/datasets")
IDX_CLASSES = ("MNIST", "FashionMNIST")  # torchvision classes that read IDX files
SYNTHETIC_SEED = 1234
# Where torchvision keeps each dataset under the data directory (the MNIST family: its class name).
FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "svhn": "svhn"}


def default_data_dir() -> Path:
    return Path(os.environ.get("ITERKD_DATA", Path.home() / ".cache" / "iterkd" / "data"))


def named_arrays(info: DatasetInfo, data_dir: Path, download: bool):
    """((train images, labels), (test images, labels)) of a named dataset, uint8 (N, C, H, W) and
    int64, before padding."""
    if info.name == "synthetic":
        return synthetic_arrays(seed=SYNTHETIC_SEED)
    _check_data_dir(data_dir)
    return _torchvision_arrays(info, data_dir, download)


def source_files(info: DatasetInfo, data_dir: Path) -> list[Path]:
    """The files a named dataset is read from (after Debian's are unpacked), for the store's
    fingerprint: their sizes and times decide whether a stored copy is still theirs."""
    if info.name == "synthetic":
        return []
    _check_data_dir(data_dir)
    _prepare_debian_files(info, data_dir)
    root = data_dir / FOLDERS.get(info.name, str(info.torchvision_class))
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


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
