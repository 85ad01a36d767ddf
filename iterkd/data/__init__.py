"""Data in, one way: a *source* lists and decodes images (named torchvision datasets and IDX files:
`named`; image folders: `folder`; Python datasets: `python`), the *store* keeps them decoded once as a memory-mapped uint8
array keyed by a fingerprint (`store`), *splits* are index arrays into it (`splits`), and
*batches* normalise and augment what training and evaluation read (`batches`)."""

from __future__ import annotations

from .batches import (
    EVAL_BATCH,
    augment,
    augment_draws,
    epoch_view,
    eval_batch_size,
    eval_batches,
    normalize,
    train_batches,
    view_batches,
)
from .info import DATASET_NAMES, DATASETS, FOLDER, OWN_DATA, STORED, DatasetInfo, dataset_info, padded_side
from .named import default_data_dir, synthetic_arrays
from .python import python_store
from .splits import DataSplits, load_data, open_dataset, val_images
from .store import Images, Store, list_stores, remove_store, store_root

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "EVAL_BATCH",
    "FOLDER",
    "OWN_DATA",
    "STORED",
    "DataSplits",
    "DatasetInfo",
    "Images",
    "Store",
    "augment",
    "augment_draws",
    "dataset_info",
    "default_data_dir",
    "epoch_view",
    "eval_batch_size",
    "eval_batches",
    "list_stores",
    "load_data",
    "normalize",
    "open_dataset",
    "padded_side",
    "python_store",
    "remove_store",
    "store_root",
    "synthetic_arrays",
    "train_batches",
    "val_images",
    "view_batches",
]
