"""The step controller: back-off after an overshoot, growth far inside the budget, the minimum-step
stop, --time-budget, and every variant backing off. Training is replaced by a function of the
child's size (its share of the root's parameters), so which child overshoots is decided by the test.

The tiny space's children of the smoke root keep these shares of its parameters: drop_layer(block=2)
and drop_block(block=3) 0.66, drop_block(block=1) 0.774, drop_layer(block=1) 0.913, drop_block(block=2)
0.32, shrink_widths(all, 0.5) 0.272."""

from __future__ import annotations

import types

import pytest

import iterkd.search as search_mod
import iterkd.trainer as trainer_mod
from iterkd.lineage import lineage_frame, nodes, selections
from iterkd.search import Search, StepController
from iterkd.spaces import load_space
from iterkd.storage import open_study
from iterkd.train import TrainResult
from tests.conftest import smoke_config

ROOT_ACC = 90.0


def fake_training(monkeypatch, drop_at):
    """Make every child 'train' instantly to ROOT_ACC minus drop_at(its share of the root's parameters)."""
    root_params = {}

    def train(model, data, settings, **kw):
        params = model.spec.params()
        root_params.setdefault("n", params)  # the root is trained first
        acc = ROOT_ACC - (drop_at(params / root_params["n"]) if params < root_params["n"] else 0.0)
        return TrainResult(acc, acc, 0.0, settings.epochs, [acc], 0.0)

    monkeypatch.setattr(trainer_mod, "train", train)


def search(tmp_path, **overrides):
    cfg = smoke_config(tmp_path, teacher_cache=False, **overrides)
    out = Search(cfg, progress=False).run()
    study = open_study(f"sqlite:///{tmp_path}/study.db", cfg.name)
    return out, study


def overshoot_below(share, over=10.0):
    """Children smaller than `share` of the root lose `over` points; the others lose nothing."""
    return lambda s: 0.0 if s >= share else over


def test_an_overshoot_backs_off_to_a_smaller_step_from_the_same_parent(tmp_path, monkeypatch):
    fake_training(monkeypatch, overshoot_below(0.7))
    out, study = search(tmp_path, max_drop=2.0, max_generations=1)
    df = lineage_frame(study).set_index("node")
    gen1 = [n for n in nodes(study) if n.generation == 1]
    assert [n.parents for n in gen1] == [(0,), (0,)]  # the second attempt starts from the same parent
    first, second = gen1
    assert (
        first.operator == "drop_layer(block=2)" and df.status[first.node] == "rejected"
    )  # kept, as rejected
    assert second.operator == "drop_block(block=1)" and df.status[second.node] == "accepted"
    assert second.key == first.key + "|r1" and second.spec.params() > first.spec.params()
    steps = study.user_attrs["steps"]
    assert [(r["generation"], r["round"], r["step"], r["outcome"]) for r in steps] == [
        (1, 0, 0.5, "backed-off"),
        (1, 1, 0.25, "accepted"),
    ]
    assert steps[0]["target"] == 0.5 and steps[1]["target"] == 0.75 and steps[0]["drop"] == pytest.approx(10)
    assert selections(study) == {1: [second.node]} and out.final.node == second.node


def test_a_child_far_inside_the_budget_grows_the_next_step_up_to_max_step(tmp_path, monkeypatch):
    fake_training(monkeypatch, lambda share: 0.0)
    out, study = search(tmp_path, max_drop=4.0, max_step=0.75, max_generations=2)
    assert [r["step"] for r in study.user_attrs["steps"]] == [0.5, 0.75]  # 0.5 * 1.5, the cap
    gen1, gen2 = (next(n for n in nodes(study) if n.generation == g) for g in (1, 2))
    expected = load_space("tiny").moves(gen1.spec, target=0.25)[0]  # the move closest to keeping a quarter
    assert gen2.spec == expected.spec and gen2.spec.params() / gen1.spec.params() < 0.3
    assert out.final.node == gen2.node


def test_growth_after_a_back_off_is_capped_at_the_space_s_step(tmp_path, monkeypatch):
    fake_training(monkeypatch, overshoot_below(0.7, over=3.0))
    _, study = search(tmp_path, max_drop=2.0, max_generations=2)
    steps = [(r["generation"], r["step"], r["outcome"]) for r in study.user_attrs["steps"]]
    # 0.25 was accepted with no drop: the next generation grows it to 0.375, not beyond the space's 0.5.
    assert steps[:3] == [(1, 0.5, "backed-off"), (1, 0.25, "accepted"), (2, 0.375, "backed-off")]


def test_the_search_ends_when_no_step_of_at_least_min_step_stays_within_the_budget(
    tmp_path, monkeypatch, capsys
):
    fake_training(monkeypatch, lambda share: 10.0)  # every child overshoots
    out, study = search(tmp_path, max_drop=2.0, min_step=0.07, max_generations=3)
    said = capsys.readouterr().out
    assert "backing off to a step of 25.0% from the same parents" in said
    assert "backing off to a step of 12.5% from the same parents" in said
    # The last overshoot announces no back-off that the search will not make.
    assert "backing off to a step of 6.2%" not in said
    assert "a half step (6.2%) would be under --min-step 0.07" in said
    assert [r["step"] for r in study.user_attrs["steps"]] == [0.5, 0.25, 0.125]  # the next, 0.0625, is < 0.07
    assert [n.operator for n in nodes(study) if n.generation] == [
        "drop_layer(block=2)",
        "drop_block(block=1)",
        "drop_layer(block=1)",
    ]  # ever smaller steps
    assert out.final.node == 0 and selections(study) == {}
    assert out.stop_reason.startswith(
        "no step of at least --min-step 0.07 of the parent stays within --max-drop 2"
    )
    assert "12.5%" in out.stop_reason
    # A resumed run recomputes the controller from the study: it stops at once, training nothing.
    again = Search(
        smoke_config(tmp_path, teacher_cache=False, max_drop=2.0, min_step=0.07, max_generations=3),
        progress=False,
    ).run()
    assert (
        again.stop_reason == out.stop_reason
        and len(open_study(f"sqlite:///{tmp_path}/study.db", "smoke").trials) == 4
    )


def test_a_move_that_removes_less_than_min_step_is_not_proposed(tmp_path, monkeypatch):
    fake_training(monkeypatch, lambda share: 10.0)
    out, study = search(tmp_path, max_drop=2.0, min_step=0.1, max_generations=3)
    # drop_layer(block=1) removes 8.7 % of the root: the third attempt has nothing left to propose.
    assert [n.operator for n in nodes(study) if n.generation] == [
        "drop_layer(block=2)",
        "drop_block(block=1)",
    ]
    assert "no smaller step of at least --min-step 0.1 left to try" in out.stop_reason


def test_time_budget_stops_between_generations(tmp_path, monkeypatch):
    fake_training(monkeypatch, lambda share: 0.0)
    clock = iter(range(0, 10_000, 100))  # each reading of the clock: 100 s later
    monkeypatch.setattr("iterkd.search.time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    out, study = search(tmp_path, time_budget=150, max_generations=5)
    assert out.stop_reason == "used the --time-budget of 150 s (200 s) before generation 2"
    assert out.final.generation == 1 and max(n.generation for n in nodes(study)) == 1


@pytest.mark.parametrize(
    "variant, k",
    [("parent-child", 1), ("parent-children", 2), ("ancestors-child", 1), ("ancestors-children", 2)],
)
def test_every_variant_backs_off_from_the_same_parents_and_teachers(tmp_path, monkeypatch, variant, k):
    fake_training(monkeypatch, overshoot_below(0.7))
    out, study = search(tmp_path, variant=variant, children=k, max_drop=2.0, max_generations=2)
    gen1 = [n for n in nodes(study) if n.generation == 1]
    rejected, retried = gen1[:k], gen1[k:]
    assert len(retried) == k and all(not n.key.endswith("|r1") for n in rejected)
    assert all(n.key.endswith("|r1") and n.parents == (0,) and n.teachers == (0,) for n in retried)
    assert min(n.spec.params() for n in retried) > max(n.spec.params() for n in rejected)
    status = lineage_frame(study).set_index("node").status
    assert all(status[n.node] == "rejected" for n in rejected)
    assert selections(study)[1][0] in {n.node for n in retried}
    assert [(r["generation"], r["round"], r["outcome"]) for r in study.user_attrs["steps"]][:2] == [
        (1, 0, "backed-off"),
        (1, 1, "accepted"),
    ]


def test_the_controller_replays_recorded_attempts():
    steps = StepController(start=0.5, smallest=0.05, largest=0.5, max_drop=1.0)
    records = [
        {
            "generation": 1,
            "round": 0,
            "step": 0.5,
            "outcome": "backed-off",
            "drop": 3.0,
            "parents": [0],
            "nodes": [1],
        },
        {
            "generation": 1,
            "round": 1,
            "step": 0.25,
            "outcome": "accepted",
            "drop": 0.9,
            "parents": [0],
            "nodes": [2],
        },
    ]
    # Generation 1's acceptance has no selection yet (a kill came between the two): it is decided again.
    again = steps.next_round(records, 1, [0])
    assert (again.number, again.step, again.overshot, again.target) == (1, 0.25, (1,), 0.75)
    nxt = steps.next_round(records, 2, [2])
    assert (nxt.number, nxt.step, nxt.overshot) == (0, 0.25, ())  # 0.9 > half the budget: no growth
    assert steps.next_round(records, 1, [5]).number == 0  # `iterkd select` chose other parents: a fresh start


@pytest.mark.parametrize(
    "flags, needle",
    [
        (dict(min_step=0.3, max_step=0.2), "--min-step 0.3 is larger than --max-step 0.2; lower --min-step"),
        (
            dict(min_step=1.0),
            "--min-step and --max-step are fractions of the parent's size a child removes",
        ),
        (dict(min_step=0.0), "--min-step must be a number in (0, 1]"),
        (dict(time_budget=-1.0), "--time-budget must be a finite number >= 0"),
    ],
)
def test_step_settings_out_of_range_are_one_line_errors(tmp_path, flags, needle):
    from iterkd.errors import IterkdError

    with pytest.raises(IterkdError) as e:
        smoke_config(tmp_path, **flags)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_recording_an_attempt_replaces_it_and_forgets_the_attempts_after_it():
    import optuna

    from iterkd.search import record_step, step_records

    study = optuna.create_study()

    def rec(generation, round_, outcome="accepted"):
        return {
            "generation": generation,
            "round": round_,
            "step": 0.5,
            "outcome": outcome,
            "drop": 0.0,
            "parents": [0],
            "nodes": [],
        }

    for r in (rec(1, 0, "backed-off"), rec(1, 1), rec(2, 0)):
        record_step(study, r)
    record_step(study, rec(1, 1))  # decided again (a resumed run, or after `iterkd select`)
    assert [(r["generation"], r["round"]) for r in step_records(study)] == [(1, 0), (1, 1)]


@pytest.mark.parametrize("point", ["between-generations", "selection", "retry-training"])
def test_a_run_interrupted_around_a_back_off_resumes_to_the_uninterrupted_lineage(
    tmp_path, monkeypatch, point
):
    from tests.conftest import lineage_shape

    fake_training(monkeypatch, overshoot_below(0.7))
    _, reference = search(tmp_path / "reference", max_drop=2.0, max_generations=2)

    real_point = search_mod.fault_point
    fake_training(monkeypatch, overshoot_below(0.7))  # a fresh root size for the second run
    fresh_train = trainer_mod.train
    interrupted = {"done": False}

    def interrupt_once():
        if not interrupted["done"]:
            interrupted["done"] = True
            raise KeyboardInterrupt

    def point_hook(name):
        # The first time it is reached: right after generation 1's back-off (between-generations), or
        # when the retry is accepted, its step recorded and its selection not yet (selection).
        if name == point and not interrupted["done"]:
            interrupt_once()
        real_point(name)

    def train_hook(model, data, settings, **kw):
        if point == "retry-training" and kw.get("desc", "").startswith("gen 1 drop_block(block=1)"):
            interrupt_once()
        return fresh_train(model, data, settings, **kw)

    monkeypatch.setattr("iterkd.search.fault_point", point_hook)
    monkeypatch.setattr(trainer_mod, "train", train_hook)
    cfg = smoke_config(tmp_path / "run", teacher_cache=False, max_drop=2.0, max_generations=2)
    with pytest.raises(KeyboardInterrupt):
        Search(cfg, progress=False).run()
    assert interrupted["done"]
    Search(cfg, progress=False).run()
    study = open_study(f"sqlite:///{tmp_path}/run/study.db", cfg.name)
    assert lineage_shape(study) == lineage_shape(reference)

    def decisions(study):  # trial numbers differ: the interrupted trial took one
        return [
            (r["generation"], r["round"], r["step"], r["target"], r["outcome"], r["drop"])
            for r in study.user_attrs["steps"]
        ]

    assert decisions(study) == decisions(reference) and len(decisions(reference)) >= 3


@pytest.mark.parametrize(
    "space, first, retry",
    [
        ("vgg16_blocks", "drop_block(block=4)", "drop_layer(block=4)"),  # a layer instead of a block
        ("vgg16_widths", "shrink_widths(block=all, factor=0.75)", "shrink_widths(block=all, factor=0.875)"),
    ],
)
def test_the_shipped_vgg16_spaces_back_off_to_a_half_step(tmp_path, monkeypatch, space, first, retry):
    fake_training(monkeypatch, overshoot_below(0.7))
    search(tmp_path, space=space, max_drop=2.0, max_generations=1)
    study = open_study(f"sqlite:///{tmp_path}/study.db", "smoke")
    root, overshot, backed_off = (n.spec.params() for n in nodes(study))
    assert [n.operator for n in nodes(study)][1:] == [first, retry]
    removed_first, removed_retry = 1 - overshot / root, 1 - backed_off / root
    # The first step aims at removing half; the retry at a quarter, and gets within 10 points of it.
    assert removed_retry < removed_first and abs(removed_retry - 0.25) < 0.1


def test_max_step_below_the_space_s_step_caps_the_first_step_too(tmp_path, monkeypatch):
    fake_training(monkeypatch, lambda share: 0.0)
    out, study = search(tmp_path, max_drop=4.0, max_step=0.2, max_generations=1)
    assert [r["step"] for r in study.user_attrs["steps"]] == [0.2]
    child = next(n for n in nodes(study) if n.generation == 1)
    assert child.operator == "drop_block(block=1)"  # keeps 0.774 of the root: the closest to 0.8 (0.5: 0.66)
