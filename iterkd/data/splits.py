"""A run's data: the store of its dataset (named or image folder), split into train / validation /
test as index arrays into it, never copies. Validation drives every selection and stop decision;
test is only reported. Named datasets keep the split they always had (a seeded permutation of the
training set, so packaged roots and earlier results stay valid); an image folder without val/ gets
a seeded split stratified by class."""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import IterkdError
from .folder import folder_store
from .info import FOLDER, OWN_DATA, STORED, DatasetInfo, dataset_info
from .named import default_data_dir, named_arrays, source_files
from .store import Images, Store, build_store, fingerprint, open_store, store_root

FOLDER_VAL_SHARE, FOLDER_VAL_MAX = 0.1, 5000  # a folder without val/: 10 % of train/, at most 5,000
NAMED_VAL_SIZE = {"synthetic": 400}  # else 5,000


@dataclass
class DataSplits:
    """uint8 images (N, C, H, W), stored (iterkd.data.store.Images) or tensors, and int64 labels for
    train / validation / test; `content_hash` names the store they index, `train_index` the rows
    of the training split, in training order."""

    info: DatasetInfo
    train_x: torch.Tensor | Images
    train_y: torch.Tensor
    val_x: torch.Tensor | Images
    val_y: torch.Tensor
    test_x: torch.Tensor | Images
    test_y: torch.Tensor
    content_hash: str = ""
    train_index: torch.Tensor | None = None
    val_from_folder: bool = False  # validation is the folder's own val/, not a split of train/

    def to(self, device: torch.device) -> DataSplits:
        moved = {
            k: getattr(self, k).to(device)
            for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
        }
        return replace(self, **moved)

    @property
    def has_test(self) -> bool:
        return len(self.test_y) > 0

    def fingerprint(self) -> str:
        """Which samples, in which order, the training split holds: the store's content hash and the
        split's rows (or, for tensors made elsewhere, a CRC of the images and labels)."""
        if self.content_hash and self.train_index is not None:
            h = hashlib.sha256(self.content_hash.encode())
            h.update(self.train_index.cpu().numpy().astype(np.int64).tobytes())
            return h.hexdigest()[:16]
        crc = zlib.crc32(self.train_x.cpu().numpy().tobytes())
        return f"{zlib.crc32(self.train_y.cpu().numpy().tobytes(), crc):08x}"


def open_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    image_size: int | None = None,
    channels: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    log=print,
) -> Store:
    """The store of a dataset, decoded into it first when there is none for its files yet."""
    if name == FOLDER:
        if data_dir is None:
            raise IterkdError(
                "--dataset imagefolder needs --data-dir DIR (a folder with train/<class>/ images)"
            )
        return folder_store(
            Path(data_dir),
            image_size=image_size,
            channels=channels,
            skip_bad=skip_bad,
            progress=progress,
            log=log,
        )
    if name == STORED:
        store = open_store(str(data_dir)) if data_dir else None
        if store is None:
            raise IterkdError(
                f"--dataset {STORED} needs --data-dir KEY, a store under {store_root()} (iterkd data list); "
                f"{data_dir!r} is not there: iterkd.compress with the same datasets writes it again"
            )
        return store
    info = dataset_info(name)
    if image_size is not None or channels is not None:
        raise IterkdError(f"--image-size and --channels are for --dataset {FOLDER}; {name} is {info.size}px")
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    description = {"source": name}
    store = open_store(f"{name}-{fingerprint(description, source_files(info, data_dir))}")
    if store is not None:
        return store
    (tx, ty), (sx, sy) = named_arrays(info, data_dir, download)
    n_train, n = len(tx), len(tx) + len(sx)
    side = tx.shape[-1]

    def fill(images: np.ndarray, labels: np.ndarray) -> dict:
        pad = (info.size - side) // 2
        for start, x in ((0, tx), (n_train, sx)):
            images[start : start + len(x), :, pad : pad + side, pad : pad + side] = x.numpy()
        labels[:n_train], labels[n_train:] = ty.numpy(), sy.numpy()
        return {"classes": info.class_names, "parts": {"train": range(n_train), "test": range(n_train, n)}}

    meta = {
        "name": name,
        "torchvision_class": info.torchvision_class,
        "source": str(data_dir.resolve()) if name != "synthetic" else "generated",
        "channels": info.channels,
        "size": info.size,
        "raw_size": side,
        "mean": list(info.mean),
        "std": list(info.std),
        "flip": info.flip,
    }
    key = f"{name}-{fingerprint(description, source_files(info, data_dir))}"  # the files read, downloads too
    return build_store(key, shape=(n, info.channels, info.size, info.size), fill=fill, meta=meta)


def load_data(
    name: str,
    data_dir: str | Path | None = None,
    *,
    val_size: float | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    download: bool = True,
    flip: bool | None = None,
    store: Store | None = None,
    **source,
) -> DataSplits:
    """A dataset's splits: validation carved off its training set with `seed` (or the folder's val/),
    the training split cut to `train_subset`, the test set to `test_subset`."""
    store = store or open_dataset(name, data_dir, download=download, **source)
    info = store.info(flip)
    train, val = _split(store, val_size, seed)
    if train_subset:
        train = train[:train_subset]
    test = store.parts.get("test", torch.zeros(0, dtype=torch.int64))
    if test_subset:
        test = test[:test_subset]
    labels = store.labels
    return DataSplits(
        info,
        Images(store.images, train),
        labels[train],
        Images(store.images, val),
        labels[val],
        Images(store.images, test),
        labels[test],
        content_hash=store.content_hash,
        train_index=train,
        val_from_folder="val" in store.parts,
    )


def val_images(val_size: float | None, n_train: int, name: str) -> int:
    """How many training images validation takes: --val-size as a count, or as a share when below 1;
    by default 5,000 for a named dataset (400 for synthetic) and 10 % (at most 5,000) for a folder."""
    if val_size is None:
        if name in OWN_DATA:
            return min(FOLDER_VAL_MAX, max(1, round(FOLDER_VAL_SHARE * n_train)))
        return NAMED_VAL_SIZE.get(name, 5000)
    return round(val_size * n_train) if val_size < 1 else int(val_size)


def _split(store: Store, val_size: float | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows in training order, validation rows)."""
    rows = store.parts["train"]
    g = torch.Generator().manual_seed(seed)
    name = store.meta["name"]
    if "val" in store.parts:  # the folder's own val/
        return rows[torch.randperm(len(rows), generator=g)], store.parts["val"]
    n = len(rows)
    v = val_images(val_size, n, name)
    if not 0 < v < n:
        raise IterkdError(f"--val-size must be between 1 and {n - 1} for {name}, got {val_size:g}")
    if name not in OWN_DATA:  # the split named datasets always had
        perm = torch.randperm(n, generator=g)
        return rows[perm[v:]], rows[perm[:v]]
    labels = store.labels[rows]
    counts = torch.bincount(labels, minlength=len(store.meta["classes"])).tolist()
    quota = _largest_remainder(v, counts)
    val, train = [], []
    for c, k in enumerate(quota):
        members = rows[labels == c]
        members = members[torch.randperm(len(members), generator=g)]
        val.append(members[:k])
        train.append(members[k:])
    val_rows, train_rows = torch.cat(val), torch.cat(train)
    return train_rows[torch.randperm(len(train_rows), generator=g)], val_rows[
        torch.randperm(len(val_rows), generator=g)
    ]


def _largest_remainder(total: int, counts: list[int]) -> list[int]:
    """`total` shared among classes in proportion to `counts` (whole images, summing to `total`)."""
    n = sum(counts)
    exact = [total * c / n for c in counts]
    quota = [int(e) for e in exact]
    for i in sorted(range(len(counts)), key=lambda i: quota[i] - exact[i])[: total - sum(quota)]:
        quota[i] += 1
    return quota
