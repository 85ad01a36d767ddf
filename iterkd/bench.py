"""`iterkd bench`: the training speed of the models a search trains — the root, a small child on
labels alone, and that child distilled from the root with a live teacher or with the teacher cache
— measured through train() itself and printed as one JSON line per case."""
from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from .arch import VGGSpec, vgg_spec
from .cache import TeacherCache
from .data import DATASETS, DataSplits
from .device import compile_mode
from .losses import LossWeights
from .models import VGG
from .train import TrainSettings, train

# Fashion-MNIST's shape (one channel, padded to 32x32, 10 classes); random pixels train at the same speed.
ROOT = vgg_spec("vgg16", 1.0, in_channels=1)  # VGG-16-BN, 14.7M params
CHILD = VGGSpec(((8,), (16,), (32, 32), (64, 64)), in_channels=1)  # VGG-11 at 1/8 width minus its last block: 71.6k params, 1/146 of the root's FLOPs
CASES = ("child_ce", "root", "child_kd_live", "child_kd_cached", "child_kd_cached_hint")


@dataclass(frozen=True)
class BenchPlan:
    batch_size: int
    root_samples: int  # training images per epoch in the root case
    child_samples: int  # ... in the child cases
    epochs: int  # per training run; the first epoch is warm-up (allocator, cuDNN autotuning, compilation), not timed
    views: int
    # child_ce and child_kd_cached differ by a few small ops, so their ratio is the delicate figure:
    # they are trained in alternation this many times, so a busy machine slows both alike.
    repeats: int


PLANS: dict[tuple[str, bool], BenchPlan] = {  # (device type, quick)
    ("cpu", True): BenchPlan(batch_size=64, root_samples=128, child_samples=512, epochs=2, views=1, repeats=4),
    ("cpu", False): BenchPlan(batch_size=128, root_samples=512, child_samples=8192, epochs=3, views=2, repeats=3),
    ("cuda", True): BenchPlan(batch_size=512, root_samples=8192, child_samples=16384, epochs=3, views=2, repeats=2),
    ("cuda", False): BenchPlan(batch_size=512, root_samples=55296, child_samples=55296, epochs=4, views=2, repeats=2),
}


def random_data(n: int, device: torch.device, spec: VGGSpec, seed: int = 0) -> DataSplits:
    """n training images plus 64 for validation and 64 for test, in a dataset's shape that flips."""
    g = torch.Generator().manual_seed(seed)
    size = (n + 128, spec.in_channels, spec.input_size, spec.input_size)
    x = torch.randint(0, 256, size, dtype=torch.uint8, generator=g)
    y = torch.randint(0, spec.num_classes, (n + 128,), generator=g)
    info = DATASETS["fashion-mnist"]
    return DataSplits(info, x[:n], y[:n], x[n:n + 64], y[n:n + 64], x[n + 64:], y[n + 64:]).to(device)


@dataclass(frozen=True)
class _Measured:
    step_s: float  # of the fastest timed epoch: other processes only ever slow a run down (timeit's rule)
    peak_mb: float
    hit_rate: float | None
    timed_epochs: int

    def best(self, other: "_Measured | None") -> "_Measured":
        if other is None:
            return self
        return _Measured(min(self.step_s, other.step_s), max(self.peak_mb, other.peak_mb), self.hit_rate,
                         self.timed_epochs + other.timed_epochs)


def run_bench(device: torch.device, plan: BenchPlan, *, compile: str = "auto", root: VGGSpec = ROOT,
              child: VGGSpec = CHILD) -> Iterator[dict]:
    """Measure every case and yield its figures in CASES order, each as soon as it is known."""
    settings = TrainSettings(epochs=plan.epochs, batch_size=plan.batch_size, seed=0, views=plan.views,
                             augment_seed=0, compile=compile)
    data = {"root": random_data(plan.root_samples, device, root), "child": random_data(plan.child_samples, device, child)}
    teacher = _model(root, device).eval()

    with tempfile.TemporaryDirectory(prefix="iterkd-bench-") as cache_dir:
        def measure(case: str) -> _Measured:
            spec, d = (root, data["root"]) if case == "root" else (child, data["child"])
            s, kw = settings, {}
            if case.startswith("child_kd"):  # the root teaches; the plain cached case leaves the hint out
                kw = dict(teachers=[teacher], hint_teacher=teacher)
                s = replace(s, loss=LossWeights(hint_weight=0.0 if case == "child_kd_cached" else 1.0))
            if case.startswith("child_kd_cached"):  # reopened from its file, as a sibling or a resumed run finds it
                kw["teacher_cache"] = [TeacherCache(teacher, d, seed=0, views=plan.views, directory=cache_dir, node=0)]
            with _PeakMemory(device) as peak:
                result = train(_model(spec, device), d, s, progress=False, **kw)
            hit_rate = result.cache_hit_rate if "teacher_cache" in kw else (0.0 if kw else None)
            step_s = min(result.epoch_seconds[1:]) / (len(d.train_x) // plan.batch_size)
            return _Measured(step_s, peak.mb, hit_rate, s.epochs - 1)

        build_s = _fill_cache(teacher, data["child"], plan, cache_dir)
        measured: dict[str, _Measured] = {}
        for _ in range(plan.repeats):
            for case in ("child_ce", "child_kd_cached"):
                measured[case] = measure(case).best(measured.get(case))
        for case in CASES:
            m = measured.get(case) or measure(case)
            spec = root if case == "root" else child
            teaches = case.startswith("child_kd")
            yield {
                "case": case, "device": _device_name(device), "model": spec.summary(), "params": spec.params(),
                "mflops_per_img": round(spec.flops() / 1e6, 2), "teacher": root.summary() if teaches else None,
                "hint": teaches and case != "child_kd_cached", "batch_size": plan.batch_size,
                "timed_epochs": m.timed_epochs, "img_per_s": round(plan.batch_size / m.step_s, 1),
                "step_ms": round(1000 * m.step_s, 2),
                "step_ratio_vs_ce": round(m.step_s / measured["child_ce"].step_s, 3),
                "cache_hit_rate": m.hit_rate,
                "cache_build_s": round(build_s, 2) if case == "child_kd_cached" else None,
                "peak_mem_mb": round(m.peak_mb, 1), "mem": _PeakMemory.kind_on(device),
                "compile": compile_mode(compile, device, spec) or "off", "threads": torch.get_num_threads(),
                "load_avg_1m": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            }


def _model(spec: VGGSpec, device: torch.device) -> VGG:
    torch.manual_seed(0)
    return VGG(spec).to(device)


def _fill_cache(teacher: VGG, data: DataSplits, plan: BenchPlan, directory: str) -> float:
    """Seconds to compute and save every view: the once-per-teacher cost a search amortises."""
    start = time.perf_counter()
    cache = TeacherCache(teacher, data, seed=0, views=plan.views, directory=directory, node=0)
    for view in range(plan.views):
        cache.ensure_view(view)
    if data.train_x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


class _PeakMemory:
    """Peak memory during a case: CUDA's allocator peak, or on CPU the process's resident set
    sampled every 5 ms (it includes the interpreter and whatever earlier cases left allocated)."""

    def __init__(self, device: torch.device):
        self.device, self.mb, self._stop = device, 0.0, threading.Event()
        self.kind = self.kind_on(device)

    @staticmethod
    def kind_on(device: torch.device) -> str:
        if device.type == "cuda":
            return "cuda_max_allocated"
        return "cpu_rss_sampled" if os.path.exists("/proc/self/statm") else "unavailable"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind != "unavailable":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        while True:
            with open("/proc/self/statm") as f:
                self.mb = max(self.mb, int(f.read().split()[1]) * page_mb)
            if self._stop.wait(0.005):
                return

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind != "unavailable":
            self._stop.set()
            self._thread.join()
        return False
