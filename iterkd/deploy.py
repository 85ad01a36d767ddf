"""A model as one ONNX file, and its deployment figures on this CPU: latency at batch 1 and throughput
at batch 64, each the median of timed repeats after a warm-up with the thread count fixed and stated,
and the on-disk size of its ONNX export. Figures on a shared machine move with its load: state
`os.getloadavg()` with them."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import VGG

LATENCY_BATCH, THROUGHPUT_BATCH = 1, 64
# One thread by default: figures stay comparable between nodes measured at different times, and a
# search worker sharing a machine does not fight the others for every core.
DEFAULT_THREADS = 1


# -- the ONNX file ------------------------------------------------------------------------------


def example_input(spec, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A normalised-looking float32 batch of the spec's input shape (N, C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, spec.in_channels, spec.input_size, spec.input_size, generator=g)


def write_onnx(model: VGG, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """One self-contained ONNX file: input 'input' (N, C, H, W) float32 with a dynamic batch, output
    'logits'; `metadata` goes into the model's metadata_props (class names, normalisation)."""
    path = Path(path)
    # Traced at batch 2: torch.export specialises sizes 0 and 1, so batch 1 would fix the batch dimension.
    program = torch.onnx.export(
        model.eval(),
        (example_input(model.spec, 2),),
        dynamo=True,
        verbose=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    program.save(str(path), external_data=False)
    strip_debug_info(path, metadata or {})
    return path


def strip_debug_info(path: Path, metadata: dict[str, str] | None = None) -> None:
    """Drop what the exporter attaches to every node for debugging: its Python stack trace (with this
    machine's absolute paths), FX node text and module scopes. Runtimes never read it; it made up a
    fifth of a small int8 file and leaked the exporting machine's directories into a deployed model."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
    if metadata:
        onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(path))


def onnx_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# -- timing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    runtime: str  # "torch" (eager, inference mode) or "onnxruntime" (CPU execution provider)
    latency_ms_b1: float  # median milliseconds per batch-1 call
    throughput_b64: float  # images per second at batch 64, from the median batch time
    threads: int
    repeats: int


@contextmanager
def torch_threads(n: int):
    """torch.set_num_threads(n) for the block only: training afterwards keeps its own setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median_seconds(call: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):  # first calls allocate buffers and pick kernels
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timing(
    runtime: str, forward: Callable[[torch.Tensor], object], spec, threads: int, repeats: int
) -> Timing:
    x1, x64 = example_input(spec, LATENCY_BATCH), example_input(spec, THROUGHPUT_BATCH)
    b1 = median_seconds(lambda: forward(x1), warmup=3, repeats=repeats)
    b64 = median_seconds(lambda: forward(x64), warmup=1, repeats=max(3, repeats // 4))
    return Timing(runtime, round(1000 * b1, 3), round(THROUGHPUT_BATCH / b64, 1), threads, repeats)


def torch_timing(model: VGG, threads: int = DEFAULT_THREADS, repeats: int = 20) -> Timing:
    model = model.to("cpu").eval()
    with torch_threads(threads), torch.inference_mode():
        return _timing("torch", model, model.spec, threads, repeats)


def onnx_timing(path: str | Path, spec, threads: int = DEFAULT_THREADS, repeats: int = 20) -> Timing:
    session = onnx_session(path, threads)
    return _timing("onnxruntime", lambda x: session.run(None, {"input": x.numpy()}), spec, threads, repeats)


def node_figures(model: VGG, threads: int = DEFAULT_THREADS) -> dict:
    """What the search records on every trained node (trial user attributes, lineage columns):
    PyTorch CPU latency/throughput with few repeats (cheap) and the size of the node's ONNX file."""
    with tempfile.TemporaryDirectory(prefix="iterkd-onnx-") as tmp:
        onnx_bytes = write_onnx(model.to("cpu"), Path(tmp) / "model.onnx").stat().st_size
    t = torch_timing(model, threads, repeats=30)  # timing is ~0.3 s of the cost; the ONNX export is the rest
    return {
        "latency_ms_b1": t.latency_ms_b1,
        "throughput_b64": t.throughput_b64,
        "cpu_threads": t.threads,
        "onnx_bytes": onnx_bytes,
    }


def compare(
    models: dict[str, VGG], threads: int = DEFAULT_THREADS, repeats: int = 40
) -> tuple[list[str], list[list]]:
    """Side-by-side deployment figures (rows) of several models (columns): size, cost, ONNX file
    bytes, and latency/throughput in PyTorch and in onnxruntime. Returns (headers, rows)."""
    columns = {}
    with tempfile.TemporaryDirectory(prefix="iterkd-bench-") as tmp:
        for i, (label, model) in enumerate(models.items()):
            path = write_onnx(model, Path(tmp) / f"{i}.onnx")
            columns[label] = (
                model.spec,
                path.stat().st_size,
                torch_timing(model, threads, repeats),
                onnx_timing(path, model.spec, threads, repeats),
            )
    rows = [
        ["parameters"] + [f"{c[0].params():,}" for c in columns.values()],
        ["FLOPs per image"] + [f"{c[0].flops():,}" for c in columns.values()],
        ["ONNX file bytes"] + [f"{c[1]:,}" for c in columns.values()],
    ]
    for k, name in ((2, "PyTorch"), (3, "onnxruntime")):
        rows.append(
            [f"{name} latency batch 1 (ms)"] + [f"{c[k].latency_ms_b1:.3f}" for c in columns.values()]
        )
        rows.append(
            [f"{name} throughput batch 64 (img/s)"]
            + [f"{c[k].throughput_b64:,.0f}" for c in columns.values()]
        )
    return ["", *columns], rows


def bench_note(threads: int, repeats: int = 40) -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"CPU threads: {threads} (torch.set_num_threads / onnxruntime intra-op); medians of {repeats} batch-1 and "
        f"{max(3, repeats // 4)} batch-64 calls after a warm-up; load average {load} on {os.cpu_count()} CPUs"
    )
