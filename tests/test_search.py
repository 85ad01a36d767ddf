"""End-to-end smoke searches: the lineage they leave, resume, and failing children."""

import json

import pandas as pd
import pytest
import torch

from iterkd import run_search
from iterkd.data import val_images
from iterkd.lineage import LINEAGE_COLUMNS, lineage_frame, nodes
from iterkd.objective import final_path
from iterkd.search import Search
from iterkd.storage import open_study
from tests.conftest import smoke_config


def test_parent_child_lineage_is_a_chain_taught_by_parents(smoke_run):
    cfg, out = smoke_run
    df = pd.read_csv(f"{cfg.run_dir}/lineage.csv")
    assert list(df.columns) == LINEAGE_COLUMNS
    root = df[df.generation == 0].iloc[0]
    assert root.status == "root" and json.loads(root.parents) == [] and root["drop"] == 0
    accepted = df[df.status == "accepted"].sort_values("generation")
    assert list(accepted.generation) == [1, 2]
    chain = [int(root.node)] + list(accepted.node)
    for parent, (_, row) in zip(chain, accepted.iterrows()):
        assert json.loads(row.parents) == [parent] and json.loads(row.teachers) == [parent]
    params = [int(root.params)] + list(accepted.params)
    assert all(a > b for a, b in zip(params, params[1:]))
    assert out.final.node == chain[-1] and "max-generations" in out.stop_reason


def test_lineage_numbers_match_the_study_and_the_checkpoints(smoke_run):
    cfg, _ = smoke_run
    df = pd.read_csv(f"{cfg.run_dir}/lineage.csv")
    study = open_study(f"sqlite:///{cfg.run_dir}/study.db", cfg.name, create=False)
    trials = {t.number: t for t in study.trials}
    root_acc = df.loc[df.generation == 0, "val_acc"].iloc[0]
    root_params = df.loc[df.generation == 0, "params"].iloc[0]
    all_nodes = nodes(study)
    path = final_path(all_nodes, next(n for n in all_nodes if n.node == study.user_attrs["final_node"]))
    for row in df.itertuples():
        t = trials[row.node]
        # The objective (iterkd.objective): × smaller on the final path, 0 elsewhere.
        assert t.value == pytest.approx(root_params / row.params if row.node in path else 0.0)
        assert t.user_attrs["params"] == row.params
        assert row.drop == pytest.approx(root_acc - row.val_acc, abs=1e-3)
        assert (cfg.run_dir / __import__("pathlib").Path(row.checkpoint)).is_file()
        assert 0 <= row.val_acc <= 100 and row.flops > 0 and row.bytes > 4 * row.params


def test_the_root_beats_chance_on_synthetic_data(smoke_run):
    assert smoke_run[1].root.val_acc > 50  # 10 classes: chance is 10 %


def test_rerunning_a_finished_run_retrains_nothing(smoke_run):
    cfg, first = smoke_run
    before = len(open_study(f"sqlite:///{cfg.run_dir}/study.db", cfg.name).trials)
    again = run_search(cfg, progress=False)
    after = open_study(f"sqlite:///{cfg.run_dir}/study.db", cfg.name).trials
    assert len(after) == before and again.final.node == first.final.node


def test_an_interrupted_run_resumes_without_retraining_finished_nodes(tmp_path, monkeypatch):
    import iterkd.trainer as trainer_mod

    cfg = smoke_config(tmp_path, max_generations=2)
    real = trainer_mod.train
    calls = {"n": 0}

    def interrupt_second_child(model, data, settings, **kw):
        if kw.get("teachers"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # Ctrl-C in the middle of generation 2's training
        return real(model, data, settings, **kw)

    monkeypatch.setattr(trainer_mod, "train", interrupt_second_child)
    with pytest.raises(KeyboardInterrupt):
        Search(cfg, progress=False).run()
    study = open_study(f"sqlite:///{tmp_path}/study.db", cfg.name)
    assert list(lineage_frame(study).status) == ["root", "accepted", "failed"]
    trained = {t.number: t.datetime_complete for t in study.trials}

    monkeypatch.setattr(trainer_mod, "train", real)
    out = Search(cfg, progress=False).run()
    study = open_study(f"sqlite:///{tmp_path}/study.db", cfg.name)
    df = lineage_frame(study)
    assert list(df.status) == ["root", "accepted", "failed", "accepted"]
    assert df.operator.iloc[2] == df.operator.iloc[3]  # the interrupted candidate is retried
    assert {t.number: t.datetime_complete for t in study.trials if t.number < 3} == trained  # not retrained
    assert out.final.node == 3 and out.final.generation == 2


def test_a_child_whose_loss_diverges_fails_and_the_next_move_is_tried(tmp_path, monkeypatch):
    cfg = smoke_config(tmp_path, max_generations=1)
    import iterkd.trainer as trainer_mod

    real = trainer_mod.train
    state = {"children": 0}

    def nan_first_child(model, data, settings, **kw):
        if kw.get("teachers"):
            state["children"] += 1
            if state["children"] == 1:
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float("nan"))
        return real(model, data, settings, **kw)

    monkeypatch.setattr(trainer_mod, "train", nan_first_child)
    out = Search(cfg, progress=False).run()
    df = lineage_frame(open_study(f"sqlite:///{tmp_path}/study.db", cfg.name))
    assert list(df.status) == ["root", "failed", "accepted"]
    assert "loss became nan" in df.error.iloc[1]
    assert df.operator.iloc[1] != df.operator.iloc[2] and out.final.node == 2


def test_teacher_checkpoint_becomes_the_root(tmp_path, smoke_run):
    cfg, first = smoke_run
    teacher = cfg.run_dir + "/" + first.root.checkpoint
    cfg2 = smoke_config(tmp_path, teacher=teacher, max_generations=1)
    out = run_search(cfg2, progress=False)
    assert out.root.operator.startswith("teacher:") and out.root.seconds == 0
    assert out.root.val_acc == pytest.approx(first.root.val_acc)
    assert out.root.spec == first.root.spec


def test_teacher_caches_are_files_in_the_run_and_a_resumed_run_reuses_them(tmp_path, monkeypatch):
    import iterkd.trainer as trainer_mod
    from iterkd.cache import TeacherCache

    cfg = smoke_config(tmp_path, variant="ancestors-child", max_generations=2)
    real_train = trainer_mod.train

    def interrupt_generation_2(model, data, settings, **kw):
        if len(kw.get("teachers", ())) == 2:  # root + node 1 teach generation 2
            raise KeyboardInterrupt
        return real_train(model, data, settings, **kw)

    monkeypatch.setattr(trainer_mod, "train", interrupt_generation_2)
    with pytest.raises(KeyboardInterrupt):
        Search(cfg, progress=False).run()
    n = 2000 - val_images(cfg.val_size, 2000, "synthetic")  # the synthetic training set minus validation
    root_file = tmp_path / "cache" / f"node-0-seed-0-views-4-n-{n}.safetensors"
    assert [p.name for p in (tmp_path / "cache").glob("*.safetensors")] == [root_file.name]
    assert root_file.stat().st_size > 4 * n * 10 * 2  # four views of fp16 logits for every sample

    computed = []
    real_ensure = TeacherCache.ensure_view

    def record(self, view, block=None):
        was_computed = real_ensure(self, view, block)
        if was_computed:
            computed.append((self.path.name, view))
        return was_computed

    monkeypatch.setattr(trainer_mod, "train", real_train)
    monkeypatch.setattr(TeacherCache, "ensure_view", record)
    search = Search(cfg, progress=False)
    out = search.run()
    assert out.final.generation == 2
    assert search.trainer._caches[0].loaded_views == [0, 1, 2, 3]  # the root's logits came from its file
    assert [name for name, _ in computed] == [f"node-1-seed-0-views-4-n-{n}.safetensors"] * 4
    study = open_study(f"sqlite:///{tmp_path}/study.db", cfg.name)
    # Each epoch looks up the root's logits (from its file: hits), node 1's logits and node 1's hint
    # features (the parent is the hint teacher; both computed here, each view once: misses).
    assert study.trials[-1].user_attrs["teacher_cache_hit_rate"] == pytest.approx(1 - 8 / 12)


def test_several_teachers_make_an_ensemble_root_that_teaches_generation_1(tmp_path, smoke_run, monkeypatch):
    import iterkd.trainer as trainer_mod
    from iterkd.checkpoints import load_model
    from iterkd.data import load_data
    from iterkd.train import evaluate_ensemble

    cfg, first = smoke_run
    study = open_study(f"sqlite:///{cfg.run_dir}/study.db", cfg.name)
    child = next(
        t for t in study.trials if t.user_attrs.get("generation") == 1 and t.state.name == "COMPLETE"
    )
    paths = [f"{cfg.run_dir}/{first.root.checkpoint}", f"{cfg.run_dir}/{child.user_attrs['checkpoint']}"]
    taught_by = []
    real_train = trainer_mod.train

    def record(model, data, settings, **kw):
        taught_by.append(len(kw.get("teachers", ())))
        return real_train(model, data, settings, **kw)

    monkeypatch.setattr(trainer_mod, "train", record)
    out = run_search(smoke_config(tmp_path, teacher=tuple(paths), max_generations=1), progress=False)

    root = out.root
    assert root.operator == "teacher:ensemble of 2" and len(root.members) == 2
    models = [load_model(tmp_path / m["checkpoint"]) for m in root.members]  # copied into the run
    data = load_data("synthetic", None, val_size=cfg.val_size, seed=cfg.seed)
    assert root.val_acc == pytest.approx(evaluate_ensemble(models, data.val_x, data.val_y, data))
    best = max(root.members, key=lambda m: m["val_acc"])
    assert root.spec.summary() == best["spec_summary"]  # children derive from the best member
    assert taught_by and all(n == 2 for n in taught_by)  # both members teach every child of generation 1
    assert out.final.generation == 1 and out.final.teachers == (root.node,)


def test_a_drop_exactly_at_the_budget_is_within_it():
    from iterkd.lineage import within_budget

    root, child = 100 * 4502 / 5000, 100 * 4487 / 5000  # 90.04 % and 89.74 % of 5,000 validation images
    assert root - child > 0.3  # what float arithmetic makes of a drop of exactly 0.30 points
    assert within_budget(root - child, 0.3)
    assert not within_budget(root - 100 * 4486 / 5000, 0.3)  # one image more is over


def test_a_diverging_root_is_one_line(tmp_path, capsys):
    from iterkd.cli import main

    assert (
        main(
            ["search", "--preset", "smoke", "--run-dir", str(tmp_path / "r"), "--lr", "1e9", "--no-progress"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("iterkd: error: the root diverged (") and "lower --lr" in err[0]
    )
