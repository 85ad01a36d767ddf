"""iterkd: shrink a CNN generation by generation with knowledge distillation, keeping the lineage
in an Optuna study.

    >>> from iterkd import SearchConfig, run_search, load
"""

from __future__ import annotations

from .arch import VGGSpec, vgg_spec
from .checkpoints import load_model
from .config import SearchConfig, build_config
from .errors import IterkdError

__version__ = "0.1.0"


def run_search(cfg: SearchConfig, *, progress: bool = True):
    """Run (or resume) a search and return its SearchOutcome; the lineage is in cfg.run_dir."""
    from .search import Search

    return Search(cfg, progress=progress).run()


def load(path):
    """A node's model for inference (eval mode, CPU) from a .safetensors checkpoint (weights only),
    an `iterkd export` directory, or a TorchScript .pt file; see iterkd.export.load."""
    from .export import load as _load  # lazy: keeps `import iterkd` free of optuna/onnx imports

    return _load(path)


__all__ = [
    "SearchConfig",
    "VGGSpec",
    "IterkdError",
    "build_config",
    "load",
    "load_model",
    "run_search",
    "vgg_spec",
]
