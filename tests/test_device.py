import pytest
import torch

from iterkd import device
from iterkd.arch import vgg_spec
from iterkd.device import autocast, compile_mode, cpu_bf16_kind, resolve_device, resolve_precision
from iterkd.errors import IterkdError

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
SMALL, LARGE = vgg_spec("vgg11", 1 / 8), vgg_spec("vgg16")


def test_auto_compiles_only_launch_bound_models_on_cuda_with_cuda_graphs():
    assert compile_mode("auto", CUDA, SMALL) == "reduce-overhead"
    assert compile_mode("auto", CUDA, LARGE) is None
    assert compile_mode("auto", CPU, SMALL) is None


def test_explicit_modes_are_kept_and_cuda_graphs_fall_back_to_default_on_cpu():
    assert compile_mode("off", CUDA, SMALL) is None
    assert compile_mode("default", CPU, LARGE) == "default"
    assert compile_mode("reduce-overhead", CUDA, LARGE) == "reduce-overhead"
    assert compile_mode("reduce-overhead", CPU, SMALL) == "default"
    with pytest.raises(IterkdError, match="--compile"):
        compile_mode("max", CPU, SMALL)


def test_device_names():
    assert resolve_device("cpu") == CPU
    with pytest.raises(IterkdError, match="--device"):
        resolve_device("tpu")


def test_auto_precision_resolves_to_a_mode_on_any_cpu():
    assert resolve_precision("auto", CPU) in ("fp32", "bf16")
    assert resolve_precision("fp32", CPU) == "fp32"


def test_the_cpu_bf16_kind_comes_from_the_cpuinfo_flags():
    assert cpu_bf16_kind(["avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]) == "amx"
    assert cpu_bf16_kind(["avx512f", "avx512_bf16"]) == "avx512"
    assert cpu_bf16_kind(["avx2", "fma"]) is None and cpu_bf16_kind([]) is None


@pytest.mark.parametrize("kind, auto", [("amx", "bf16"), ("avx512", "fp32"), (None, "fp32")])
def test_auto_takes_bf16_only_with_amx_and_bf16_needs_native_support(monkeypatch, kind, auto):
    monkeypatch.setattr(device, "cpu_bf16_kind", lambda flags=None: kind)
    assert resolve_precision("auto", CPU) == auto
    assert resolve_precision("fp32", CPU) == "fp32"
    if kind is None:
        with pytest.raises(
            IterkdError, match=r"^--precision bf16: this CPU has no native bf16 .*; use --precision"
        ):
            resolve_precision("bf16", CPU)
    else:
        assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(IterkdError, match="--precision must be one of auto, fp32, bf16"):
        resolve_precision("fp16", CPU)


def test_fp32_never_autocasts_and_bf16_does():
    conv, x = torch.nn.Conv2d(3, 4, 3), torch.randn(2, 3, 8, 8)
    with autocast(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu") and conv(x).dtype == torch.float32
    with autocast(CPU, "bf16"):  # emulated where the CPU has no bf16: the dtypes are what this checks
        assert torch.is_autocast_enabled("cpu") and conv(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unresolved"):
        autocast(CPU, "half")
