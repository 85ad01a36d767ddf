"""Teacher soft-label cache: a teacher's logits computed once per (teacher node, sample, augmentation
view) and reused by every student it teaches, kept as fp16 in the run directory for resumed runs.
A file is only ever reused for the same teacher weights, data, augmentation seed and views."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .checkpoints import write_safetensors
from .data import DataSplits, view_batches
from .device import autocast, memory_format
from .models import VGG

# 2: the metadata names the teacher's weights (a version-1 file is recomputed once).
FORMAT = "iterkd-teacher-cache-2"
FP16_MAX = 65504.0


def data_fingerprint(data: DataSplits) -> str:
    """CRC-32 of the training images and labels: a cache file is only reused for the same samples
    in the same order (same dataset, validation split and subset)."""
    crc = zlib.crc32(data.train_x.cpu().numpy().tobytes())
    return f"{zlib.crc32(data.train_y.cpu().numpy().tobytes(), crc):08x}"


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
    """The logits of one teacher on every training sample in each of `views` augmentation views.

    View v of sample i is exactly the image a student sees in any epoch using view v with
    augment_seed `seed` (augmentation is a pure function of (seed, view)), so a lookup returns the
    teacher's output on the very input of the step. A view is computed the first time it is
    needed — in batches, without grad, in eval mode — and the file is rewritten after each view;
    a cache opened on an existing file (a resumed run) starts with the views it holds.

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
        node: int | None = None,
        batch_size: int = 1000,
    ):
        if views < 1:
            raise ValueError(f"a teacher cache needs at least one view, got {views}")
        self.teacher, self.data, self.seed, self.views, self.batch_size = (
            teacher,
            data,
            seed,
            views,
            batch_size,
        )
        self.n = len(data.train_x)
        self.device = data.train_x.device
        self.path = (
            None
            if directory is None
            else Path(directory) / f"node-{node}-seed-{seed}-views-{views}-n-{self.n}.safetensors"
        )
        self.weights = weights_fingerprint(teacher)
        # The key of the file: _load reuses a file only when all of it matches.
        self.metadata = {
            "format": FORMAT,
            "seed": str(seed),
            "views": str(views),
            "n": str(self.n),
            "dataset": data.info.name,
            "data": data_fingerprint(data),
            "teacher": teacher.spec.to_json(),
            "weights": self.weights,
        }
        self._logits: dict[int, torch.Tensor] = {}  # view -> (n, classes) fp16 on the data's device
        self._seen: dict[int, torch.Tensor] = {}  # view -> (n,) bool: already looked up once
        self._lookups = torch.zeros((), dtype=torch.int64, device=self.device)
        self._misses = torch.zeros((), dtype=torch.int64, device=self.device)
        self.loaded_views = self._load()

    # -- the hot path -------------------------------------------------------------------------------
    def logits(self, idx: torch.Tensor, view: int) -> torch.Tensor:
        """The teacher's fp16 logits for samples `idx` in `view` (call ensure_view first)."""
        seen = self._seen[view]
        self._lookups += len(idx)
        self._misses += (~seen[idx]).sum()  # counted on the device: no host sync in the step
        seen[idx] = True
        return self._logits[view][idx]

    def counts(self) -> tuple[int, int]:
        """(lookups, misses) so far, summed over all students."""
        return int(self._lookups), int(self._misses)

    # -- filling ------------------------------------------------------------------------------------
    def ensure_view(self, view: int) -> bool:
        """Compute `view` if it is not stored yet (and save the file); True when it was computed."""
        if view in self._logits:
            return False
        if not 0 <= view < self.views:
            raise ValueError(f"view {view} is outside this cache's {self.views} views")
        fmt = memory_format(self.device)
        self.teacher.to(self.device, memory_format=fmt).eval().requires_grad_(False)
        out = torch.empty(self.n, self.teacher.spec.num_classes, dtype=torch.float16, device=self.device)
        with torch.no_grad(), autocast(self.device):
            for idx, x in view_batches(self.data, self.seed, view, self.batch_size):
                # Clamped into fp16's range: beyond +-65504 softmax at any temperature >= 1 is one-hot anyway.
                out[idx] = (
                    self.teacher(x.contiguous(memory_format=fmt)).float().clamp(-FP16_MAX, FP16_MAX).half()
                )
        self._logits[view] = out
        self._seen[view] = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        if self.path is not None:
            write_safetensors(self.path, {f"view-{v}": t for v, t in self._logits.items()}, self.metadata)
        return True

    def _load(self) -> list[int]:
        """Views from an existing file written for the same teacher weights, data, seed and views; a
        foreign, stale or unreadable file is ignored (and replaced when the next view is saved)."""
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
