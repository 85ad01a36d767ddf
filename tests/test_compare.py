"""iterkd compare: baselines retrained on the run's final architecture, resume from compare.json, errors."""

import contextlib
import io
import json
import shutil
import statistics

import pytest

from iterkd import compare
from iterkd.cli import main
from iterkd.errors import IterkdError
from iterkd.storage import open_study
from iterkd.trainer import train_settings

ARGS = ["--seeds", "2", "--epochs", "1", "--no-progress"]


def copy_run(smoke_run, dest):
    """A private copy of the shared smoke run, so compare's files and study edits stay out of it."""
    cfg, _ = smoke_run
    shutil.copytree(cfg.run_dir, dest)
    return dest


def compare_counting(run_dir, *argv):
    """(exit code, stdout, train() calls) of `iterkd compare run_dir argv`; the calls still train."""
    calls, real = [], compare.train

    def counting(model, data, settings, **kw):
        calls.append((model.spec, settings, kw))
        return real(model, data, settings, **kw)

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(compare, "train", counting)
        code = main(["compare", str(run_dir), *argv])
    return code, out.getvalue(), calls


def md_rows(path):
    """The compare.md table as {method: [cells]}."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")][
        1:
    ]  # without the header
    return {
        cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split(" | ")] for line in lines)
    }


@pytest.fixture(scope="module")
def compared(smoke_run, tmp_path_factory):
    run_dir = copy_run(smoke_run, tmp_path_factory.mktemp("compare") / "run")
    return (run_dir, *compare_counting(run_dir, *ARGS))


def test_compare_writes_both_methods_for_each_seed_beside_the_run(smoke_run, compared):
    _, out = smoke_run
    run_dir, code, stdout, _ = compared
    root, final = out.root, out.final
    assert code == 0
    results = json.loads((run_dir / "compare.json").read_text())["results"]
    assert sorted((r["method"], r["seed"]) for r in results) == [
        ("one-shot-kd", 0),
        ("one-shot-kd", 1),
        ("scratch-ce", 0),
        ("scratch-ce", 1),
    ]
    for r in results:
        assert r["epochs"] == 1 and r["node"] == final.node and r["params"] == final.spec.params()
        assert 0 <= r["val_acc"] <= 100 and 0 <= r["test_acc"] <= 100 and r["seconds"] > 0

    rows = md_rows(run_dir / "compare.md")
    assert list(rows) == [
        f"root (node {root.node})",
        "scratch-ce",
        "one-shot-kd",
        f"iterkd (this run, node {final.node})",
    ]
    for method in compare.METHODS:
        mine = [r for r in results if r["method"] == method]
        val, test = [r["val_acc"] for r in mine], [r["test_acc"] for r in mine]
        assert rows[method][:3] == [f"{final.spec.params():,}", "1", "2"]
        assert rows[method][3] == f"{statistics.fmean(val):.2f} ± {statistics.stdev(val):.2f}"
        assert rows[method][4] == f"{statistics.fmean(test):.2f} ± {statistics.stdev(test):.2f}"
    iterkd_row = rows[f"iterkd (this run, node {final.node})"]
    assert iterkd_row[:5] == [
        f"{final.spec.params():,}",
        str(final.epochs),
        "1",
        f"{final.val_acc:.2f} ± –",
        f"{final.test_acc:.2f} ± –",
    ]
    assert rows[f"root (node {root.node})"][0] == f"{root.spec.params():,}"
    assert "Not like for like" in (run_dir / "compare.md").read_text()  # 1 epoch here, 4 in the run
    assert "scratch-ce" in stdout and "one-shot-kd" in stdout and "4 models trained now" in stdout


def test_baselines_train_the_final_architecture_with_a_childs_settings(smoke_run, compared):
    cfg, out = smoke_run
    *_, calls = compared
    assert len(calls) == 4
    for seed in (0, 1):
        assert sum(settings == train_settings(cfg, 1, seed, child=True) for _, settings, _ in calls) == 2
    for spec, _, kw in calls:
        assert spec == out.final.spec
        if kw["desc"].startswith("one-shot-kd"):
            (teacher,) = kw["teachers"]
            assert teacher.spec == out.root.spec and kw["hint_teacher"] is teacher
        else:
            assert (
                kw["desc"].startswith("scratch-ce")
                and not kw.get("teachers")
                and kw.get("hint_teacher") is None
            )


def test_rerun_trains_nothing_new_and_retrains_only_a_missing_entry(compared, tmp_path):
    run_dir = shutil.copytree(compared[0], tmp_path / "run")
    before = json.loads((run_dir / "compare.json").read_text())
    code, stdout, calls = compare_counting(run_dir, *ARGS)
    assert code == 0 and calls == [] and "0 models trained now" in stdout
    assert json.loads((run_dir / "compare.json").read_text()) == before

    dropped = before["results"].pop(2)  # as if interrupted before that model was saved
    (run_dir / "compare.json").write_text(json.dumps(before))
    code, _, calls = compare_counting(run_dir, *ARGS)
    assert code == 0 and len(calls) == 1
    assert calls[0][1].seed == dropped["seed"] and calls[0][2]["desc"].startswith(dropped["method"])
    results = json.loads((run_dir / "compare.json").read_text())["results"]
    assert sorted((r["method"], r["seed"]) for r in results) == sorted(
        (r["method"], r["seed"]) for r in before["results"] + [dropped]
    )


@pytest.mark.parametrize("final_node", [None, "root"])
def test_a_run_without_an_accepted_child_is_a_one_line_error(smoke_run, tmp_path, capsys, final_node):
    """None: a search interrupted in generation 1; root: one whose first child was already over budget."""
    cfg, out = smoke_run
    run_dir = copy_run(smoke_run, tmp_path / "run")
    study = open_study(f"sqlite:///{run_dir}/study.db", cfg.name, create=False)
    study.set_user_attr("selections", {})
    study.set_user_attr("final_node", out.root.node if final_node == "root" else None)
    code = main(["compare", str(run_dir), *ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("iterkd: error: ")
    assert "no accepted child yet" in err[0] and f"iterkd search --run-dir {run_dir}" in err[0]
    assert not (run_dir / "compare.json").exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--preset", "huge"], "unknown preset"),
    ],
)
def test_bad_compare_flags_are_one_line_errors(compared, capsys, argv, needle):
    code = main(["compare", str(compared[0]), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0]


def test_missing_run_directory_is_a_one_line_error(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_epochs_come_from_the_flag_then_the_preset_then_the_run():
    assert compare.compare_epochs(8) == 8
    assert compare.compare_epochs(8, preset="full") == 30
    assert compare.compare_epochs(8, epochs=2, preset="full") == 2
    with pytest.raises(IterkdError, match="unknown preset"):
        compare.compare_epochs(8, preset="huge")


def test_mean_std_is_the_sample_std_with_a_dash_for_one_value():
    assert compare.mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"  # ddof=0 would give 0.82
    assert compare.mean_std([5.0]) == "5.00 ± –"
    assert compare.mean_std([]) == "–"
