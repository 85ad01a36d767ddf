"""iterkd: shrink a CNN generation by generation with knowledge distillation, keeping the lineage
in an Optuna study.

    >>> from iterkd import SearchConfig, run_search, load
    >>> outcome = iterkd.compress(model, train_dataset, max_drop=1.0)  # outcome.model: the final VGG
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


def compress(model, train, val=None, test=None, **kwargs):
    """Compress a trained `torch.nn.Module` on map-style datasets of (image, int label) into the
    smallest VGG within `max_drop` points (default 1.0); returns the SearchOutcome, `.model` the final
    model in eval mode. A VGG is imported and shrunk, any other model teaches as a frozen teacher.
    Keyword arguments: max_drop, space, preset, run_dir, classes, progress, and any SearchConfig
    setting; see iterkd.compression.compress."""
    from .compression import compress as _compress  # lazy: keeps `import iterkd` light

    return _compress(model, train, val, test, **kwargs)


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
    "compress",
    "load",
    "load_model",
    "run_search",
    "vgg_spec",
]
