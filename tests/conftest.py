"""Shared fixtures: tiny specs and a finished smoke run, built once per session."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from iterkd import build_config, run_search
from iterkd.lineage import nodes

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def pytest_configure(config):
    """Decoded dataset stores go to a folder of this test session, never the user's cache; the
    subprocesses the tests start inherit it."""
    if "ITERKD_STORE" not in os.environ or os.environ.get("CI"):
        os.environ["ITERKD_STORE"] = tempfile.mkdtemp(prefix="iterkd-stores-")
        config._iterkd_stores = os.environ["ITERKD_STORE"]


def pytest_unconfigure(config):
    """The session's stores (about 75 MB with Fashion-MNIST) go with it."""
    made = getattr(config, "_iterkd_stores", None)
    if made:
        shutil.rmtree(made, ignore_errors=True)


def smoke_config(tmp: Path, **overrides):
    """A seconds-long search on synthetic data; generous drop budget so children get accepted."""
    values = dict(name="smoke", run_dir=str(tmp), max_drop=60.0, max_generations=2)
    values.update(overrides)
    return build_config("smoke", values)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """(config, outcome) of one finished parent-child smoke search, shared by read-only tests; it
    records the per-node deployment figures that the smoke preset otherwise skips."""
    run_dir = tmp_path_factory.mktemp("smoke_run")
    cfg = smoke_config(run_dir, deploy_figures=True)
    return cfg, run_search(cfg, progress=False)


def he_fill(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights at a scale that keeps activations alive through 19 layers (He init), BN
    statistics away from the identity, so that a wrong mapping shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1 + 0.5 * torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def lineage_shape(study) -> list[tuple]:
    """A lineage without timings or trial numbers: each finished node's place, origin, move and spec.
    Nodes go in candidate order (generation, then key), which a candidate retried after a kill keeps;
    they are renumbered, since a failed (killed) trial takes a trial number of its own."""
    kept = sorted((n for n in nodes(study) if n.state != "FAIL"), key=lambda n: (n.generation, n.key))
    index = {n.node: i for i, n in enumerate(kept)}
    return [
        (
            n.generation,
            tuple(index[p] for p in n.parents),
            tuple(index[t] for t in n.teachers),
            n.operator,
            n.spec.to_json(),
            n.state,
        )
        for n in kept
    ]
