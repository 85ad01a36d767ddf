"""`iterkd bench` in a tiny form: one JSON line per case with the documented fields (speed is not
asserted: CI machines differ; docs/performance.md holds measured figures)."""

import json
import math

import pytest
import torch

import iterkd.bench as bench
from iterkd.arch import VGGSpec
from iterkd.cli import main
from iterkd.device import resolve_precision
from iterkd.models import VGG
from iterkd.train import TrainSettings

TINY_ROOT = VGGSpec(((8, 8), (16,), (16,)), in_channels=1, input_size=16)
TINY_CHILD = VGGSpec(((4,), (8,)), in_channels=1, input_size=16)
FIELDS = {
    "case",
    "device",
    "model",
    "params",
    "mflops_per_img",
    "teacher",
    "hint",
    "batch_size",
    "timed_epochs",
    "img_per_s",
    "step_ms",
    "step_ratio_vs_ce",
    "vs_plain",
    "cache_hit_rate",
    "cache_build_s",
    "peak_mem_mb",
    "mem",
    "compile",
    "precision",
    "threads",
    "load_avg_1m",
    "torch",
}


@pytest.fixture
def tiny_bench(monkeypatch):
    monkeypatch.setitem(
        bench.PLANS,
        ("cpu", True),
        bench.BenchPlan(
            batch_size=16, root_samples=48, child_samples=64, epochs=2, views=2, repeats=2, root_repeats=2
        ),
    )
    monkeypatch.setattr(bench, "ROOT", TINY_ROOT)
    monkeypatch.setattr(bench, "CHILD", TINY_CHILD)
    monkeypatch.setattr(
        bench.run_bench,
        "__kwdefaults__",
        {**bench.run_bench.__kwdefaults__, "root": TINY_ROOT, "child": TINY_CHILD},
    )


def test_quick_bench_prints_one_json_line_per_case_and_a_summary(tiny_bench, capsys, monkeypatch):
    def refuse(*_):  # a hint teacher run to its block: what the cached hint cases must not do
        raise AssertionError("the hint teacher ran although its block outputs were cached")

    monkeypatch.setattr(VGG, "block_output", refuse)
    assert main(["bench", "--quick", "--device", "cpu"]) == 0
    *lines, summary = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["case"] for r in lines] == list(bench.CASES)
    by_case = {r["case"]: r for r in lines}
    alternated = set(bench.CASES) - {"child_kd_live"}
    for r in lines:
        assert set(r) == FIELDS
        assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["peak_mem_mb"] > 0
        assert r["device"].startswith("cpu") and r["compile"] == "off" and r["batch_size"] == 16
        assert r["precision"] == resolve_precision("auto", torch.device("cpu"))
        assert r["timed_epochs"] == (2 if r["case"] in alternated else 1)  # alternated twice
    assert by_case["child_ce"]["step_ratio_vs_ce"] == 1.0 and by_case["child_ce"]["cache_hit_rate"] is None
    assert by_case["root"]["params"] == TINY_ROOT.params() and by_case["root"]["teacher"] is None
    for plain, model in (("plain_child", TINY_CHILD), ("plain_root", TINY_ROOT)):
        assert by_case[plain]["vs_plain"] == 1.0 and by_case[plain]["params"] == model.params()
        assert by_case[plain]["teacher"] is None and by_case[plain]["cache_hit_rate"] is None
    # each iterkd case's speed over its plain loop's, from the step times printed beside it
    for case, plain in (
        ("child_ce", "plain_child"),
        ("root", "plain_root"),
        ("child_kd_live", "plain_child"),
    ):
        expected = by_case[plain]["step_ms"] / by_case[case]["step_ms"]
        assert by_case[case]["vs_plain"] == pytest.approx(expected, rel=0.02, abs=0.002)
    assert summary["summary"] == "vs_plain" and summary["precision"] == lines[0]["precision"]
    assert summary["vs_plain"] == {
        c: by_case[c]["vs_plain"] for c in bench.CASES if not c.startswith("plain_")
    }
    assert by_case["child_kd_live"]["cache_hit_rate"] == 0.0 and by_case["child_kd_live"]["hint"]
    assert by_case["child_kd_live"]["hint"] == "fitnet"
    cached = by_case["child_kd_cached"]
    assert cached["cache_hit_rate"] == 1.0 and cached["hint"] is None and cached["cache_build_s"] > 0
    # the hint cases read the hint teacher's block outputs from the cache too: every lookup a hit
    for case, hint in (("child_kd_cached_hint", "fitnet"), ("child_kd_cached_sp", "sp")):
        assert by_case[case]["cache_hit_rate"] == 1.0 and by_case[case]["hint"] == hint
    # what distilling costs, against the CE step: the ratios printed beside each case
    assert summary["vs_ce"] == {
        c: pytest.approx(by_case[c]["step_ratio_vs_ce"], abs=0.002)
        for c in bench.CASES
        if c.startswith("child_kd")
    }


def test_bench_refuses_an_unknown_compile_mode(capsys):
    assert main(["bench", "--compile", "max"]) == 2
    assert "--compile" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_plain_loop_trains_the_model_in_the_precision_it_is_given(precision):
    """bf16 autocast runs on any CPU (emulated where not native): the dtypes are what this checks."""
    data = bench.random_data(64, torch.device("cpu"), TINY_CHILD)
    model = VGG(TINY_CHILD)
    before = [p.detach().clone() for p in model.parameters()]
    dtypes = set()
    model.head.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    step_s = bench.plain_loop(model, data, TrainSettings(epochs=2, batch_size=16), precision)
    assert math.isfinite(step_s) and step_s > 0
    assert dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}
    conv = model.blocks[1][0].weight  # 4 input channels (with one, both layouts have the same strides)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert all(
        not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters())
    )  # every weight moved
