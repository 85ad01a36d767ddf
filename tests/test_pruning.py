"""--pruner budget: a child clearly over --max-drop is pruned (its epochs recorded), one that has
clearly converged stops and is kept as a COMPLETE node that can be accepted, in every variant.
Training is replaced by scripted validation curves that go through the real `on_epoch`."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest

import iterkd.trainer as trainer_mod
from iterkd import run_search
from iterkd.cli import main
from iterkd.lineage import lineage_frame, node_attrs, nodes
from iterkd.pruning import BudgetPruner
from iterkd.spaces import load_space
from iterkd.storage import open_study
from iterkd.train import TrainResult
from tests.conftest import smoke_config

ROOT_ACC = 90.0
SPEC = load_space("tiny").root_spec(3, 10, 16, 1 / 16)


def scripted_training(monkeypatch, curve):
    """Every model 'trains' through `curve(child/parent params ratio, epochs)`, a list of validation
    accuracies, calling on_epoch after each epoch as train() does (and stopping when it says so)."""
    sizes = {}

    def train(model, data, settings, on_epoch=None, **kw):
        params = model.spec.params()
        sizes.setdefault("root", params)
        parent = kw.get("hint_teacher")
        ratio = 1.0 if parent is None else params / parent.spec.params()
        history = []
        for epoch, acc in enumerate(curve(ratio, settings.epochs)):
            history.append(acc)
            if on_epoch is not None and on_epoch(epoch, acc):
                break
        return TrainResult(history[-1], history[-1], 0.0, len(history), history, 0.0)

    monkeypatch.setattr(trainer_mod, "train", train)


def converging_or_hopeless(ratio, epochs):
    """The root and mild cuts (inheriting their parent's weights) hold the root's accuracy from the
    first epoch on; a child that keeps less than 60 % of its parent is stuck 20 points below."""
    if ratio < 0.6:
        return [ROOT_ACC - 20.0] * epochs
    return [ROOT_ACC] * epochs


@pytest.mark.parametrize(
    "variant, k",
    [("parent-child", 1), ("parent-children", 2), ("ancestors-child", 1), ("ancestors-children", 2)],
)
def test_the_budget_pruner_prunes_hopeless_children_and_keeps_converged_ones(
    tmp_path, monkeypatch, variant, k
):
    scripted_training(monkeypatch, converging_or_hopeless)
    cfg = smoke_config(
        tmp_path, variant=variant, children=k, pruner="budget", max_drop=2.0, teacher_cache=False
    )
    out = run_search(cfg, progress=False)
    df = lineage_frame(open_study(f"sqlite:///{tmp_path}/study.db", cfg.name)).set_index("node")
    children = df[df.generation > 0]
    pruned, kept = children[children.status == "pruned"], children[children.status != "pruned"]
    # Hopeless: cut after its second epoch, the first after the LR warm-up (18 points past the
    # budget, where finished children of this run gained nothing after it), with no checkpoint,
    # its epochs recorded.
    assert len(pruned) >= 1 and (pruned.epochs_trained == 2).all() and pruned.checkpoint.isna().all()
    # Converged: a plateau for two epochs once the learning rate has annealed (3 of 4 epochs), the
    # trained weights kept, recorded COMPLETE, and accepted.
    assert (kept.epochs_trained == 3).all() and (kept.epochs == 4).all() and kept.checkpoint.notna().all()
    assert out.final.generation == 2 and out.final.epochs_trained == 3 and out.final.val_acc == ROOT_ACC
    assert df.status[out.final.node] == "accepted"
    assert df.epochs_trained[0] == 3  # the root (smoke: 3 root epochs) is never stopped early


def test_a_generation_whose_children_were_pruned_over_budget_backs_off(tmp_path, monkeypatch):
    scripted_training(monkeypatch, converging_or_hopeless)
    out = run_search(
        smoke_config(tmp_path, pruner="budget", max_drop=2.0, teacher_cache=False), progress=False
    )
    study = open_study(f"sqlite:///{tmp_path}/study.db", "smoke")
    steps = [(r["generation"], r["round"], r["outcome"]) for r in study.user_attrs["steps"]]
    # Generation 2's first child (half its parent) was cut as over budget: a smaller step follows,
    # as after a finished child over --max-drop, not another move of the same size.
    assert steps == [(1, 0, "accepted"), (2, 0, "backed-off"), (2, 1, "accepted")]
    over = next(n for n in nodes(study) if n.state == "PRUNED")
    assert over.failure == "over-budget" and over.history == (ROOT_ACC - 20.0,) * 2
    assert study.user_attrs["steps"][1]["drop"] == pytest.approx(20.0)
    assert out.final.key.endswith("|r1") and out.final.spec.params() > over.spec.params()


def test_without_the_budget_pruner_every_child_trains_its_epochs(tmp_path, monkeypatch):
    scripted_training(monkeypatch, converging_or_hopeless)
    out = run_search(smoke_config(tmp_path, max_drop=2.0, teacher_cache=False), progress=False)
    df = lineage_frame(open_study(f"sqlite:///{tmp_path}/study.db", "smoke"))
    assert (df[df.generation > 0].epochs_trained == 4).all() and "pruned" not in set(df.status)
    assert out.final.epochs_trained == 4


def test_the_summary_and_the_report_show_the_epochs_saved(tmp_path, monkeypatch, capsys):
    scripted_training(monkeypatch, converging_or_hopeless)
    args = ["search", "--preset", "smoke", "--run-dir", str(tmp_path), "--name", "smoke", "--no-progress"]
    args += ["--teacher-cache", "off", "--pruner", "budget", "--max-drop", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    df = pd.read_csv(tmp_path / "lineage.csv")
    children = df[df.generation > 0]
    trained, planned = int(children.epochs_trained.sum()), int(children.epochs.sum())
    pruned = int((children.status == "pruned").sum())
    converged = len(children) - pruned
    line = (
        f"children trained {trained} of {planned} planned epochs ({planned - trained} saved: "
        f"{pruned} pruned, {converged} stopped converged)"
    )
    assert f"epochs: {line}" in out and planned - trained == converged + 2 * pruned and pruned
    print(line)
    md = (tmp_path / "report.md").read_text()
    assert f"**epochs**: {line}" in md and "| 3 of 4 |" in md and "| 2 of 4 |" in md


def test_the_budget_pruner_works_in_a_multi_objective_run(tmp_path, monkeypatch):
    scripted_training(monkeypatch, converging_or_hopeless)
    cfg = smoke_config(tmp_path, objectives="acc,params", pruner="budget", max_drop=2.0, teacher_cache=False)
    run_search(cfg, progress=False)
    study = open_study(f"sqlite:///{tmp_path}/study.db", cfg.name, directions=("maximize", "minimize"))
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.PRUNED in states and optuna.trial.TrialState.FAIL not in states


# -- the rules, one at a time ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "history, converged",
    [
        ([80, 85, 86, 86, 86], True),  # 5 of 8 epochs (LR at half its peak), flat for two: stop
        ([80, 86, 86, 86], False),  # flat, but 4 of 8 epochs: the LR is still high
        ([80, 85, 86, 86.5, 87], False),  # still gaining
        ([80, 86, 86, 86, 85], False),  # flat, but the last epoch is a point below the best
        ([80, 86, 86, 86, 86, 86, 86, 86], False),  # the last epoch: nothing left to save
        ([80, 86.0, 86.05, 86.1, 86.1], True),  # gains within 0.1 points are no gains
    ],
)
def test_convergence_needs_a_plateau_in_the_annealing_phase(history, converged):
    assert BudgetPruner(epochs=8, max_drop=1.0).converged([float(v) for v in history]) is converged


def study_with_children(*histories, epochs=4):
    """An in-memory study with a root at ROOT_ACC and finished children with these histories."""
    study = optuna.create_study()

    def add(generation, history, planned):
        trial = study.ask()
        parents = (0,) if generation else ()
        attrs = node_attrs(
            generation=generation,
            parents=parents,
            teachers=parents,
            operator="x",
            spec=SPEC,
            key="k",
            epochs=planned,
        )
        for key, value in {**attrs, "val_acc": history[-1], "history": history}.items():
            trial.set_user_attr(key, value)
        study.tell(trial, history[-1])

    add(0, [ROOT_ACC], 3)
    for history in histories:
        add(1, history, epochs)
    return study


def test_nothing_is_pruned_for_the_budget_before_a_child_has_finished():
    pruner = BudgetPruner(epochs=4, max_drop=1.0)
    assert pruner.over_budget(study_with_children(), [10.0]) == ""
    # A child planned for other epochs teaches nothing about these.
    assert pruner.over_budget(study_with_children([80.0, 90.0], epochs=2), [10.0]) == ""


def test_no_child_is_cut_for_the_budget_while_the_learning_rate_warms_up():
    pruner = BudgetPruner(epochs=8, max_drop=1.0)
    study = study_with_children([80.0, 88.0, 89.0, 90.0, 90.0, 90.0, 90.0, 90.0], epochs=8)
    assert pruner.over_budget(study, [0.0]) == pruner.over_budget(study, [0.0, 0.0]) == ""  # epochs 1-2
    assert pruner.over_budget(study, [0.0, 0.0, 0.0]).startswith("over budget after epoch 3 of 8")


def test_a_child_is_pruned_only_past_what_finished_children_recovered():
    pruner = BudgetPruner(epochs=4, max_drop=1.0)
    study = study_with_children([80.0, 88.0, 89.0, 90.0])  # gained 2 points after epoch 2
    # After epoch 2 it may still gain 1.25 * 2 + 0.25 = 2.75 points: the budget is 89, so 86.25 is the line.
    assert pruner.over_budget(study, [70.0, 86.5]) == ""
    reason = pruner.over_budget(study, [70.0, 86.0])
    assert reason.startswith("over budget after epoch 2 of 4: 86.00% is 3.00 points past --max-drop 1")
    assert pruner.over_budget(study, [0.0, 0.0, 0.0, 0.0]) == ""  # the last epoch is never cut
    # Optuna's interface reaches the same verdict from the reported values (accuracy minus the parent's).
    trial = study.ask()
    trial.set_user_attr("parents", [0])
    for epoch, acc in enumerate([70.0, 86.0]):
        trial.report(acc - ROOT_ACC, epoch)
    frozen = study.get_trials(deepcopy=False)[trial.number]
    assert pruner.prune(study, frozen) is True
    assert BudgetPruner(epochs=4, max_drop=5.0).prune(study, frozen) is False  # 86 is within 85


def test_budget_is_a_registered_pruner_and_allowed_with_two_objectives(tmp_path):
    from iterkd.choices import PRUNERS, make_pruner

    assert "budget" in PRUNERS and isinstance(make_pruner("budget", 8, 1.0), BudgetPruner)
    assert smoke_config(tmp_path, objectives="acc,params", pruner="budget").pruner == "budget"


def test_train_ends_after_the_epoch_whose_callback_returns_true(tmp_path):
    """The hook a converged child stops through: the weights of that epoch, its accuracies, its count."""
    from iterkd.models import VGG
    from iterkd.train import TrainSettings, evaluate, train

    data = smoke_config(tmp_path, train_subset=256).load_data()
    model = VGG(SPEC)
    seen = []
    result = train(
        model,
        data,
        TrainSettings(epochs=4, batch_size=64),
        on_epoch=lambda epoch, val: seen.append(epoch) or epoch == 1,
        progress=False,
    )
    assert seen == [0, 1] and result.epochs == 2 and len(result.history) == 2
    assert result.val_acc == result.history[-1] == evaluate(model, data.val_x, data.val_y, data)
