"""iterkd compare: the baselines (equal epochs, chain and paid compute, Torch-Pruning), search seeds, the verdict,
resuming an interrupted compare (killed at a named fault point), and errors."""

import contextlib
import io
import json
import os
import runpy
import shutil
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from safetensors.torch import load_file

from iterkd import compare, run_search
from iterkd.arch import VGGSpec, vgg_spec
from iterkd.cli import main
from iterkd.errors import IterkdError
from iterkd.inherit import inherit_weights
from iterkd.lineage import node_attrs
from iterkd.models import VGG
from iterkd.report import write_report
from iterkd.run import open_run
from iterkd.storage import open_study
from iterkd.trainer import train_settings
from tests.conftest import smoke_config

ARGS = ["--seeds", "2", "--no-progress"]
PRUNE = "prune-kd, chain compute"
PAID_KD, PAID_INHERITED = "one-shot-kd, paid compute", "inherited one-shot-kd, paid compute"
# the baselines, in order
ROWS = ["scratch-ce", "one-shot-kd", "one-shot-kd, chain compute", PRUNE, PAID_KD, PAID_INHERITED]


@pytest.fixture(scope="module")
def cheap_run(tmp_path_factory):
    """A finished smoke search whose root and children train one epoch each: chain root → 1 → 2,
    so the chain- and paid-compute rows train 2 epochs and the equal-epochs rows 1."""
    run_dir = tmp_path_factory.mktemp("cheap_run") / "run"
    cfg = smoke_config(run_dir, name="run", epochs=1, root_epochs=1)
    return cfg, run_search(cfg, progress=False)


def copy_run(cheap_run, dest, *, results: bool = False):
    """A private copy of the shared run (with the first compare's results when `results`)."""
    cfg, _ = cheap_run
    shutil.copytree(cfg.run_dir, dest, ignore=None if results else shutil.ignore_patterns("compare*"))
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
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")][1:]  # no header
    return {
        cells[0]: cells[1:]
        for cells in ([c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")] for line in lines)
    }


@pytest.fixture(scope="module")
def compared(cheap_run, tmp_path_factory):
    run_dir = copy_run(cheap_run, tmp_path_factory.mktemp("compare") / "run")
    return (run_dir, *compare_counting(run_dir, *ARGS))


def test_compare_writes_every_row_for_each_seed_beside_the_run(cheap_run, compared):
    cfg, out = cheap_run
    run_dir, code, stdout, _ = compared
    root, final = out.root, out.final
    assert code == 0 and "12 models trained now" in stdout
    results = json.loads((run_dir / "compare.json").read_text())["results"]
    methods = [("scratch-ce", 1), ("one-shot-kd", 1), ("one-shot-kd", 2), ("prune-kd", 2),
               ("one-shot-kd-live", 2), ("inherit-kd-live", 2)]  # fmt: skip
    assert sorted((r["method"], r["epochs"], r["seed"]) for r in results) == sorted(
        (m, e, s) for m, e in methods for s in (0, 1)
    )
    rows = md_rows(run_dir / "compare.md")
    chain_label = f"iterkd (node {final.node})"
    assert list(rows) == [f"root (node {root.node})", *ROWS, chain_label]
    chain = rows[chain_label]
    path = compare.chain_path(open_run(run_dir), final)
    chain_flops = sum(3 * n.spec.flops() * 1600 * n.epochs for n in path[1:])
    # 1 + 1 epochs after the root; 1,600 training images each; forward + backward of each node
    assert chain[2:6] == ["2", "3,200", compare.flops_cell([chain_flops]), "1"]
    assert chain[7] == f"{final.test_acc:.2f} ± –"

    for label, (method, epochs) in zip(
        [r for r in ROWS if r != PRUNE], [m for m in methods if m[0] != "prune-kd"]
    ):
        mine = [r for r in results if (r["method"], r["epochs"]) == (method, epochs)]
        test = [r["test_acc"] for r in mine]
        assert rows[label][:6] == [
            f"{final.spec.params():,}",
            f"{final.spec.flops() / 1e6:.2f}",
            str(epochs),
            f"{1600 * epochs:,}",
            compare.flops_cell([3.0 * final.spec.flops() * 1600 * epochs]),
            "2",
        ]
        assert rows[label][7] == f"{statistics.fmean(test):.2f} ± {statistics.stdev(test):.2f}"
        # Δ against the one search: the baseline's standard error alone, marked as missing the chain's.
        se = statistics.stdev(test) / 2**0.5
        assert rows[label][8] == f"{statistics.fmean(test) - final.test_acc:+.2f} ± {se:.2f}†"

    pruned = [r for r in results if r["method"] == "prune-kd"]
    spec = VGGSpec.from_json(pruned[0]["spec"])
    assert (
        len(spec.blocks) == len(root.spec.blocks) and spec.convs == root.spec.convs
    )  # narrower, not shallower
    assert abs(spec.params() - final.spec.params()) <= 0.02 * final.spec.params()
    assert rows[PRUNE][:4] == [f"{spec.params():,}", f"{spec.flops() / 1e6:.2f}", "2", "3,200"]

    md = (run_dir / "compare.md").read_text()
    verdict = next(
        line for line in md.splitlines() if line.startswith("**Verdict at paid compute** (2 epochs")
    )
    # Here the search paid the chain's epochs alone, so every 2-epoch row competes, in one verdict.
    equal = {label: rows[label] for label in (*ROWS[2:], chain_label)}
    winner = max(equal, key=lambda k: float(equal[k][7].split(" ± ")[0]))
    assert f"**`{winner}` won**" in verdict and "3,200 training images per model" in verdict
    assert "Verdict at chain compute" not in md and "one verdict covers both" in md
    assert "Not like for like" not in md  # the run's children trained 1 epoch, like these baselines


def test_every_baseline_trains_with_the_runs_settings_and_the_root_as_teacher(cheap_run, compared):
    cfg, out = cheap_run
    *_, calls = compared
    chain = compare.chain_path(open_run(cfg.run_dir), out.final)[1:]
    for spec, settings, kw in calls:
        # greedy sampler: the final node's loss settings are the run's, so KD rows train as a child does
        expected = train_settings(cfg, settings.epochs, settings.seed, child=True)
        if kw["desc"].startswith(("one-shot-kd-live", "inherit-kd-live")):
            # paid compute: a fresh augmentation view every epoch, drawn from the model's seed
            expected = replace(expected, views=None, augment_seed=None)
        assert settings == expected
        if kw["desc"].startswith("scratch-ce"):
            assert spec == out.final.spec and not kw.get("teachers") and kw.get("hint_teacher") is None
        else:
            (teacher,) = kw["teachers"]
            assert teacher.spec == out.root.spec and kw["hint_teacher"] is teacher
    for seed in (0, 1):
        prune_calls = [(s, st) for s, st, kw in calls if kw["desc"].startswith(f"prune-kd seed {seed}")]
        # One pruning step per size change of the chain, to that node's size, for that node's epochs.
        assert [st.epochs for _, st in prune_calls] == [n.epochs for n in chain]
        for (spec, _), n in zip(prune_calls, chain):
            assert abs(spec.params() - n.spec.params()) <= 0.02 * n.spec.params()
        kd_long = [st for s, st, kw in calls if kw["desc"] == f"one-shot-kd seed {seed}" and st.epochs == 2]
        assert len(kd_long) == 1  # equal compute: the chain's 1 + 1 epochs in one training


def test_without_torch_pruning_one_line_names_the_install_and_the_other_rows_come(cheap_run, tmp_path):
    run_dir = copy_run(cheap_run, tmp_path / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torch_pruning", None)  # `import torch_pruning` raises ImportError
        code, stdout, calls = compare_counting(run_dir, "--seeds", "1", "--no-progress")
    assert code == 0 and len(calls) == 5  # every baseline but prune-kd
    said = [line for line in stdout.splitlines() if "Torch-Pruning" in line]
    assert said == [f"compare: the prune-kd row needs Torch-Pruning; to add it: {compare.PRUNE_INSTALL}"]
    rows = md_rows(run_dir / "compare.md")
    assert [label for label in rows if label in ROWS] == [r for r in ROWS if r != PRUNE]
    assert "prune-kd was not run: Torch-Pruning is not installed" in (run_dir / "compare.md").read_text()


def test_rows_trains_and_shows_only_the_named_baselines(cheap_run, tmp_path):
    """`--rows scratch`: the labels-only row alone (what a user runs when the other rows cost hours),
    no verdict claimed without its compute's rows; a later full compare reuses that model."""
    run_dir = copy_run(cheap_run, tmp_path / "run")
    code, stdout, calls = compare_counting(run_dir, "--seeds", "1", "--rows", "scratch", "--no-progress")
    assert code == 0 and len(calls) == 1 and calls[0][2].get("teachers") is None  # labels only
    rows = md_rows(run_dir / "compare.md")
    assert [label for label in rows if label in ROWS] == ["scratch-ce"]
    text = (run_dir / "compare.md").read_text()
    assert "No verdict at paid compute" in text and "won" not in text
    assert "rows not run (--rows): kd, kd-chain, prune, kd-paid, inherit-paid" in text
    results = json.loads((run_dir / "compare.json").read_text())["results"]
    assert [r["method"] for r in results] == ["scratch-ce"]
    code, stdout, calls = compare_counting(run_dir, "--seeds", "1", "--rows", "kd,scratch", "--no-progress")
    assert code == 0 and len(calls) == 1 and calls[0][2]["teachers"]  # one-shot KD; scratch-ce reused
    assert [label for label in md_rows(run_dir / "compare.md") if label in ROWS] == [
        "scratch-ce",
        "one-shot-kd",
    ]
    assert "Not like for like" not in (run_dir / "compare.md").read_text()
    code, _, calls = compare_counting(
        run_dir, "--seeds", "1", "--rows", "scratch", "--epochs", "2", "--no-progress"
    )
    assert code == 0 and len(calls) == 1 and calls[0][1].epochs == 2
    assert (
        "the equal-epochs baselines trained 2 epochs, the run's children 1 epoch each"
        in (run_dir / "compare.md").read_text()
    )


def test_search_seeds_rerun_the_search_so_the_chain_row_has_a_spread(cheap_run, compared, tmp_path):
    cfg, out = cheap_run
    run_dir = copy_run(cheap_run, tmp_path / "run", results=False)
    shutil.copy(compared[0] / "compare.json", run_dir / "compare.json")  # the baselines are done
    code, stdout, calls = compare_counting(run_dir, *ARGS, "--search-seeds", "2")
    assert code == 0 and calls == [] and "1 models trained now" in stdout  # one search, no baseline
    rerun = open_run(run_dir / "compare" / "search-seed-1")
    assert rerun.cfg.seed == cfg.seed + 1 and rerun.cfg.storage is None
    # Only the search's randomness differs: the rerun keeps the run's validation split and its root.
    assert rerun.cfg.split_seed == cfg.seed
    assert torch.equal(rerun.cfg.load_data().val_y, cfg.load_data().val_y)
    mine, theirs = open_run(run_dir).root, rerun.root
    assert theirs.val_acc == mine.val_acc and theirs.spec == mine.spec
    a, b = (load_file(d / n.checkpoint) for d, n in ((rerun.run_dir, theirs), (run_dir, mine)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same weights
    other = compare.final_node(rerun)
    rows = md_rows(run_dir / "compare.md")
    chain = rows[f"iterkd (node {out.final.node}, 2 searches)"]
    tests = [out.final.test_acc, other.test_acc]
    assert chain[5] == "2" and chain[7] == f"{statistics.fmean(tests):.2f} ± {statistics.stdev(tests):.2f}"
    assert not any(cells[8].endswith("†") for cells in rows.values())  # the chain's spread is in every Δ
    assert "A rerun keeps the run's root and validation split" in (run_dir / "compare.md").read_text()

    code, stdout, _ = compare_counting(run_dir, *ARGS, "--search-seeds", "2")
    assert code == 0 and "0 models trained now" in stdout  # the finished rerun is read, not trained

    # A rerun that ends at another architecture (here: its first child, chosen with `iterkd select`)
    # is named in the table, which says its row mixes architectures.
    smaller = next(n for n in rerun.nodes.values() if n.generation == 1 and n.ok and n.spec != other.spec)
    assert main(["select", str(rerun.run_dir), "--node", str(smaller.node)]) == 0
    code, stdout, _ = compare_counting(run_dir, *ARGS, "--search-seeds", "2")
    md = (run_dir / "compare.md").read_text()
    assert code == 0 and f"iterkd (node {out.final.node}, 2 searches, 2 architectures)" in md_rows(
        run_dir / "compare.md"
    )
    assert (
        f"the search with seed {cfg.seed + 1} ended at another architecture, {smaller.spec.summary()}" in md
    )


def _compare_until(run_dir, fault: str, *argv) -> subprocess.CompletedProcess:
    """`iterkd compare` on run_dir in a process that kills itself at the fault point POINT:N."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ITERKD_FAULT": fault}
    return subprocess.run(
        [sys.executable, "-m", "iterkd", "compare", str(run_dir), *argv, "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_a_compare_killed_mid_training_resumes_without_retraining_what_it_saved(cheap_run, tmp_path):
    run_dir = copy_run(cheap_run, tmp_path / "run")
    # seed 0 trains the paid-compute rows first: one-shot-kd-live (2 epochs), then inherit-kd-live
    # (2), killed in its first epoch
    proc = _compare_until(run_dir, "mid-epoch:3", "--seeds", "1")
    assert proc.returncode == -9, proc.stdout[-500:] + proc.stderr[-500:]
    saved = json.loads((run_dir / "compare.json").read_text())["results"]
    assert [(r["method"], r["epochs"]) for r in saved] == [("one-shot-kd-live", 2)]

    code, stdout, calls = compare_counting(run_dir, "--seeds", "1", "--no-progress")
    assert code == 0 and "reusing 1 results" in stdout
    assert [kw["desc"] for _, _, kw in calls] == [
        "inherit-kd-live seed 0",
        "scratch-ce seed 0",
        "one-shot-kd seed 0",
        "one-shot-kd seed 0",
        "prune-kd seed 0 step 1",
        "prune-kd seed 0 step 2",
    ]
    results = json.loads((run_dir / "compare.json").read_text())["results"]
    assert results[:1] == saved  # what was finished is kept as it was


def test_a_compare_killed_inside_a_search_rerun_resumes_that_search(cheap_run, compared, tmp_path):
    run_dir = copy_run(cheap_run, tmp_path / "run")
    shutil.copy(compared[0] / "compare.json", run_dir / "compare.json")
    # The rerun takes the run's root (trial 0), then creates its first child's trial: killed there.
    proc = _compare_until(run_dir, "trial-created:2", *ARGS, "--search-seeds", "2")
    assert proc.returncode == -9, proc.stdout[-500:] + proc.stderr[-500:]
    rerun_dir = run_dir / "compare" / "search-seed-1"
    root_ckpt = rerun_dir / "checkpoints" / "node-0.safetensors"
    before = (root_ckpt.read_bytes(), root_ckpt.stat().st_mtime_ns)

    code, stdout, calls = compare_counting(run_dir, *ARGS, "--search-seeds", "2")
    assert code == 0 and calls == [] and "1 models trained now" in stdout
    assert (root_ckpt.read_bytes(), root_ckpt.stat().st_mtime_ns) == before  # its root was not retrained
    rerun = open_run(rerun_dir)
    assert "final_node" in rerun.study.user_attrs and compare.final_node(rerun).generation == 2
    assert "2 searches" in (run_dir / "compare.md").read_text()


def test_rerun_trains_nothing_new_and_retrains_only_a_missing_entry(compared, tmp_path):
    run_dir = shutil.copytree(compared[0], tmp_path / "run")
    before = json.loads((run_dir / "compare.json").read_text())
    code, stdout, calls = compare_counting(run_dir, *ARGS)
    assert code == 0 and calls == [] and "0 models trained now" in stdout
    assert json.loads((run_dir / "compare.json").read_text())["results"] == before["results"]

    dropped = before["results"].pop(2)  # as if interrupted before that model was saved
    (run_dir / "compare.json").write_text(json.dumps(before))
    code, _, calls = compare_counting(run_dir, *ARGS)
    assert code == 0 and len(calls) == 1
    assert calls[0][1].seed == dropped["seed"] and calls[0][2]["desc"].startswith(dropped["method"])
    results = json.loads((run_dir / "compare.json").read_text())["results"]
    assert sorted((r["method"], r["epochs"], r["seed"]) for r in results) == sorted(
        (r["method"], r["epochs"], r["seed"]) for r in before["results"] + [dropped]
    )


def test_the_runs_report_shows_the_comparison_and_its_verdict(compared, tmp_path):
    run_dir = shutil.copytree(compared[0], tmp_path / "run")
    write_report(run_dir)
    report = (run_dir / "report.md").read_text()
    verdict = next(line for line in (run_dir / "compare.md").read_text().splitlines() if "Verdict" in line)
    assert "## Against the alternatives (`iterkd compare`)" in report and verdict in report


@pytest.mark.parametrize("final_node", [None, "root"])
def test_a_run_without_an_accepted_child_is_a_one_line_error(cheap_run, tmp_path, capsys, final_node):
    """None: a search interrupted in generation 1; root: one whose first child was already over budget."""
    cfg, out = cheap_run
    run_dir = copy_run(cheap_run, tmp_path / "run")
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
        (["--search-seeds", "0"], "--search-seeds must be at least 1"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--preset", "huge"], "unknown preset"),
        (["--rows", "scratch,nope"], "--rows: unknown row 'nope'; choose from scratch, kd, kd-chain"),
        (["--rows", ","], "--rows: unknown row ','"),
    ],
)
def test_bad_compare_flags_are_one_line_errors(compared, capsys, argv, needle):
    code = main(["compare", str(compared[0]), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0]


def test_missing_run_directory_is_a_one_line_error(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- scripts/kd_ceiling.py: one architecture, one-shot KD from the run's root -------------------------


CEILING = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "kd_ceiling.py"))


def test_kd_ceiling_trains_the_given_architecture_from_the_runs_root_and_leaves_the_run_alone(
    cheap_run, tmp_path, capsys
):
    run_dir = copy_run(cheap_run, tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    final = compare.final_node(open_run(run_dir))
    blocks = [[max(1, w // 2) for w in b] for b in final.spec.blocks]  # half the final node's widths
    calls, real = [], compare.train

    def counting(model, data, settings, **kw):
        calls.append((model.spec, settings.epochs, kw.get("teachers")))
        return real(model, data, settings, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compare, "train", counting)
        code = CEILING["main"](
            [str(run_dir), "--blocks", json.dumps(blocks), "--epochs", "2", "--no-progress"]
        )
    out = json.loads(capsys.readouterr().out)
    spec = replace(final.spec, blocks=tuple(tuple(b) for b in blocks))
    assert code == 0 and len(calls) == 1
    trained, epochs, teachers = calls[0]
    assert trained == spec and epochs == 2 and teachers and len(teachers) == 1  # KD from the root
    assert out["params"] == spec.params() and out["blocks"] == blocks and out["epochs"] == 2
    assert out["drop"] == pytest.approx(out["root_val"] - out["val"], abs=0.011)
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # nothing written to the run


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--blocks", "[[8,8]", "--epochs", "1"], "--blocks must be JSON"),
        (["--blocks", "[8,8]", "--epochs", "1"], "list of lists"),
        (["--blocks", "[[0]]", "--epochs", "1"], "invalid VGG spec"),
        (["--blocks", "[[4]]", "--epochs", "0"], "--epochs must be at least 1"),
        (["--blocks", "[[4]]", "--epochs", "1", "--train-subset", "some"], "--train-subset must be"),
    ],
)
def test_kd_ceiling_bad_input_is_one_line_and_trains_nothing(cheap_run, capsys, argv, needle):
    assert CEILING["main"]([str(cheap_run[0].run_dir), *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kd_ceiling: error:") and needle in err[0]


# -- the pieces, without training -------------------------------------------------------------------


def test_pruned_specs_reach_the_target_within_2_percent_and_keep_every_conv():
    root = vgg_spec("vgg16", 1 / 4)
    for fraction in (0.5, 0.2, 0.1, 0.03):
        target = int(root.params() * fraction)
        spec = compare.pruned_spec(root, target)
        assert abs(spec.params() - target) <= 0.02 * target
        assert spec.convs == root.convs and all(
            w <= r for w, r in zip(*(sum(s.blocks, ()) for s in (spec, root)))
        )


def test_pruning_drops_the_filters_of_smallest_l1_norm_and_matches_its_spec():
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    spec = VGGSpec(((8, 8), (16,)), num_classes=10, input_size=16)
    model = VGG(spec)
    conv0 = model.blocks[0][0]
    with torch.no_grad():
        conv0.weight[[1, 4, 6]] *= 1e-3  # the three weakest filters of the first conv
    kept_weights = conv0.weight[[0, 2, 3, 5, 7]].clone()
    narrower = VGGSpec(((5, 8), (16,)), num_classes=10, input_size=16)
    pruned = compare.prune_to(model, narrower)
    assert pruned.spec == narrower
    assert sum(p.numel() for p in pruned.parameters()) == narrower.params()
    assert torch.equal(pruned.blocks[0][0].weight, kept_weights)  # the others, in their order
    assert pruned(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


def test_prune_steps_follow_the_chain_and_a_polish_adds_to_the_last_step(cheap_run):
    cfg, out = cheap_run
    run = open_run(cfg.run_dir)
    path = compare.chain_path(run, out.final)
    assert path[0] == out.root and path[-1] == out.final and len(path) == 3
    assert compare.prune_steps(path) == [(n.spec.params(), n.epochs) for n in path[1:]]
    polish = replace(out.final, node=99, parents=(out.final.node,), epochs=3, epochs_trained=3)  # same size
    steps = compare.prune_steps([*path, polish])
    assert steps[-1] == (out.final.spec.params(), out.final.epochs + 3) and len(steps) == len(path) - 1
    assert compare.chain_epochs([*path, polish]) == sum(n.epochs for n in path[1:]) + 3
    stopped = replace(path[-1], epochs_trained=path[-1].epochs - 1)  # a pruner stopped it an epoch early
    assert compare.chain_epochs([*path[:-1], stopped]) == sum(n.epochs for n in path[1:]) - 1


def test_the_searchs_paid_compute_counts_rejected_siblings_and_the_chain_does_not(tmp_path):
    cfg = smoke_config(
        tmp_path / "run", variant="parent-children", children=2, epochs=1, root_epochs=1, max_generations=1
    )
    out = run_search(cfg, progress=False)
    run = open_run(cfg.run_dir)
    children = [n for n in run.nodes.values() if n.generation == 1 and n.ok]
    assert len(children) == 2 and run.status(children[0]) != run.status(children[1])  # one was rejected
    assert compare.chain_epochs(compare.chain_path(run, out.final)) == 1
    assert compare.search_compute(run) == (2, pytest.approx(sum(n.seconds for n in children)))
    row = compare.chain_row([run], 1600)
    assert row.epochs == [1] and row.paid_epochs == [2] and row.cells(1600)[11] == "2"


def test_paid_compute_counts_every_node_trained_and_its_rows_train_that_long(cheap_run, tmp_path):
    """A study built by hand around the cheap run's chain root → 1 → 2: a rejected sibling of node 2
    (3 epochs), a sibling a pruner stopped after 2 of its 4 epochs, and a 3-epoch polish of node 2
    that is the final node. The search paid 1 + 1 + 3 + 2 + 3 = 10 child epochs; the chain 5."""
    cfg, out = cheap_run
    run_dir = copy_run(cheap_run, tmp_path / "run")
    study = open_study(f"sqlite:///{run_dir}/study.db", cfg.name, create=False)
    one, two = open_run(run_dir).nodes[1], out.final
    narrower = replace(two.spec, blocks=(*two.spec.blocks[:-1], (max(1, two.spec.blocks[-1][0] // 2),)))

    def add(parents, operator, spec, epochs, *, state=optuna.trial.TrialState.COMPLETE, **done):
        attrs = node_attrs(
            generation=len(parents) and 2 + (operator == "polish"),
            parents=parents,
            teachers=parents,
            operator=operator,
            spec=spec,
            key=f"{operator}-{parents}",
            epochs=epochs,
        )
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                value=done.get("val_acc"),
                user_attrs={**attrs, **done},
                distributions={},
                params={},
            )
        )
        return len(study.trials) - 1

    add([one.node], "rejected", narrower, 3, val_acc=1.0, test_acc=1.0, seconds=0.3, checkpoint="none")
    add(
        [one.node],
        "stopped",
        narrower,
        4,
        state=optuna.trial.TrialState.PRUNED,
        epochs_trained=2,
        seconds=0.2,
    )
    polish = add(
        [two.node], "polish", two.spec, 3,
        val_acc=two.val_acc, test_acc=two.test_acc, seconds=0.4, checkpoint=two.checkpoint, epochs_trained=3,
    )  # fmt: skip
    study.set_user_attr("final_node", polish)
    run = open_run(run_dir)
    assert (
        compare.search_compute(run)[0]
        == 10
        == sum(compare.trained_epochs(n) for n in compare.paid_nodes(run))
    )

    starts, real = {}, compare.train

    def recording(model, data, settings, **kw):
        starts.setdefault(kw["desc"], [p.detach().clone() for p in model.parameters()])
        return real(model, data, settings, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compare, "train", recording)
        code, _, calls = compare_counting(run_dir, "--seeds", "1", "--no-progress")
    assert code == 0
    trained = {kw["desc"]: st.epochs for _, st, kw in calls}
    assert trained["one-shot-kd-live seed 0"] == trained["inherit-kd-live seed 0"] == 10
    assert trained["one-shot-kd seed 0"] in (1, 5)  # one child's epochs, then the chain's (two calls)

    # The inherited row starts where the search's operator puts the root's weights; the other from scratch.
    root_model = run.model(out.root)
    expected = VGG(two.spec)
    inherit_weights(expected, root_model)
    first = next(p for p in expected.parameters())
    assert torch.equal(starts["inherit-kd-live seed 0"][0], first)
    assert not torch.equal(starts["one-shot-kd-live seed 0"][0], first)

    summary = json.loads((run_dir / "compare.json").read_text())
    assert summary["epochs"] == {"one child": 1, "chain compute": 5, "paid compute": 10}
    rows = {r["method"]: r for r in summary["rows"]}
    flops = 3 * two.spec.flops() * 1600
    for label in (PAID_KD, PAID_INHERITED):
        assert rows[label]["epochs"] == [10] and rows[label]["train_flops"] == [10 * flops]
        assert rows[label]["seconds"][0] > 0 and rows[label]["paid_epochs"] == [10]
    assert rows["one-shot-kd, chain compute"]["epochs"] == [5]
    chain = rows[f"iterkd (node {polish})"]
    assert chain["epochs"] == [5] and chain["paid_epochs"] == [10]
    paid = [(one.spec, 1), (two.spec, 1), (narrower, 3), (narrower, 2), (two.spec, 3)]
    assert chain["paid_train_flops"] == [pytest.approx(sum(3 * s.flops() * 1600 * e for s, e in paid))]
    assert chain["seconds"] == [pytest.approx(one.seconds + two.seconds + 0.4)]
    assert chain["paid_seconds"] == [pytest.approx(one.seconds + two.seconds + 0.3 + 0.2 + 0.4)]
    assert [v["basis"] for v in summary["verdicts"]] == ["paid compute", "chain compute"]

    md = (run_dir / "compare.md").read_text()
    table = md_rows(run_dir / "compare.md")
    assert table[PAID_KD][2:6] == ["10", "16,000", compare.flops_cell([10 * flops]), "1"]
    assert table[f"iterkd (node {polish})"][-3:-1] == ["10", compare.flops_cell(chain["paid_train_flops"])]
    assert "**Verdict at paid compute** (10 epochs" in md and "**Verdict at chain compute** (5 epochs" in md
    assert md.index("Verdict at paid compute") < md.index("Verdict at chain compute")  # the headline first


def test_the_difference_carries_the_welch_standard_error_of_the_sides_with_a_spread():
    diff, se = compare.difference([90.0, 92.0], [88.0, 88.0, 91.0])
    assert diff == pytest.approx(91.0 - 89.0)
    assert se == pytest.approx((2.0 / 2 + 3.0 / 3) ** 0.5)
    assert compare.difference([90.0], [89.0]) == (1.0, None)
    assert compare.delta_cell([90.0, 92.0], [88.0]) == f"+3.00 ± {(2.0 / 2) ** 0.5:.2f}†"


def _row(label, test, epochs):
    return compare.Row(label, 1000, 10**6, [epochs] * len(test), test, test, [1.0] * len(test))


@pytest.mark.parametrize(
    "kd, chain, clear",
    [([91.0, 91.2, 90.8], [88.0, 88.3, 87.9], True), ([89.0, 91.0, 88.0], [88.5, 90.5, 87.0], False)],
)
def test_the_verdict_names_the_winner_and_says_whether_the_lead_is_real(kd, chain, clear):
    plans = compare.baselines(1, 4, prune=False, paid=6)
    rows = [
        _row("root", [95.0], 5),
        _row("scratch-ce", [80.0, 81.0], 1),
        _row("one-shot-kd", [85.0, 85.5], 1),
    ]
    rows += [
        _row("one-shot-kd, chain compute", kd, 4),
        _row(PAID_KD, [95.0, 95.0], 6),
        _row(PAID_INHERITED, [94.0, 94.5], 6),
        _row("iterkd (node 3)", chain, 4),
    ]
    text = compare.verdict_text(rows, plans, 4, 1600, compare.CHAIN)
    assert text.startswith("**Verdict at chain compute** (4 epochs: the epochs of the chain")
    assert "**`one-shot-kd, chain compute` won**" in text and "6,400 training images per model" in text
    assert "scratch-ce" not in text and "paid compute" not in text  # other epochs are other compute
    assert ("a real difference" in text) == clear and ("not a clear win" in text) == (not clear)

    # At the compute the search paid, the rows trained that long compete with the search.
    text = compare.verdict_text(rows, plans, 6, 1600)
    assert text.startswith("**Verdict at paid compute** (6 epochs: every child epoch the search trained")
    assert f"**`{PAID_KD}` won**" in text and f"above `{PAID_INHERITED}`" in text
    assert "above `iterkd (node 3)`" in text and "chain compute`" not in text


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


def test_a_prune_row_channel_pruning_cannot_reach_is_left_out_with_the_reason():
    """Pruning narrows convs only: a torchvision-style 4,096-wide head stays, so 1/100 of the root is
    out of reach, while the same convs with iterkd's own head get there."""
    blocks = ((64,), (128,), (256, 256), (512, 512), (512, 512))
    wide = VGGSpec(blocks, 3, 10, 32, grid=7, hidden=(4096, 4096))
    why = compare.unreachable_by_pruning(wide, [(wide.params() // 2, 1), (wide.params() // 100, 1)])
    assert why.startswith(
        f"channel pruning narrows the root's convs only and cannot reach {wide.params() // 100:,}"
    )
    assert "the fully connected layers hold" in why
    plain = VGGSpec(blocks, 3, 10, 32)
    assert (
        compare.unreachable_by_pruning(plain, [(plain.params() // 2, 1), (plain.params() // 100, 1)]) is None
    )
