"""iterkd: shrink a CNN generation by generation with knowledge distillation, keeping the lineage
in an Optuna study.

    >>> from iterkd import SearchConfig, run_search, load_model
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


__all__ = ["SearchConfig", "VGGSpec", "IterkdError", "build_config", "load_model", "run_search", "vgg_spec"]
