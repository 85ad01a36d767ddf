"""Batches as the training loop and evaluation read them: normalised with the run's statistics,
augmented on the data's device with tensor ops (random crop with zero padding, horizontal flips
where the dataset allows them), no per-sample Python and no loader workers. Images come from a
store's memory map (iterkd.data.store.Images) or from tensors."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .info import DatasetInfo
from .splits import DataSplits

# Batches of inference (validation, test, filling a teacher cache): on one CPU thread 256 images a
# batch ran 1.26-1.41x faster than 1000 (whose activations outgrow the caches), 128 no faster.
EVAL_BATCH = 256


def eval_batch_size(info: DatasetInfo, batch: int = EVAL_BATCH) -> int:
    """An inference batch for `info`'s images: `batch` at 32x32 or less, proportionally fewer for
    larger images (at least 8), so its activations stay the size measured at 32x32: 256 images of
    256x256 held about 1 GB of activations in a tiny VGG and ran a 1.5 GiB search out of memory."""
    return max(8, min(batch, batch * 32 * 32 // (info.size * info.size)))


def normalize(x_uint8, info: DatasetInfo, dtype=torch.float32) -> torch.Tensor:
    """(pixel / 255 - mean) / std per channel, the run's statistics; uint8 tensor or stored images."""
    if not isinstance(x_uint8, torch.Tensor):
        x_uint8 = x_uint8.materialize()
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
    data: DataSplits, seed: int, view: int, batch_size: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every training sample in index order as (index, normalised images), augmented as in `view`:
    the very images train_batches yields in an epoch using that view with augment_seed `seed`."""
    batch_size = batch_size or eval_batch_size(data.info)
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


def eval_batches(x: torch.Tensor, y: torch.Tensor, info: DatasetInfo, batch_size: int | None = None):
    batch_size = batch_size or eval_batch_size(info)
    for start in range(0, len(x), batch_size):
        yield normalize(x[start : start + batch_size], info), y[start : start + batch_size]
