"""`iterkd bench`: the training speed of the models a search trains — the root, a small child on
labels alone, and that child distilled from the root with a live teacher or with the teacher cache
(KD alone, with the FitNets or the SP hint) — measured through train() itself, each beside a plain PyTorch loop on the same model (the
reference for iterkd's own overhead), printed as one JSON line per case and a summary line."""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .arch import VGGSpec, vgg_spec
from .cache import TeacherCache
from .data import DATASETS, DataSplits, normalize
from .device import autocast, compile_mode, memory_format, resolve_precision
from .losses import DEFAULT_HINT_WEIGHT, LossWeights
from .models import VGG, hint_blocks
from .train import TrainSettings, sgd, train

# Fashion-MNIST's shape (one channel, padded to 32x32, 10 classes); random pixels train at the same speed.
ROOT = vgg_spec("vgg16", 1.0, in_channels=1)  # VGG-16-BN, 14.7M params
CHILD = VGGSpec(
    ((8,), (16,), (32, 32), (64, 64)), in_channels=1
)  # VGG-11 at 1/8 width minus its last block: 71.6k params, 1/146 of the root's FLOPs
# plain_*: a minimal PyTorch loop on the same model and batch size, the reference of the cases after it.
CASES = (
    "plain_child",
    "child_ce",
    "plain_root",
    "root",
    "child_kd_live",
    "child_kd_cached",
    "child_kd_cached_hint",
    "child_kd_cached_sp",
)
# The hint each distilled case trains with (None: KD alone); the cached ones take it from the cache.
HINTS = {"child_kd_live": "fitnet", "child_kd_cached_hint": "fitnet", "child_kd_cached_sp": "sp"}


@dataclass(frozen=True)
class BenchPlan:
    batch_size: int
    root_samples: int  # training images per epoch in the root case
    child_samples: int  # ... in the child cases
    epochs: int  # per training run; the first epoch is warm-up (allocator, cuDNN autotuning, compilation), not timed
    views: int
    # child_ce, child_kd_cached and plain_child differ by a few small ops, so their ratios are the
    # delicate figures: they are trained in alternation this many times, so a busy machine slows all alike.
    repeats: int
    root_repeats: int  # the same for root and plain_root (each run costs seconds on CPU)


PLANS: dict[tuple[str, bool], BenchPlan] = {  # (device type, quick)
    ("cpu", True): BenchPlan(
        batch_size=64, root_samples=128, child_samples=512, epochs=2, views=1, repeats=4, root_repeats=2
    ),
    ("cpu", False): BenchPlan(
        batch_size=128, root_samples=512, child_samples=8192, epochs=3, views=2, repeats=3, root_repeats=2
    ),
    ("cuda", True): BenchPlan(
        batch_size=512, root_samples=8192, child_samples=16384, epochs=3, views=2, repeats=2, root_repeats=2
    ),
    ("cuda", False): BenchPlan(
        batch_size=512, root_samples=55296, child_samples=55296, epochs=4, views=2, repeats=2, root_repeats=2
    ),
}


def random_data(n: int, device: torch.device, spec: VGGSpec, seed: int = 0) -> DataSplits:
    """n training images plus 64 for validation and 64 for test, in a dataset's shape that flips."""
    g = torch.Generator().manual_seed(seed)
    size = (n + 128, spec.in_channels, spec.input_size, spec.input_size)
    x = torch.randint(0, 256, size, dtype=torch.uint8, generator=g)
    y = torch.randint(0, spec.num_classes, (n + 128,), generator=g)
    info = DATASETS["fashion-mnist"]
    return DataSplits(info, x[:n], y[:n], x[n : n + 64], y[n : n + 64], x[n + 64 :], y[n + 64 :]).to(device)


@dataclass(frozen=True)
class _Measured:
    step_s: float  # of the fastest timed epoch: other processes only ever slow a run down (timeit's rule)
    peak_mb: float
    hit_rate: float | None
    timed_epochs: int

    def best(self, other: _Measured | None) -> _Measured:
        if other is None:
            return self
        return _Measured(
            min(self.step_s, other.step_s),
            max(self.peak_mb, other.peak_mb),
            self.hit_rate,
            self.timed_epochs + other.timed_epochs,
        )


def run_bench(
    device: torch.device,
    plan: BenchPlan,
    *,
    compile: str = "auto",
    precision: str = "auto",
    root: VGGSpec = ROOT,
    child: VGGSpec = CHILD,
) -> Iterator[dict]:
    """Measure every case and yield its figures in CASES order, each as soon as it is known, then
    a summary: each iterkd case's speed as a share of its plain loop's (`vs_plain`)."""
    settings = TrainSettings(
        epochs=plan.epochs,
        batch_size=plan.batch_size,
        seed=0,
        views=plan.views,
        augment_seed=0,
        compile=compile,
        precision=precision,
    )
    resolved = resolve_precision(precision, device)
    data = {
        "root": random_data(plan.root_samples, device, root),
        "child": random_data(plan.child_samples, device, child),
    }
    teacher = _model(root, device).eval()

    with tempfile.TemporaryDirectory(prefix="iterkd-bench-") as cache_dir:

        def measure(case: str) -> _Measured:
            spec, d = (root, data["root"]) if case.endswith("root") else (child, data["child"])
            if case.startswith("plain_"):
                with _PeakMemory(device) as peak:
                    step_s = plain_loop(_model(spec, device), d, settings, resolved)
                return _Measured(step_s, peak.mb, None, settings.epochs - 1)
            s, kw = settings, {}
            if case.startswith("child_kd"):  # the root teaches; the plain cached case leaves the hint out
                kw = dict(teachers=[teacher], hint_teacher=teacher)
                hint = HINTS.get(case, "none")
                s = replace(s, loss=LossWeights(hint=hint, hint_weight=DEFAULT_HINT_WEIGHT[hint]))
            if case.startswith(
                "child_kd_cached"
            ):  # reopened from its file, as a sibling or a resumed run finds it
                kw["teacher_cache"] = [
                    TeacherCache(
                        teacher, d, seed=0, views=plan.views, directory=cache_dir, node=0, precision=precision
                    )
                ]
            with _PeakMemory(device) as peak:
                result = train(_model(spec, device), d, s, progress=False, **kw)
            hit_rate = result.cache_hit_rate if "teacher_cache" in kw else (0.0 if kw else None)
            step_s = min(result.epoch_seconds[1:]) / (len(d.train_x) // plan.batch_size)
            return _Measured(step_s, peak.mb, hit_rate, s.epochs - 1)

        block = hint_blocks(child, root)[1]
        build_s = _fill_cache(teacher, data["child"], plan, cache_dir, block, precision)
        measured: dict[str, _Measured] = {}
        for cases, repeats in (
            (
                ("plain_child", "child_ce", "child_kd_cached", "child_kd_cached_hint", "child_kd_cached_sp"),
                plan.repeats,
            ),
            (("plain_root", "root"), plan.root_repeats),
        ):
            for _ in range(repeats):
                for case in cases:
                    measured[case] = measure(case).best(measured.get(case))
        vs_plain = {}
        for case in CASES:
            m = measured[case] = measured.get(case) or measure(case)
            spec = root if case.endswith("root") else child
            teaches = case.startswith("child_kd")
            # plain step / case step: 1.0 is a plain loop's speed, 0.9 is 10 % slower
            vs_plain[case] = round(
                measured["plain_root" if case.endswith("root") else "plain_child"].step_s / m.step_s, 3
            )
            yield {
                "case": case,
                "device": _device_name(device),
                "model": spec.summary(),
                "params": spec.params(),
                "mflops_per_img": round(spec.flops() / 1e6, 2),
                "teacher": root.summary() if teaches else None,
                "hint": HINTS.get(case),
                "batch_size": plan.batch_size,
                "timed_epochs": m.timed_epochs,
                "img_per_s": round(plan.batch_size / m.step_s, 1),
                "step_ms": round(1000 * m.step_s, 2),
                "step_ratio_vs_ce": round(m.step_s / measured["child_ce"].step_s, 3),
                "vs_plain": vs_plain[case],
                "cache_hit_rate": m.hit_rate,
                "cache_build_s": round(build_s, 2) if case.startswith("child_kd_cached") else None,
                "peak_mem_mb": round(m.peak_mb, 1),
                "mem": _PeakMemory.kind_on(device),
                "compile": compile_mode(compile, device, spec) or "off",
                "precision": resolved,
                "threads": torch.get_num_threads(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "torch": torch.__version__,
            }
    ce_s = measured["child_ce"].step_s
    yield {
        "summary": "vs_plain",
        "vs_plain": {c: r for c, r in vs_plain.items() if not c.startswith("plain_")},
        # what distilling costs: each child case's step over the CE step (issue 14: cached <= 1.3)
        "vs_ce": {c: round(measured[c].step_s / ce_s, 3) for c in CASES if c.startswith("child_kd")},
        "precision": resolved,
        "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def plain_loop(model: VGG, data: DataSplits, settings: TrainSettings, precision: str) -> float:
    """Seconds per step (fastest epoch after the first) of the loop anyone would write: the images
    normalised once and indexed per batch (no augmentation), cross-entropy, train()'s fused
    SGD+Nesterov without a schedule, and the layout, precision and compile mode that iterkd's rules
    give the device, so that the gap to train() is iterkd's own overhead."""
    device, fmt, size = data.train_x.device, memory_format(data.train_x.device), settings.batch_size
    model = model.to(device, memory_format=fmt).train()
    mode = compile_mode(settings.compile, device, model.spec)
    forward = torch.compile(model, mode=mode) if mode else model
    opt = sgd(list(model.parameters()), settings)
    x, y = normalize(data.train_x, data.info).contiguous(memory_format=fmt), data.train_y
    steps, best = len(x) // size, math.inf
    for epoch in range(settings.epochs):
        start = time.perf_counter()
        order = torch.randperm(len(x), device=device)
        for step in range(steps):
            idx = order[step * size : (step + 1) * size]
            if mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(device, precision):
                loss = F.cross_entropy(forward(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        loss.item()  # waits for the device, as train() does at the end of an epoch
        if epoch:  # the first epoch is warm-up, as in train()'s cases
            best = min(best, (time.perf_counter() - start) / steps)
    return best


def _model(spec: VGGSpec, device: torch.device) -> VGG:
    torch.manual_seed(0)
    return VGG(spec).to(device)


def _fill_cache(
    teacher: VGG, data: DataSplits, plan: BenchPlan, directory: str, block: int, precision: str
) -> float:
    """Seconds to compute and save every view's logits and hint features (`block`): the
    once-per-teacher cost a search amortises."""
    start = time.perf_counter()
    cache = TeacherCache(
        teacher, data, seed=0, views=plan.views, directory=directory, node=0, precision=precision
    )
    for view in range(plan.views):
        cache.ensure_view(view, block if cache.cache_features(block) else None)
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
