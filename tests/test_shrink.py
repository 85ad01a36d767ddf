"""--shrink: what the step sizes measure and what the headline reports (parameters, FLOPs or measured
CPU latency), latency decisions replayed on resume, and runs saved before --shrink existed.
Training is replaced by a function of the child's size, as in test_steps."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

import iterkd.sizes as sizes_mod
import iterkd.trainer as trainer_mod
from iterkd.arch import VGGSpec
from iterkd.cli import main
from iterkd.config import SearchConfig
from iterkd.lineage import nodes
from iterkd.report import load_run, root_vs_final_table, write_report
from iterkd.search import Search
from iterkd.sizes import spec_key
from iterkd.spaces import load_space
from iterkd.storage import open_study
from iterkd.train import TrainResult
from tests.conftest import lineage_shape, smoke_config
from tests.test_steps import ROOT_ACC, fake_training, overshoot_below


def depth_latency(spec: VGGSpec) -> float:
    """A latency that grows with depth, not width (as a small model's on a CPU does): its order of
    the tiny space's moves differs from the parameters' and the FLOPs' orders."""
    return round(0.1 + 0.05 * spec.convs, 4)


def overshoot_below_latency(monkeypatch, share: float) -> None:
    """Children whose (depth) latency is below `share` of the root's lose 10 points."""
    root = {}

    def train(model, data, settings, **kw):
        latency = depth_latency(model.spec)
        root.setdefault("ms", latency)
        acc = ROOT_ACC - (10.0 if latency / root["ms"] < share else 0.0)
        return TrainResult(acc, acc, 0.0, settings.epochs, [acc], 0.0)

    monkeypatch.setattr(trainer_mod, "train", train)


def study_of(tmp_path):
    return open_study(f"sqlite:///{tmp_path}/study.db", "smoke")


@pytest.mark.parametrize("shrink", ["params", "flops", "latency"])
def test_the_shrink_measure_chooses_the_child_and_sizes_the_steps(tmp_path, monkeypatch, shrink):
    fake_training(monkeypatch, lambda share: 0.0)
    monkeypatch.setattr(sizes_mod, "latency_ms", depth_latency)
    cfg = smoke_config(tmp_path, teacher_cache=False, shrink=shrink, max_drop=4.0, max_generations=1)
    out = Search(cfg, progress=False).run()
    size = {"params": VGGSpec.params, "flops": VGGSpec.flops, "latency": depth_latency}[shrink]
    expected = load_space("tiny").moves(out.root.spec, target=0.5, size=size)[0]
    assert out.final.spec == expected.spec
    chosen = {
        "params": "drop_layer(block=2)",
        # Dropping block 1 would raise the FLOPs (1.84x: later blocks then run on larger maps).
        "flops": "drop_block(block=2)",
        "latency": "drop_block(block=1)",  # two convs fewer: the deepest cut (block 2 ties; YAML order)
    }
    assert out.final.operator == chosen[shrink]  # three measures, three different children
    # The step removed about half of the root in the run's measure, not necessarily in parameters.
    assert abs(size(out.final.spec) / size(out.root.spec) - 0.5) < 0.25


def test_smallest_within_budget_means_smallest_in_the_shrink_measure(tmp_path, monkeypatch):
    # Children under half the root's parameters lose 10 points. Of those within the budget, the
    # fewest parameters (drop_layer(block=2), drop_block(block=3): 4,562) are not the lowest
    # (depth) latency (drop_block(block=1): 3 convs, 5,354 parameters).
    fake_training(monkeypatch, overshoot_below(0.5))
    monkeypatch.setattr(sizes_mod, "latency_ms", depth_latency)
    cfg = smoke_config(tmp_path, teacher_cache=False, shrink="latency", variant="parent-children", children=6)
    cfg = replace(cfg, select="smallest-within-budget", max_drop=4.0, max_generations=1, final_epochs=0)
    out = Search(cfg, progress=False).run()
    children = [n for n in nodes(study_of(tmp_path)) if n.generation == 1]
    within = [n for n in children if ROOT_ACC - n.val_acc <= 4.0]
    assert min(within, key=lambda n: n.spec.params()).spec.convs == 4  # the orders really differ
    assert out.final.operator == "drop_block(block=1)"
    assert depth_latency(out.final.spec) == min(depth_latency(n.spec) for n in within)


def test_a_flops_run_backs_off_in_flops_and_its_headline_counts_flops(tmp_path, monkeypatch, capsys):
    fake_training(monkeypatch, lambda share: 0.0)
    args = ["search", "--preset", "smoke", "--run-dir", str(tmp_path), "--name", "smoke", "--no-progress"]
    args += ["--teacher-cache", "off", "--shrink", "flops", "--max-drop", "4", "--max-generations", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    study = study_of(tmp_path)
    root, child = (n.spec for n in nodes(study))
    line = next(line for line in out.splitlines() if line.startswith("final model:"))
    # The run's measure first, then the other two: root -> final with the change.
    assert f"({root.flops() / child.flops():.1f}x fewer FLOPs; --shrink flops)" in line
    assert f"{root.params():,} params -> {child.params():,} params" in line
    assert line.index("FLOPs") < line.index("params") and "ms (" in line
    assert set(study.user_attrs["latency_ms"]) == {spec_key(root), spec_key(child)}  # shown, not steered
    facts = load_run(tmp_path)
    table = root_vs_final_table(facts).set_index(root_vs_final_table(facts).index)
    latency = table.loc["CPU latency, batch 1, 1 thread (ms)"]
    assert latency.iloc[0] == f"{study.user_attrs['latency_ms'][spec_key(root)]:.3f}"
    md = write_report(tmp_path).markdown.read_text()
    assert f"{root.flops() / child.flops():.2f}× fewer FLOPs (--shrink flops" in md


def test_a_latency_run_times_each_architecture_once_and_a_resume_replays_its_decisions(tmp_path, monkeypatch):
    """The retry after an overshoot is chosen by the recorded latencies; a run interrupted while
    the retry trains resumes to the same lineage without timing anything again."""
    overshoot_below_latency(monkeypatch, 0.8)
    calls = []

    def timed(spec):
        calls.append(spec_key(spec))
        return depth_latency(spec)

    monkeypatch.setattr(sizes_mod, "latency_ms", timed)
    settings = dict(teacher_cache=False, shrink="latency", max_drop=2.0, max_generations=1)
    Search(smoke_config(tmp_path / "reference", **settings), progress=False).run()
    reference = open_study(f"sqlite:///{tmp_path}/reference/study.db", "smoke")
    assert len(calls) == len(set(calls))  # each architecture timed once
    assert set(calls) == set(reference.user_attrs["latency_ms"])
    steps = [(r["step"], r["outcome"]) for r in reference.user_attrs["steps"]]
    assert steps == [(0.5, "backed-off"), (0.25, "accepted")]
    first, retry = (n for n in nodes(reference) if n.generation == 1)
    assert depth_latency(retry.spec) > depth_latency(first.spec)  # the half step keeps more latency

    def interrupt_the_retry(model, data, settings, **kw):
        if kw.get("desc", "").startswith(f"gen 1 {retry.operator}"):
            raise KeyboardInterrupt
        return fresh_train(model, data, settings, **kw)

    overshoot_below_latency(monkeypatch, 0.8)  # a fresh root for the second run
    fresh_train = trainer_mod.train
    monkeypatch.setattr(trainer_mod, "train", interrupt_the_retry)
    cfg = smoke_config(tmp_path / "run", **settings)
    with pytest.raises(KeyboardInterrupt):
        Search(cfg, progress=False).run()
    overshoot_below_latency(monkeypatch, 0.8)

    def must_not_time(spec):
        raise AssertionError(f"{spec.summary()} timed again on resume")

    monkeypatch.setattr(sizes_mod, "latency_ms", must_not_time)
    Search(cfg, progress=False).run()
    study = open_study(f"sqlite:///{tmp_path}/run/study.db", "smoke")
    assert lineage_shape(study) == lineage_shape(reference)
    assert study.user_attrs["latency_ms"] == reference.user_attrs["latency_ms"]


def test_a_run_saved_before_shrink_existed_resumes_measuring_parameters(tmp_path, monkeypatch, capsys):
    fake_training(monkeypatch, lambda share: 0.0)
    cfg = smoke_config(tmp_path, teacher_cache=False, max_drop=4.0, max_generations=1)
    Search(cfg, progress=False).run()
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["shrink"]  # a config.json written before the setting existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert SearchConfig.from_json(json.dumps(saved)).shrink == "params"
    assert main(["search", "--run-dir", str(tmp_path), "--no-progress", "--max-generations", "2"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "smaller; --shrink params)" in out
    assert max(n.generation for n in nodes(study_of(tmp_path))) == 2


def test_an_unknown_shrink_measure_is_a_one_line_error_naming_the_choices(tmp_path, capsys):
    code = main(["search", "--preset", "smoke", "--run-dir", str(tmp_path), "--shrink", "bytes"])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "--shrink" in err and "params, flops, latency" in err
    assert not (tmp_path / "study.db").exists()


def test_latency_is_the_median_of_timed_batch_1_calls_on_one_thread(monkeypatch):
    import torch

    spec = load_space("tiny").root_spec(3, 10, 16, 1 / 16)
    before = torch.get_num_threads()
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    value = sizes_mod.latency_ms(spec)
    assert value > 0 and seen == [1, before] and torch.get_num_threads() == before
