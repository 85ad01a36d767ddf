import pytest
import torch

from iterkd.arch import vgg_spec
from iterkd.device import compile_mode, resolve_device
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
