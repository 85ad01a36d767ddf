"""Device choices in one place: which device, which autocast and memory layout on it, and whether
to compile a model — each a named rule shared by training, the teacher cache and the benchmark."""
from __future__ import annotations

import torch

from .arch import VGGSpec
from .errors import IterkdError

COMPILE_MODES = ("auto", "off", "default", "reduce-overhead")
# Below this many forward FLOPs per image a CUDA step is launch-bound (the 71k-param child runs
# ~2x faster with CUDA graphs), above it compute-bound, where compiling costs more than it saves
# over the few epochs a child trains.
LAUNCH_BOUND_FLOPS = 50e6


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise IterkdError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise IterkdError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def autocast(device: torch.device):
    # bf16 autocast on GPUs: tensor-core speed without loss scaling; on CPU fp32 is faster for these convs.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def memory_format(device: torch.device):
    # channels_last lets cuDNN pick NHWC tensor-core kernels; on CPU it brings nothing here.
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


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
