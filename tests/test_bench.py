"""`iterkd bench` in a tiny form: one JSON line per case with the documented fields (speed is not
asserted: CI machines differ; docs/performance.md holds measured figures)."""
import json

import pytest

import iterkd.bench as bench
from iterkd.arch import VGGSpec
from iterkd.cli import main

TINY_ROOT = VGGSpec(((8, 8), (16,), (16,)), in_channels=1, input_size=16)
TINY_CHILD = VGGSpec(((4,), (8,)), in_channels=1, input_size=16)
FIELDS = {"case", "device", "model", "params", "mflops_per_img", "teacher", "hint", "batch_size", "timed_epochs",
          "img_per_s", "step_ms", "step_ratio_vs_ce", "cache_hit_rate", "cache_build_s", "peak_mem_mb", "mem",
          "compile", "threads", "load_avg_1m", "torch"}


@pytest.fixture
def tiny_bench(monkeypatch):
    monkeypatch.setitem(bench.PLANS, ("cpu", True), bench.BenchPlan(batch_size=16, root_samples=48,
                                                                    child_samples=64, epochs=2, views=2, repeats=2))
    monkeypatch.setattr(bench, "ROOT", TINY_ROOT)
    monkeypatch.setattr(bench, "CHILD", TINY_CHILD)
    monkeypatch.setattr(bench.run_bench, "__kwdefaults__", {**bench.run_bench.__kwdefaults__,
                                                             "root": TINY_ROOT, "child": TINY_CHILD})


def test_quick_bench_prints_one_json_line_per_case(tiny_bench, capsys):
    assert main(["bench", "--quick", "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["case"] for r in lines] == list(bench.CASES)
    by_case = {r["case"]: r for r in lines}
    for r in lines:
        assert set(r) == FIELDS
        assert r["img_per_s"] > 0 and r["step_ms"] > 0 and r["peak_mem_mb"] > 0
        assert r["device"].startswith("cpu") and r["compile"] == "off" and r["batch_size"] == 16
        assert r["timed_epochs"] == (2 if r["case"] in ("child_ce", "child_kd_cached") else 1)  # alternated twice
    assert by_case["child_ce"]["step_ratio_vs_ce"] == 1.0 and by_case["child_ce"]["cache_hit_rate"] is None
    assert by_case["root"]["params"] == TINY_ROOT.params() and by_case["root"]["teacher"] is None
    assert by_case["child_kd_live"]["cache_hit_rate"] == 0.0 and by_case["child_kd_live"]["hint"]
    cached, hinted = by_case["child_kd_cached"], by_case["child_kd_cached_hint"]
    assert cached["cache_hit_rate"] == 1.0 and not cached["hint"] and cached["cache_build_s"] > 0
    assert hinted["cache_hit_rate"] == 1.0 and hinted["hint"]


def test_bench_refuses_an_unknown_compile_mode(capsys):
    assert main(["bench", "--compile", "max"]) == 2
    assert "--compile" in capsys.readouterr().err
