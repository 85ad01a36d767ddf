"""What a dataset is to the rest of iterkd: channels, classes, side after padding, normalisation,
and whether a mirror keeps the label. Named datasets are a registry; an image folder's info comes
from its store (iterkd.data.store), computed from its images."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import IterkdError

DIGITS = tuple("0123456789")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_CLASSES = (
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
)
FOLDER = "imagefolder"  # --dataset for a folder of the user's images (iterkd.data.folder)
STORED = "store"  # --dataset for a store written from Python datasets (iterkd.data.python), --data-dir KEY
OWN_DATA = (FOLDER, STORED)  # the user's images: info from the store, stratified validation split


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    torchvision_class: str | None
    channels: int
    num_classes: int
    size: int  # side after zero-padding (padded_side), the models' input size
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool  # horizontal flips preserve the label (not for digits or text)
    classes: tuple[str, ...] = ()
    raw_size: int | None = None  # side before padding, when it differs from `size`

    @property
    def class_names(self) -> list[str]:
        return list(self.classes) or [str(i) for i in range(self.num_classes)]


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", "FashionMNIST", 1, 10, 32, (0.2860,), (0.3530,), True, FASHION_CLASSES, 28
    ),
    "mnist": DatasetInfo("mnist", "MNIST", 1, 10, 32, (0.1307,), (0.3081,), False, DIGITS, 28),
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
DATASET_NAMES = (*DATASETS, FOLDER, STORED)  # what --dataset takes


def dataset_info(name: str) -> DatasetInfo:
    """A named dataset's info; an image folder's depends on its images (SearchConfig.data_info)."""
    if name in OWN_DATA:
        raise IterkdError(f"{name}'s info comes from its store: use SearchConfig.data_info()")
    if name not in DATASETS:
        raise IterkdError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return DATASETS[name]


def padded_side(side: int) -> int:
    """The side images are zero-padded to: up to 32, the next power of two (28 -> 32, 16 stays), so
    the pools end at exactly 1x1; above 32, the next multiple of 32 (100 -> 128, 224 stays), so
    five 2x2 pools divide it exactly."""
    if side <= 32:
        return 1 << (side - 1).bit_length()
    return -(-side // 32) * 32
