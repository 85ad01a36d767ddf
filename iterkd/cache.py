"""Teacher cache: what a teacher says about every training sample in each augmentation view,
computed once and reused by every student it teaches, kept in the run directory (RUN/cache) for
resumed runs until the search ends: its logits (fp16, one safetensors file) and, for the hint, the
output of one of its blocks (fp16, one memory-mapped .npy file per block and view). Nothing is ever
reused for other teacher weights, data, augmentation seed, views or precision."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from .checkpoints import write_safetensors
from .data import DataSplits, view_batches
from .device import autocast, memory_format, resolve_precision
from .errors import IterkdError
from .models import VGG

# 3: the metadata names the precision the teacher ran in (older files are recomputed once).
FORMAT = "iterkd-teacher-cache-3"
FP16_MAX = 65504.0
# Hint features are stored as fp16: 11 significant bits against bf16's 8, and the outputs of a
# BN+ReLU block stay far inside fp16's range (clamped like the logits all the same). The hint
# losses cast them up to fp32 (losses.fp32_loss).
FEATURE_DTYPE = torch.float16
DEFAULT_FEATURE_MB = 2048


def cache_dir(run_dir: Path) -> Path:
    """Where a run keeps its teachers' caches."""
    return Path(run_dir) / "cache"


def remove_cache(run_dir: Path) -> int:
    """Delete a run's teacher caches once its search is over (hundreds of MB for the quick preset,
    GB at full width, of no use to report, export or compare); the bytes freed. A resumed run
    rebuilds what it needs; files a live process still maps stay readable until it closes them."""
    directory = cache_dir(run_dir)
    if not directory.is_dir():
        return 0
    size = 0
    for p in directory.rglob("*"):
        try:
            size += p.stat().st_size if p.is_file() else 0
        except OSError:  # gone meanwhile (a worker replacing a stale file): nothing to count
            pass
    shutil.rmtree(directory, ignore_errors=True)
    return size


def weights_fingerprint(model: torch.nn.Module) -> str:
    """First 16 hex digits of the sha256 of a model's state_dict (each tensor's name, dtype, shape
    and bytes, in name order): the same node id and spec in a reused run directory may be another
    study's teacher, whose outputs differ."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes: also for bf16, which numpy lacks
    return h.hexdigest()[:16]


class TeacherCache:
    """The logits of one teacher on every training sample in each of `views` augmentation views,
    and on request (`cache_features`) the output of one of its blocks, the hint's target.

    View v of sample i is exactly the image a student sees in any epoch using view v with
    augment_seed `seed` (augmentation is a pure function of (seed, view)), so a lookup returns the
    teacher's output on the very input of the step. A view is computed the first time it is
    needed — in batches, without grad, in eval mode, in the run's `precision` — and saved at once;
    a cache opened on existing files (a resumed run, a sibling process) starts with what they hold.

    Hint features cost views x n x (the block's output) x 2 bytes: a block whose features would
    exceed `feature_mb` is not cached, and the hint teacher then runs live up to that block.
    `log` (if given) hears one line per block: its size, or why it is not cached.

    Hits: a lookup is a miss when it is the first use of an output computed in this process, a hit
    when an earlier lookup (a sibling, an earlier epoch) or an earlier run already used it."""

    def __init__(
        self,
        teacher: VGG,
        data: DataSplits,
        *,
        seed: int,
        views: int,
        directory: str | Path | None = None,
        node: int | str | None = None,
        batch_size: int | None = None,
        precision: str = "auto",
        feature_mb: float = DEFAULT_FEATURE_MB,
        log: Callable[[str], None] | None = None,
    ):
        if views < 1:
            raise ValueError(f"a teacher cache needs at least one view, got {views}")
        self.teacher, self.data, self.seed, self.views = teacher, data, seed, views
        self.batch_size, self.feature_mb, self.node, self.log = batch_size, feature_mb, node, log
        self.n = len(data.train_x)
        self.device = data.train_x.device
        self.precision = resolve_precision(precision, self.device)
        self.stem = (
            None
            if directory is None
            else Path(directory) / f"node-{node}-seed-{seed}-views-{views}-n-{self.n}"
        )
        self.path = None if self.stem is None else self.stem.with_name(self.stem.name + ".safetensors")
        self.weights = weights_fingerprint(teacher)
        # The key of the files: a file is reused only when all of it matches.
        self.metadata = {
            "format": FORMAT,
            "seed": str(seed),
            "views": str(views),
            "n": str(self.n),
            "dataset": data.info.name,
            "data": data.fingerprint(),
            "teacher": teacher.spec.to_json(),
            "weights": self.weights,
            "precision": self.precision,
        }
        self._logits: dict[int, torch.Tensor] = {}  # view -> (n, classes) fp16 on the data's device
        self._features: dict[tuple[int, int], torch.Tensor] = {}  # (block, view) -> (n, h, w, c) fp16
        self._feature_blocks: dict[int, bool] = {}  # block -> its features are cached (else: live)
        self._seen: dict[int | tuple[int, int], torch.Tensor] = {}  # view or (block, view) -> (n,) bool
        self._lookups = torch.zeros((), dtype=torch.int64, device=self.device)
        self._misses = torch.zeros((), dtype=torch.int64, device=self.device)
        self.loaded_views = self._load()

    # -- the hot path -------------------------------------------------------------------------------
    def logits(self, idx: torch.Tensor, view: int) -> torch.Tensor:
        """The teacher's fp16 logits for samples `idx` in `view` (call ensure_view first)."""
        self._count(view, idx)
        return self._logits[view][idx]

    def features(self, idx: torch.Tensor, view: int, block: int) -> torch.Tensor:
        """Block `block`'s fp16 output for samples `idx` in `view`, (b, c, h, w) in channels_last
        like a live block output (call ensure_view(view, block) first)."""
        self._count((block, view), idx)
        return self._features[block, view][idx].permute(0, 3, 1, 2)

    def _count(self, key: int | tuple[int, int], idx: torch.Tensor) -> None:
        seen = self._seen[key]
        self._lookups += len(idx)
        self._misses += (~seen[idx]).sum()  # counted on the device: no host sync in the step
        seen[idx] = True

    def counts(self) -> tuple[int, int]:
        """(lookups, misses) so far, logits and features, summed over all students."""
        return int(self._lookups), int(self._misses)

    # -- filling ------------------------------------------------------------------------------------
    def cache_features(self, block: int) -> bool:
        """Whether block `block`'s outputs are served from this cache (False: over `feature_mb`, the
        hint teacher runs live). Decided, and told to `log`, once per block."""
        if block not in self._feature_blocks:
            c, side = self.teacher.spec.block_output_shapes()[block]
            mb = self.views * self.n * c * side * side * FEATURE_DTYPE.itemsize / 2**20
            what = f"{self.views} views x {self.n} x {c}x{side}x{side} fp16"
            fits = mb <= self.feature_mb
            self._feature_blocks[block] = fits
            if self.log is not None:
                where = f" in {self.stem.parent}" if self.stem is not None else ""
                self.log(
                    f"hint features of node {self.node}, block {block}: {mb:.1f} MB ({what}){where}"
                    if fits
                    else f"hint features of node {self.node}, block {block} would take {mb:.1f} MB "
                    f"({what}), over --cache-mb {self.feature_mb:g}: the hint teacher runs live"
                )
        return self._feature_blocks[block]

    def ensure_view(self, view: int, block: int | None = None) -> bool:
        """Compute `view`'s logits (and block `block`'s features, when given and cached) unless they
        are stored already, in one pass of the teacher, and save them; True when anything was computed."""
        if not 0 <= view < self.views:
            raise ValueError(f"view {view} is outside this cache's {self.views} views")
        want_logits = view not in self._logits
        want_feats = block is not None and self.cache_features(block) and not self._load_features(block, view)
        if not (want_logits or want_feats):
            return False
        fmt = memory_format(self.device)
        self.teacher.to(self.device, memory_format=fmt).eval().requires_grad_(False)
        logits = torch.empty(self.n, self.teacher.spec.num_classes, dtype=torch.float16, device=self.device)
        feats, array = self._new_features(block, view) if want_feats else (None, None)
        try:
            with torch.no_grad(), autocast(self.device, self.precision):
                for idx, x in view_batches(self.data, self.seed, view, self.batch_size):
                    x = x.contiguous(memory_format=fmt)
                    if want_logits:
                        out, blocks = self.teacher.forward_features(x)
                        # Clamped into fp16's range: beyond +-65504 softmax at any temperature >= 1 is one-hot anyway.
                        logits[idx] = _fp16(out)
                        feat = blocks[block] if want_feats else None
                    else:
                        feat = self.teacher.block_output(x, block)
                    if feats is not None:
                        feats[idx.to(feats.device)] = _fp16(feat).permute(0, 2, 3, 1).to(feats.device)
        except BaseException:  # interrupted (Ctrl-C, a fault): no half-written file is left behind
            if array is not None:
                self._tmp(block, view).unlink(missing_ok=True)
            raise
        if want_logits:
            self._logits[view] = logits
            self._seen[view] = torch.zeros(self.n, dtype=torch.bool, device=self.device)
            if self.path is not None:
                write_safetensors(self.path, {f"view-{v}": t for v, t in self._logits.items()}, self.metadata)
        if feats is not None:
            if array is not None:
                self._save_features(block, view, array)
            self._keep_features(block, view, feats, fresh=True)
        return True

    # -- files --------------------------------------------------------------------------------------
    def _load(self) -> list[int]:
        """Views from an existing file written for the same teacher weights, data, seed, views and
        precision; a foreign, stale or unreadable file is ignored (and replaced when the next view is saved)."""
        if self.path is None or not self.path.is_file():
            return []
        shape = (self.n, self.teacher.spec.num_classes)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                if f.metadata() != self.metadata:
                    return []
                for key in f.keys():
                    t, view = f.get_tensor(key), int(key.removeprefix("view-"))
                    if tuple(t.shape) == shape and t.dtype == torch.float16 and 0 <= view < self.views:
                        self._logits[view] = t.to(self.device)
                        self._seen[view] = torch.ones(self.n, dtype=torch.bool, device=self.device)
        except (SafetensorError, OSError, ValueError, RuntimeError):
            self._logits.clear()
            self._seen.clear()
        return sorted(self._logits)

    def _feature_shape(self, block: int) -> tuple[int, int, int, int]:
        c, side = self.teacher.spec.block_output_shapes()[block]
        return self.n, side, side, c  # channels last: a live block output's memory order

    def feature_path(self, block: int, view: int) -> Path | None:
        """The file of block `block`'s features in `view`, named by a hash of everything they depend
        on, so that no other teacher, data, seed, views or precision can ever be served from it."""
        if self.stem is None:
            return None
        key = json.dumps({**self.metadata, "block": block, "dtype": str(FEATURE_DTYPE)}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.stem.with_name(f"{self.stem.name}-block-{block}-view-{view}-{digest}.npy")

    def _load_features(self, block: int, view: int) -> bool:
        """True when (block, view) is held, possibly after mapping it from its file."""
        if (block, view) in self._features:
            return True
        path = self.feature_path(block, view)
        if path is None or not path.is_file():
            return False
        try:  # copy-on-write map: pages are read on first use and shared with the page cache
            array = np.load(path, mmap_mode="c")
        except (OSError, ValueError):  # truncated or not an .npy file: computed again
            return False
        if array.shape != self._feature_shape(block) or array.dtype != np.float16:
            return False
        self._keep_features(block, view, torch.from_numpy(array), fresh=False)
        return True

    def _new_features(self, block: int, view: int) -> tuple[torch.Tensor, np.memmap | None]:
        """Where a view's features are written as they are computed: a map of a temporary file next
        to the final one (no second copy in memory), or a tensor when the cache has no directory."""
        shape = self._feature_shape(block)
        path = self.feature_path(block, view)
        if path is None:
            return torch.empty(shape, dtype=FEATURE_DTYPE, device=self.device), None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp(block, view)
        try:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _unwritable(path, e) from None
        return torch.from_numpy(array), array

    def _save_features(self, block: int, view: int, array: np.memmap) -> None:
        """Flush a view's features to their file with an atomic rename (readers never see half of
        one); remove this node's files of the same block and view under another key (stale)."""
        path, tmp = self.feature_path(block, view), self._tmp(block, view)
        try:
            array.flush()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _unwritable(path, e) from None
        for old in path.parent.glob(f"{self.stem.name}-block-{block}-view-{view}-*.npy"):
            if old != path:
                old.unlink(missing_ok=True)

    def _tmp(self, block: int, view: int) -> Path:
        path = self.feature_path(block, view)
        return path.with_name(f".{path.name}.{os.getpid()}.tmp")

    def _keep_features(self, block: int, view: int, feats: torch.Tensor, *, fresh: bool) -> None:
        if feats.device != self.device:  # an accelerator keeps them in its own memory (within feature_mb)
            feats = feats.to(self.device)
        self._features[block, view] = feats
        self._seen[block, view] = torch.full((self.n,), not fresh, dtype=torch.bool, device=self.device)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.float().clamp(-FP16_MAX, FP16_MAX).half()


def _unwritable(path: Path, e: OSError) -> IterkdError:
    return IterkdError(
        f"could not write {path}: {e.strerror or e}; free disk space or choose another --run-dir"
    )
