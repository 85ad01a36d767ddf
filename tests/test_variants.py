"""The four variants, Optuna-driven choices, pruning, multi-objective runs, select and the dashboard."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace

import optuna
import pandas as pd
import pytest

from iterkd import run_search
from iterkd.arch import VGGSpec
from iterkd.cli import main
from iterkd.errors import IterkdError
from iterkd.lineage import Node, lineage_frame
from iterkd.run import open_run
from iterkd.spaces import load_space
from iterkd.storage import open_study
from iterkd.variants import KEY_FORMAT, Slot, adopt_key_format, key_format, polish_key
from tests.conftest import smoke_config


def lineage(cfg):
    return pd.read_csv(f"{cfg.run_dir}/lineage.csv").assign(
        parents=lambda d: d.parents.map(json.loads), teachers=lambda d: d.teachers.map(json.loads)
    )


def test_parent_children_trains_k_different_siblings_and_a_beam_grows_a_tree(tmp_path):
    cfg = smoke_config(tmp_path, variant="parent-children", children=2, beam=2, max_generations=2)
    run_search(cfg, progress=False)
    df = lineage(cfg)
    gen1, gen2 = df[df.generation == 1], df[df.generation == 2]
    assert len(gen1) == 2 and set(gen1.parents.map(tuple)) == {(0,)}
    assert gen1.operator.nunique() == 2  # siblings try different moves
    assert (gen1.status == "accepted").sum() == 2  # beam 2 keeps both
    assert len(gen2) == 4 and {p[0] for p in gen2.parents} == set(gen1.node)  # two parents: a real tree
    assert all(t == p for t, p in zip(gen2.teachers, gen2.parents))


@pytest.mark.parametrize("variant, k", [("ancestors-child", 1), ("ancestors-children", 2)])
def test_ancestors_variants_are_taught_by_every_accepted_ancestor(tmp_path, variant, k):
    cfg = smoke_config(tmp_path, variant=variant, children=k, max_generations=3)
    run_search(cfg, progress=False)
    df = lineage(cfg)
    accepted = {int(n) for n in df[df.status.isin(["root", "accepted"])].node}
    for row in df[df.generation > 0].itertuples():
        assert len(row.teachers) == row.generation  # generation g: root + g-1 accepted ancestors
        assert row.teachers[-1] == row.parents[0] and row.teachers[0] == 0
        assert set(row.teachers) <= accepted
    assert (df.generation == 3).sum() == k


def test_optuna_samplers_choose_the_moves_and_record_them(tmp_path):
    cfg = smoke_config(tmp_path, variant="parent-children", children=2, sampler="random", max_generations=1)
    run_search(cfg, progress=False)
    study = open_study(f"sqlite:///{tmp_path}/study.db", cfg.name)
    children = [t for t in study.trials if t.user_attrs["generation"] == 1]
    for t in children:
        assert t.params["operator"] in {"drop_layer", "drop_block", "shrink_widths"}
        assert t.user_attrs["move"] == t.user_attrs["operator"]  # what was built is recorded
    assert len({t.user_attrs["move"] for t in children}) == 2


def test_greedy_takes_the_space_s_preferred_move_and_records_it_as_trial_params(smoke_run):
    cfg, out = smoke_run
    study = open_study(f"sqlite:///{cfg.run_dir}/study.db", cfg.name)
    first = next(t for t in study.trials if t.user_attrs["generation"] == 1)
    space = load_space("tiny")
    preferred = space.moves(out.root.spec)[0]
    assert first.user_attrs["move"] == preferred.label == "drop_layer(block=2)"
    assert first.params == {"operator": "drop_layer", "position": 0.5}


def test_kd_ranges_declared_by_the_space_are_suggested_per_child(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(
        "root: {blocks: [[128, 128], [256, 256], [256]]}\noperators: [drop_layer, drop_block]\n"
        "kd: {temperature: [2, 8], alpha: 0.5}\n"
    )
    cfg = smoke_config(tmp_path / "run", space=str(space), max_generations=1)
    run_search(cfg, progress=False)
    study = open_study(f"sqlite:///{tmp_path}/run/study.db", cfg.name)
    child = next(t for t in study.trials if t.user_attrs["generation"] == 1)
    assert 2 <= child.params["temperature"] <= 8 and "alpha" not in child.params
    assert child.user_attrs["loss"]["alpha"] == 0.5


def test_a_pruned_child_is_recorded_as_pruned_and_another_move_is_tried(tmp_path, monkeypatch):
    calls = {"n": 0}

    def prune_first(self):
        calls["n"] += 1
        return calls["n"] == 1

    monkeypatch.setattr(optuna.trial.Trial, "should_prune", prune_first)
    cfg = smoke_config(tmp_path, pruner="median", max_generations=1)
    out = run_search(cfg, progress=False)
    df = lineage_frame(open_study(f"sqlite:///{tmp_path}/study.db", cfg.name))
    assert list(df.status) == ["root", "pruned", "accepted"]
    assert pd.isna(df.checkpoint.iloc[1]) and out.final.node == 2


def test_multi_objective_runs_keep_a_pareto_front_and_refuse_pruners(tmp_path):
    cfg = smoke_config(
        tmp_path, objectives="acc,params", variant="parent-children", children=2, max_generations=1
    )
    run_search(cfg, progress=False)
    study = open_study(f"sqlite:///{tmp_path}/study.db", cfg.name, directions=("maximize", "minimize"))
    assert len(study.directions) == 2 and study.best_trials
    assert all(t.values[1] == t.user_attrs["params"] for t in study.best_trials)
    with pytest.raises(IterkdError, match="--pruner median needs a single objective"):
        smoke_config(tmp_path / "x", objectives="acc,params", pruner="median")


def test_select_makes_a_node_the_parent_of_the_next_generation(tmp_path, capsys):
    cfg = smoke_config(tmp_path, variant="parent-children", children=2, max_generations=1)
    run_search(cfg, progress=False)
    gen1 = lineage(cfg).query("generation == 1")
    other = int(gen1[gen1.status == "rejected"].node.iloc[0])  # the sibling search did not pick
    assert main(["select", str(tmp_path), "--node", str(other)]) == 0
    assert "parent of generation 2" in capsys.readouterr().out
    chosen = open_run(tmp_path)
    assert chosen.final_node().node == other  # report, export and compare take the user's choice
    assert chosen.study.best_trial.number == other  # and so does Optuna's best trial
    out = run_search(replace(cfg, max_generations=2), progress=False)
    assert open_run(tmp_path).study.best_trial.number == out.final.node != other  # the search went on
    df = lineage(cfg)
    study = open_study(f"sqlite:///{tmp_path}/study.db", cfg.name)
    assert {"generation": 1, "nodes": [other], "by": "user"} in study.user_attrs["selection_log"]
    assert df.set_index("node").status[other] == "accepted"
    status = {
        t.number: t.user_attrs["status"] for t in study.trials
    }  # the dashboard's column follows the choice
    assert status == dict(zip(df.node, df.status))
    gen2 = df[df.generation == 2]
    assert len(gen2) == 2 and all(p == [other] for p in gen2.parents)
    assert main(["select", str(tmp_path), "--node", "99"]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_the_run_on_loopback(smoke_run):
    cfg, _ = smoke_run
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "iterkd", "dashboard", str(cfg.run_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        body = None
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, "dashboard did not answer"
        study = next(s for s in body["study_summaries"] if s["study_name"] == cfg.name)
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/studies/{study['study_id']}", timeout=10
        ) as r:
            detail = json.loads(r.read())
        trials = detail["trials"]
        assert len(trials) == 3
        attrs = {a["key"]: a["value"] for a in trials[1]["user_attrs"]}
        assert {
            "generation",
            "parents",
            "teachers",
            "spec_summary",
            "params",
            "val_acc",
            "drop",
            "budget",
            "status",
        } <= set(attrs)
        statuses = [{a["key"]: a["value"] for a in t["user_attrs"]}["status"] for t in trials]
        assert [json.loads(v) if v.startswith('"') else v for v in statuses] == pd.read_csv(
            f"{cfg.run_dir}/lineage.csv"
        ).status.tolist()  # the dashboard's column = lineage.csv's
        assert "Node 1" in trials[1]["note"]["body"] and "accepted" in trials[1]["note"]["body"]
        assert trials[1]["artifacts"], "checkpoint is attached as an artifact"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_candidate_keys_name_nodes_by_lineage_and_old_runs_keep_trial_numbers():
    spec = VGGSpec(((8,), (16,)), in_channels=1, num_classes=10, input_size=8)
    root = Node(0, "COMPLETE", 0, (), (), "root", spec, key="root")
    child = Node(3, "COMPLETE", 1, (0,), (0,), "drop_layer(block=2)", spec, key="g1|proot|troot|c0")
    renumbered = replace(child, node=7)  # the same candidate, trained again after a crash
    slot, again = Slot(child, (root, child), 1), Slot(renumbered, (root, renumbered), 1)
    assert slot.key(2, 0, KEY_FORMAT) == again.key(2, 0, KEY_FORMAT)  # so its seed is the same too
    assert "p3" not in slot.key(2, 0, KEY_FORMAT) and slot.key(2, 0, KEY_FORMAT) != slot.key(2, 1, KEY_FORMAT)
    assert slot.key(2, 0, 1) == "g2|p3|t0,3|c0"  # format 1: by trial number, as runs made before it
    assert (
        polish_key(child, 8, KEY_FORMAT)
        == polish_key(renumbered, 8, KEY_FORMAT)
        != polish_key(child, 4, KEY_FORMAT)
    )

    new = optuna.create_study()
    adopt_key_format(new)
    assert key_format(new) == KEY_FORMAT
    old = optuna.create_study()  # a run made before key formats: it already has nodes, no attribute
    old.enqueue_trial({})
    old.ask()
    adopt_key_format(old)
    assert key_format(old) == 1
