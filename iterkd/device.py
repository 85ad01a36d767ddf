"""Device choices in one place: which device, which precision (autocast) and memory layout on it,
and whether to compile a model — each a named rule shared by training, the teacher cache and the
benchmark."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

from .arch import VGGSpec
from .errors import IterkdError

COMPILE_MODES = ("auto", "off", "default", "reduce-overhead")
# Below this many forward FLOPs per image a CUDA step is launch-bound (the 71k-param child runs
# ~2x faster with CUDA graphs), above it compute-bound, where compiling costs more than it saves
# over the few epochs a child trains.
LAUNCH_BOUND_FLOPS = 50e6
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise IterkdError(
            "--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto"
        )
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise IterkdError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def cpu_bf16_kind(flags: Iterable[str] | None = None) -> str | None:
    """How this CPU (or one with these /proc/cpuinfo `flags`) computes bf16: "amx" (AMX-BF16 tiles),
    "avx512" (AVX512-BF16 dot products only) or None (no native bf16).

    Read from the flags because torch.backends.cpu.get_cpu_capability() says "AVX512" with or without
    them. oneDNN runs the bf16 convolutions, so a PyTorch without it has no native path either."""
    if not torch.backends.mkldnn.is_available():
        return None
    flags = set(_cpu_flags() if flags is None else flags)
    if "amx_bf16" in flags:
        return "amx"
    return "avx512" if "avx512_bf16" in flags else None


@functools.cache
def _cpu_flags() -> tuple[str, ...]:
    try:
        with open("/proc/cpuinfo") as f:
            return tuple(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), ()))
    except OSError:  # not Linux: no way to tell, so no bf16 on the CPU
        return ()


def resolve_precision(name: str, device: torch.device) -> str:
    """The precision `--precision name` trains in on `device`: "fp32" or "bf16" (autocast; weights,
    optimizer state and losses stay fp32).

    auto: bf16 on CUDA GPUs that support it and on CPUs with AMX-BF16 (tile units built for bf16
    matmuls; not measured here), fp32 elsewhere. On a CPU with AVX512-BF16 alone bf16 is native but
    slower: on an Intel Xeon (family 6, model 207, AMX hidden by the hypervisor) oneDNN's bf16 kernels
    made the 1/8-width VGG-16 step 1.28x and the full-width one 1.2x slower than fp32 channels_last
    (docs/performance.md). There bf16 runs only when asked for; a CPU without native bf16 refuses it."""
    if name not in PRECISIONS:
        raise IterkdError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if device.type == "cuda":
        native = fast = torch.cuda.is_bf16_supported(including_emulation=False)  # Ampere and later
    else:
        kind = cpu_bf16_kind()
        native, fast = kind is not None, kind == "amx"
    if name == "bf16" and not native:
        why = (
            "this GPU has no native bf16 (Ampere or later has)"
            if device.type == "cuda"
            else "this CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag)"
        )
        raise IterkdError(f"--precision bf16: {why}; use --precision auto or fp32")
    if name == "auto":
        return "bf16" if fast else "fp32"
    return name


def autocast(device: torch.device, precision: str = "auto"):
    """The autocast context of a precision from resolve_precision (auto: resolved here)."""
    if precision == "auto":
        precision = resolve_precision("auto", device)
    if precision == "bf16":  # bf16 needs no loss scaling: its exponent range is fp32's
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"unresolved precision {precision!r}")
    return torch.autocast(device.type, enabled=False)


def memory_format(device: torch.device):
    # channels_last on every device: cuDNN picks NHWC tensor-core kernels, oneDNN runs NHWC without
    # reordering each conv's input (1.4x on the quick preset's root on CPU, fp32, docs/performance.md).
    return torch.channels_last


def compile_mode(setting: str, device: torch.device, spec: VGGSpec) -> str | None:
    """The torch.compile mode for a model (None: eager). `auto` compiles only on CUDA and only
    launch-bound models, with CUDA graphs (reduce-overhead); on CPU compiling is never worth it here."""
    if setting not in COMPILE_MODES:
        raise IterkdError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {setting!r}")
    if setting == "auto":
        return "reduce-overhead" if device.type == "cuda" and spec.flops() < LAUNCH_BOUND_FLOPS else None
    if setting == "reduce-overhead" and device.type != "cuda":
        return "default"  # CUDA graphs need CUDA; still compile as asked
    return None if setting == "off" else setting
