"""The final polish (--final-epochs) and Optuna's agreement with the search: the polish node in
every variant, the better of polish and unpolished as the final model, resume after a kill during
and after the polish, a polish trained by a worker, and `best_trial` / `best_trials` naming the
final model on SQLite and PostgreSQL, with runs made before this objective left as they were.

Most tests replace training with a function of the child's size (tests/test_steps.py), so which
node is accepted is decided by the test; the kill and worker tests train for real (smoke preset)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import torch

import iterkd.objective as objective_mod
import iterkd.trainer as trainer_mod
from iterkd.arch import VGGSpec
from iterkd.checkpoints import load_model
from iterkd.cli import main
from iterkd.lineage import ancestry, node_attrs, nodes, polish_record, set_selection
from iterkd.objective import FINAL_PATH, agree
from iterkd.run import open_run
from iterkd.search import Search
from iterkd.storage import open_study
from iterkd.train import TrainResult
from iterkd.variants import KEY_FORMAT, polish_key
from tests.conftest import smoke_config
from tests.test_distributed import _postgres_or_skip

ROOT_ACC = 90.0


def fake_training(monkeypatch, drop_at, polish_gain=0.5, calls=None):
    """Children 'train' instantly to ROOT_ACC - drop_at(share of the root's parameters); a polish
    to its starting node's accuracy + polish_gain. `calls` collects (desc, model, kwargs) of each."""
    root_params = {}
    accs = {}

    def train(model, data, settings, **kw):
        params = model.spec.params()
        root_params.setdefault("n", params)  # the root is trained first
        if calls is not None:
            calls.append((kw.get("desc", ""), {k: v.clone() for k, v in model.state_dict().items()}, kw))
        if kw.get("desc", "").startswith("polish"):
            acc = accs[params] + polish_gain
        else:
            acc = ROOT_ACC - (drop_at(params / root_params["n"]) if params < root_params["n"] else 0.0)
            accs[params] = acc
        return TrainResult(acc, acc, 0.0, settings.epochs, [acc], 0.0)

    monkeypatch.setattr(trainer_mod, "train", train)


def search(tmp_path, **overrides):
    cfg = smoke_config(tmp_path, teacher_cache=False, **overrides)
    out = Search(cfg, progress=False).run()
    return cfg, out, open_study(f"sqlite:///{tmp_path}/study.db", cfg.name)


@pytest.mark.parametrize(
    "variant, k",
    [("parent-child", 1), ("parent-children", 2), ("ancestors-child", 1), ("ancestors-children", 2)],
)
def test_the_polish_is_a_node_of_its_own_and_the_final_model_in_every_variant(
    tmp_path, monkeypatch, variant, k
):
    calls = []
    fake_training(monkeypatch, lambda share: 0.0, calls=calls)
    cfg, out, study = search(tmp_path, variant=variant, children=k, max_generations=2, final_epochs=3)
    all_nodes = nodes(study)
    polish = all_nodes[-1]
    last = next(n for n in all_nodes if n.node == study.user_attrs["selections"]["2"][0])
    assert (polish.operator, polish.parents, polish.generation) == ("polish", (last.node,), 3)
    assert polish.spec == last.spec and polish.epochs == 3 and polish.key == polish_key(last, 3, KEY_FORMAT)
    chain = ancestry(all_nodes, last)
    expected = [n.node for n in chain[:-1]] if variant.startswith("ancestors") else [0]
    assert list(polish.teachers) == expected  # the root, or every accepted ancestor
    desc, weights, kw = calls[-1]
    assert desc == f"polish node {last.node}" and len(kw["teachers"]) == len(expected)
    start = load_model(tmp_path / last.checkpoint).state_dict()
    assert all(torch.equal(weights[k], v) for k, v in start.items())  # from its own weights: no move
    # The polish validates 0.5 pts better: it is the final model everywhere a user looks.
    assert out.final.node == polish.node and study.user_attrs["final_node"] == polish.node
    assert open_run(tmp_path).final_node().node == polish.node
    assert polish_record(study) == {
        "node": polish.node,
        "from": last.node,
        "epochs": 3,
        "kept": True,
        "gain": 0.5,
    }
    assert study.best_trial.number == polish.node
    status = {t.number: t.user_attrs["status"] for t in study.trials}
    assert status[polish.node] == "accepted" and status[last.node] == "accepted"


def test_a_polish_that_validates_worse_leaves_the_unpolished_node_final(tmp_path, monkeypatch, capsys):
    fake_training(monkeypatch, lambda share: 0.0, polish_gain=-0.25)
    cfg, out, study = search(tmp_path, max_generations=1, final_epochs=2)
    polish, last = nodes(study)[-1], nodes(study)[1]
    assert polish.operator == "polish" and out.final.node == last.node == study.user_attrs["final_node"]
    assert polish_record(study)["kept"] is False and study.best_trial.number == last.node
    assert f"polish: node {polish.node} validates -0.25 pts against it; node {last.node} stays" in (
        capsys.readouterr().out
    )
    assert study.trials[polish.node].user_attrs["status"] == "rejected"  # kept in the lineage, set aside


def test_nothing_accepted_means_no_polish_and_the_root_is_final(tmp_path, monkeypatch):
    fake_training(monkeypatch, lambda share: 10.0)  # every child overshoots
    _, out, study = search(tmp_path, max_drop=2.0, min_step=0.3, max_generations=2, final_epochs=2)
    assert out.final.node == 0 and not any(n.operator == "polish" for n in nodes(study))
    assert study.best_trial.number == 0


def test_a_resumed_run_reuses_its_polish_and_another_length_polishes_again(tmp_path, monkeypatch):
    calls = []
    fake_training(monkeypatch, lambda share: 0.0, calls=calls)
    cfg, first, _ = search(tmp_path, max_generations=1, final_epochs=2)
    trained = len(calls)
    again = Search(cfg, progress=False).run()
    assert again.final.node == first.final.node and len(calls) == trained  # reused, not retrained
    longer = Search(
        smoke_config(tmp_path, teacher_cache=False, max_generations=1, final_epochs=4), progress=False
    )
    out = longer.run()
    study = open_study(f"sqlite:///{tmp_path}/study.db", cfg.name)
    assert (
        out.final.key == polish_key(nodes(study)[1], 4, KEY_FORMAT)
        and out.final.epochs == 4
        and len(calls) == trained + 1
    )
    assert study.best_trial.number == out.final.node
    assert study.trials[first.final.node].user_attrs["status"] == "rejected"  # the earlier polish


# -- kills at named fault points (tests/test_resume.py's pattern) --------------------------------------

FLAGS = ["--preset", "smoke", "--max-drop", "60", "--max-generations", "2", "--final-epochs", "2"]
FLAGS += ["--no-progress", "--seed", "0"]


def _search_until(run_dir, fault: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ITERKD_FAULT": fault}
    return subprocess.run(
        [sys.executable, "-m", "iterkd", "search", "--run-dir", str(run_dir), *FLAGS],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


# Smoke: the root trains 3 epochs and each child 4, so the 12th mid-epoch point is the polish's
# first epoch; the 4th trial told is the polish's (root, two children, polish).
@pytest.mark.parametrize("fault, retrained", [("mid-epoch:12", True), ("trial-told:4", False)])
def test_a_run_killed_during_or_after_its_polish_resumes_without_retraining_finished_nodes(
    tmp_path, fault, retrained
):
    run_dir = tmp_path / "run"
    proc = _search_until(run_dir, fault)
    assert proc.returncode == -9, proc.stdout[-500:] + proc.stderr[-500:]
    study = open_study(f"sqlite:///{run_dir}/study.db", "run")
    at_kill = {t.number: t.state.name for t in study.trials}
    assert (
        at_kill[3] == ("RUNNING" if retrained else "COMPLETE")
        and study.trials[3].user_attrs["operator"] == "polish"
    )
    assert "final_node" not in study.user_attrs
    kept = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").glob("node-*")}

    assert main(["resume", str(run_dir), "--no-progress"]) == 0
    study = open_study(f"sqlite:///{run_dir}/study.db", "run")
    states = [t.state.name for t in study.trials]
    polishes = [t for t in study.trials if t.user_attrs["operator"] == "polish"]
    assert states == (["COMPLETE"] * 3 + ["FAIL", "COMPLETE"] if retrained else ["COMPLETE"] * 4)
    final = study.user_attrs["final_node"]
    assert final == polishes[-1].number and study.best_trial.number == final
    for name, mtime in kept.items():  # finished nodes' checkpoints untouched: nothing retrained
        assert (run_dir / "checkpoints" / name).stat().st_mtime_ns == mtime


# -- workers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_worker_trains_the_polish_and_best_trial_is_the_final_node(tmp_path, backend):
    storage = None if backend == "sqlite" else _postgres_or_skip()
    name = f"p{uuid.uuid4().hex[:10]}"
    cfg = smoke_config(
        tmp_path / "run", name=name, storage=storage, workers=1, max_generations=1, final_epochs=1
    )
    out = Search(cfg, progress=False).run()
    study = open_study(storage or f"sqlite:///{cfg.run_dir}/study.db", name, create=False)
    polish = study.trials[out.final.node] if out.final.operator == "polish" else study.trials[-1]
    assert polish.user_attrs["operator"] == "polish" and polish.state.name == "COMPLETE"
    assert polish.user_attrs["pid"] != os.getpid()  # a worker trained it, not the coordinator
    assert study.best_trial.number == out.final.node == study.user_attrs["final_node"]


# -- the objective ----------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/study.db"
    return _postgres_or_skip()


def _lineage(study):
    """A hand-made lineage where raw sizes and accuracies would make Optuna pick anything but the
    final model: a smaller within-budget sibling that was not selected (it is also more accurate
    than the final model), an over-budget tiny child, and a polish the size of the node it polishes.
    Returns the final node (the polish)."""
    objective_mod.adopt(study)

    def spec(*blocks):
        return VGGSpec(blocks=blocks, in_channels=3, num_classes=10, input_size=32)

    root, a, c = spec((8, 8), (16, 16), (16,)), spec((8, 8), (16,), (16,)), spec((8,), (16,), (16,))
    b, tiny = spec((8, 8), (16,)), spec((8,))  # 2,210 and 330 params; c has 3,962

    def add(generation, parents, op, spec, acc, key=None):
        trial = study.ask()
        for k, v in node_attrs(
            generation=generation,
            parents=parents,
            teachers=parents[:1],
            operator=op,
            spec=spec,
            key=key or op,
        ).items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("val_acc", acc)
        drop = 90.0 - acc
        values, constraints = objective_mod.told(study, spec.params(), acc, drop, 1.0)
        for k, v in constraints.items():
            trial.set_constraint(k, v)
        study.tell(trial, values)
        return trial.number

    n_root = add(0, [], "root", root, 90.0)
    n_a = add(1, [n_root], "a", a, 89.6)
    n_b = add(1, [n_root], "b", b, 89.5)  # within budget, smaller than c and more accurate: not selected
    set_selection(study, 1, [n_a])
    n_c = add(2, [n_a], "c", c, 89.2)
    add(3, [n_c], "tiny", tiny, 70.0)  # over budget
    set_selection(study, 2, [n_c])
    n_p = add(3, [n_c], "polish", c, 89.4, key="polish|n3|e2")
    return {n.node: n for n in nodes(study)}[n_p], n_b


def test_best_trial_is_the_final_model_however_sizes_and_accuracies_fall(storage_url):
    study = open_study(storage_url, f"o{uuid.uuid4().hex[:8]}")
    final, _ = _lineage(study)
    agree(study, final)
    assert study.best_trial.number == final.node
    # Another process (the dashboard) reads the same from the database, including the badge's query.
    fresh = open_study(storage_url, study.study_name, create=False)
    assert fresh.best_trial.number == final.node
    assert fresh._storage.get_best_trial(fresh._study_id).number == final.node  # noqa: SLF001
    assert study.user_attrs["objective"] == FINAL_PATH


def test_best_trials_of_acc_params_hold_the_final_model(storage_url):
    study = open_study(storage_url, f"m{uuid.uuid4().hex[:8]}", directions=("maximize", "minimize"))
    final, sibling = _lineage(study)
    agree(study, final)
    best = {t.number for t in open_study(storage_url, study.study_name, create=False).best_trials}
    values = {t.number: t.values for t in study.trials}
    assert values[sibling][0] > values[final.node][0] and values[sibling][1] < values[final.node][1]
    assert final.node in best and sibling not in best  # the sibling dominates it, off the final path
    assert all(t.values[1] == t.user_attrs["params"] for t in study.trials)  # values are never rewritten


def test_a_run_made_before_this_objective_resumes_with_its_own(tmp_path, monkeypatch):
    fake_training(monkeypatch, lambda share: 0.0)
    monkeypatch.setattr(objective_mod, "adopt", lambda study: None)  # what older versions did
    cfg, _, _ = search(tmp_path, max_generations=1)
    monkeypatch.undo()
    fake_training(monkeypatch, lambda share: 0.0)
    Search(
        smoke_config(tmp_path, teacher_cache=False, max_generations=2, final_epochs=1), progress=False
    ).run()
    study = open_study(f"sqlite:///{tmp_path}/study.db", cfg.name)
    assert "objective" not in study.user_attrs
    assert all(t.value == t.user_attrs["val_acc"] for t in study.trials)  # nothing rewritten
    assert main(["report", str(tmp_path)]) == 0
