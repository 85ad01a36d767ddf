"""Reports: content matches lineage.csv, the tree stays readable at 30+ nodes, unfinished or
missing runs give partial reports or one-line errors, the study is never modified, and the page
renders in headless Chromium."""

import hashlib
import html
import json
import shutil
import subprocess
import zlib
from pathlib import Path

import optuna
import pandas as pd
import pytest

from iterkd.arch import VGGSpec
from iterkd.cli import main
from iterkd.errors import IterkdError
from iterkd.lineage import Node, node_attrs, node_status, set_selection
from iterkd.report import (
    RunView,
    load_run,
    pareto_figure,
    pareto_front,
    render_markdown,
    tidy_layout,
    tree_figure,
    write_report,
)
from iterkd.spaces import load_space
from iterkd.storage import open_study
from iterkd.variants import diverse_order

CHROMIUM = Path("/usr/bin/chromium")


# -- a run built straight into a study: real specs from the space's operators, no training ------------


def fake_run(
    run_dir: Path, *, generations=4, children=4, beam=2, ancestors=True, finished=True, extra_states=True
) -> Path:
    """A study shaped like a beam search (`children` candidates per parent, `beam` kept), written
    with the same attributes the search writes. Accuracies fall with size, deterministically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    name = "fake"
    config = {
        "name": name,
        "variant": "ancestors-children" if ancestors else "parent-children",
        "children": children,
        "beam": beam,
        "select": "best-acc",
        "max_drop": 3.0,
        "space": "vgg16_blocks",
        "dataset": "synthetic",
        "storage": None,
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    study = open_study(f"sqlite:///{run_dir}/study.db", name)
    space = load_space("vgg16_blocks")

    def add(generation, parents, teachers, op, spec, state=optuna.trial.TrialState.COMPLETE, acc=None):
        attrs = node_attrs(
            generation=generation,
            parents=parents,
            teachers=teachers,
            operator=op,
            spec=spec,
            key=f"{generation}|{parents}|{op}",
            epochs=2,
        )
        if acc is not None:
            attrs.update(val_acc=acc, test_acc=round(acc - 0.4, 2), seconds=1.5, checkpoint="none")
        # One write per node (add_trial), not one per attribute: keeps the fixture fast.
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                value=acc if acc is not None else None,
                user_attrs=attrs,
                distributions={},
                params={},
            )
        )
        return len(study.trials) - 1

    root_spec = space.root_spec(3, 10, 32, 1 / 8)
    root_acc = 92.0
    frontier = [(add(0, [], [], "root", root_spec, acc=root_acc), root_spec, [])]
    for g in range(1, generations + 1):
        scored = []
        for parent, spec, chain in frontier:
            teachers = chain + [parent] if ancestors else [parent]
            for i, move in enumerate(diverse_order(space.moves(spec))[:children]):
                ratio = move.spec.params() / root_spec.params()
                acc = round(
                    root_acc - 0.6 * g - 1.2 * (1 - ratio) - (zlib.crc32(move.label.encode()) % 90) / 100, 2
                )
                state = optuna.trial.TrialState.COMPLETE
                if extra_states and g == 2 and i == children - 1:
                    state = (
                        optuna.trial.TrialState.FAIL
                        if parent == frontier[0][0]
                        else optuna.trial.TrialState.PRUNED
                    )
                node = add(
                    g,
                    [parent],
                    teachers,
                    move.label,
                    move.spec,
                    state,
                    acc if state == optuna.trial.TrialState.COMPLETE else None,
                )
                if state == optuna.trial.TrialState.COMPLETE:
                    scored.append((acc, node, move.spec, teachers))
        scored.sort(key=lambda s: -s[0])
        frontier = [(node, spec, teachers) for _, node, spec, teachers in scored[:beam]]
        set_selection(study, g, [n for n, _, _ in frontier])
    if finished:
        study.set_user_attr("stop_reason", f"reached --max-generations {generations}")
        study.set_user_attr("final_node", frontier[0][0])
        study.set_user_attr("wall_seconds", 123.0)
    return run_dir


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    """37 nodes over 5 levels, ancestors variant with a beam of 2, including failed and pruned nodes."""
    return fake_run(tmp_path_factory.mktemp("big"), generations=5)


def smoke_copy(smoke_run, tmp_path) -> Path:
    """A private copy of the shared smoke run, its config pointing at the copy (a resumed search
    takes the run directory from config.json)."""
    cfg, _ = smoke_run
    run = Path(shutil.copytree(cfg.run_dir, tmp_path / "run"))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "run_dir": str(run)}))
    return run


def md_tables(text: str) -> list[pd.DataFrame]:
    """The Markdown tables of a report, read back as strings."""
    tables, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            rows.append([c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")])
        elif rows:
            tables.append(pd.DataFrame(rows[2:], columns=rows[0]))
            rows = []
    return tables


# -- content --------------------------------------------------------------------------------------------


def test_smoke_report_numbers_match_lineage_csv(smoke_run, tmp_path):
    run = smoke_copy(smoke_run, tmp_path)
    report = write_report(run)
    csv = pd.read_csv(run / "lineage.csv")
    md = report.markdown.read_text()
    summary, steps, *generations, settings = md_tables(md)
    assert steps.outcome.tolist() == ["accepted", "accepted"]  # the smoke run never backed off
    nodes = pd.concat(generations).set_index("node")
    assert sorted(nodes.index.astype(int)) == sorted(csv.node)
    for row in csv.itertuples():
        shown = nodes.loc[str(row.node)]
        assert shown["params"] == f"{row.params:,}" and shown["status"] == row.status
        assert shown["val %"] == f"{row.val_acc:.2f}" and shown["test %"] == f"{row.test_acc:.2f}"
        assert shown["drop pts"] == f"{row.drop:.2f}" and shown["operator"] == row.operator
        # the deployment figures the smoke fixture measured, per node
        assert (
            shown["CPU ms (b1)"] == f"{row.latency_ms_b1:.2f}"
            and shown["CPU img/s (b64)"] == f"{row.throughput_b64:,.0f}"
        )
    root, final = csv[csv.status == "root"].iloc[0], csv[csv.node == smoke_run[1].final.node].iloc[0]
    assert summary.columns[1:3].tolist() == [f"root (#{root.node})", f"final (#{final.node})"]
    params = summary.set_index("").loc["params"]
    assert params.iloc[0] == f"{root.params:,}" and params.iloc[1] == f"{final.params:,}"
    assert params["change"] == f"{root.params / final.params:.2f}× smaller"
    assert (
        summary.set_index("").loc["validation accuracy %", "change"]
        == f"drop {root.val_acc - final.val_acc:.2f} pts"
    )
    latency = summary.set_index("").filter(like="CPU latency, batch 1", axis=0).iloc[0]
    assert latency.iloc[:2].tolist() == [f"{root.latency_ms_b1:.2f}", f"{final.latency_ms_b1:.2f}"]
    assert latency["change"] == f"{root.latency_ms_b1 / final.latency_ms_b1:.2f}× faster"
    assert "max-generations" in md and "Partial report" not in md
    assert dict(zip(settings.setting, settings.value))["variant"] == "parent-child"
    # The HTML page carries the same summary and both images inline, and fetches nothing.
    page = report.html.read_text()
    assert page.count("data:image/svg+xml;base64,") == 1 and page.count("data:image/png;base64,") == 1
    assert f"{final.params:,}" in page and "max-generations" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert report.tree.read_text().startswith("<?xml") and report.plot.read_bytes()[:4] == b"\x89PNG"


def test_search_writes_the_report_and_iterkd_report_rewrites_it(smoke_run, tmp_path, capsys):
    run = smoke_copy(smoke_run, tmp_path)
    assert main(["search", "--run-dir", str(run), "--no-progress"]) == 0  # finished: resumes, trains nothing
    assert f"report: {run / 'report.html'}" in capsys.readouterr().out and (run / "report.html").exists()
    for name in ("report.html", "report.md", "lineage.svg", "pareto.png"):
        (run / name).unlink()
    assert main(["report", str(run)]) == 0
    out, err = capsys.readouterr()
    assert f"report: {run / 'report.html'}" in out and err == ""
    assert all(
        (run / name).stat().st_size > 1000
        for name in ("report.html", "report.md", "lineage.svg", "pareto.png")
    )


def test_report_never_modifies_the_study(smoke_run, tmp_path):
    run = smoke_copy(smoke_run, tmp_path)
    before = hashlib.sha256((run / "study.db").read_bytes()).hexdigest()
    write_report(run)
    assert hashlib.sha256((run / "study.db").read_bytes()).hexdigest() == before
    assert not (run / "study.db-journal").exists() and not (run / "study.db-wal").exists()


def test_pareto_front_keeps_only_undominated_nodes():
    spec = load_space("tiny").root_spec(3, 10, 16, 1 / 16)
    sizes = [100, 50, 50, 20, 10, 5]
    accs = [90.0, 89.0, 85.0, 89.5, 80.0, None]  # the last one has no result: never on the front
    nodes = [
        Node(
            node=i,
            state="COMPLETE",
            generation=1,
            parents=(0,),
            teachers=(0,),
            operator="x",
            spec=spec,
            val_acc=acc,
        )
        for i, acc in enumerate(accs)
    ]
    front = pareto_front(nodes, size=lambda n: sizes[n.node])
    assert [sizes[n.node] for n in front] == [10, 20, 100] and [n.val_acc for n in front] == [
        80.0,
        89.5,
        90.0,
    ]


def test_report_is_drawn_from_nodes_alone(tmp_path):
    """Every table and picture reads Node attributes: a view of four Nodes, with no study and no
    lineage table behind it, gives parents, teachers, drops, deployment figures and teacher edges."""
    space = load_space("tiny")
    root_spec = space.root_spec(3, 10, 16, 1 / 16)
    child_spec = diverse_order(space.moves(root_spec))[0].spec
    grandchild_spec = diverse_order(space.moves(child_spec))[0].spec

    def node(i, generation, parents, teachers, spec, acc=None, latency=None, state="COMPLETE", error=""):
        deploy = (
            {}
            if latency is None
            else {
                "latency_ms_b1": latency,
                "throughput_b64": 1000 / latency,
                "cpu_threads": 1,
                "onnx_bytes": spec.state_bytes(),
            }
        )
        return Node(
            node=i,
            state=state,
            generation=generation,
            parents=parents,
            teachers=teachers,
            operator="root" if not generation else f"move{i}(block=1)",
            spec=spec,
            val_acc=acc,
            test_acc=None if acc is None else acc - 0.5,
            seconds=2.0,
            epochs=3,
            error=error,
            deploy=deploy,
        )

    nodes = [
        node(0, 0, (), (), root_spec, 90.0, latency=2.0),
        node(1, 1, (0,), (0,), child_spec, 88.75, latency=0.5),
        node(2, 2, (1,), (0, 1), grandchild_spec, state="FAIL", error="diverged"),
        node(3, 2, (1,), (0, 1), grandchild_spec, 88.0, latency=0.25),
    ]
    view = RunView(
        tmp_path,
        "nodes",
        {"max_drop": 3.0, "variant": "ancestors-children"},
        {n.node: n for n in nodes},
        {n.node: node_status(n, {1, 3}) for n in nodes},
        "test over",
        3,
        10.0,
        (),
    )
    assert view.accepted_path() == [0, 1, 3] and view.root is nodes[0] and view.final is nodes[3]

    summary, gen0, gen1, gen2, _ = md_tables(render_markdown(view))
    assert "### Generation 2: 2 candidates from parent node 1; accepted: node 3" in render_markdown(view)
    one = gen1.set_index("node").loc["1"]
    assert (one["parent"], one["teachers"], one["drop pts"], one["status"]) == ("0", "0", "1.25", "accepted")
    assert (
        one["× smaller"] == f"{root_spec.params() / child_spec.params():.2f}" and one["CPU ms (b1)"] == "0.50"
    )
    two, three = gen2.set_index("node").loc["2"], gen2.set_index("node").loc["3"]
    assert (two["val %"], two["drop pts"], two["CPU ms (b1)"], two["status"]) == ("—", "—", "—", "failed")
    assert (three["parent"], three["teachers"], three["drop pts"]) == ("1", "0, 1", "2.00")
    change = summary.set_index("")["change"]
    assert change["validation accuracy %"] == "drop 2.00 pts"
    assert change.filter(like="CPU latency").iloc[0] == "8.00× faster"

    ax = tree_figure(view).axes[0]
    arrows = [p for p in ax.patches if type(p).__name__ == "FancyArrowPatch"]
    assert len(arrows) == 3 + 1  # one per parent; ancestor 0 teaches 2 and 3, drawn into path node 3 only
    assert any("failed: diverged" in t.get_text() for t in ax.texts)
    _, labels = pareto_figure(view).axes[0].get_legend_handles_labels()
    assert set(labels) == {"Pareto front", "accepted path", "root", "accepted", "budget: root − 3 pts"}


# -- the tree picture ---------------------------------------------------------------------------------


def test_tidy_layout_centres_parents_and_never_shares_a_slot():
    children = {0: [1, 2], 1: [3, 4, 5], 2: [6], 6: [7, 8]}
    level = {0: 0, 1: 1, 2: 1, 3: 2, 4: 2, 5: 2, 6: 2, 7: 3, 8: 3}
    x = tidy_layout(children, [0], level)
    for lv in set(level.values()):
        xs = sorted(x[n] for n in level if level[n] == lv)
        assert all(b - a >= 1 for a, b in zip(xs, xs[1:]))
    for parent, kids in children.items():
        assert x[parent] == (x[kids[0]] + x[kids[-1]]) / 2
    assert max(x.values()) == 3.5  # compact: 7 and 8 sit under 6, which sits right of 3, 4, 5


def test_tree_of_37_nodes_has_no_overlapping_boxes_or_labels(big_run):
    view = load_run(big_run)
    assert len(view.nodes) == 37 and {"failed", "pruned", "accepted", "rejected"} <= set(view.status.values())
    fig = tree_figure(view)
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    boxes = {
        p.get_gid(): p.get_window_extent(renderer)
        for p in ax.patches
        if (p.get_gid() or "").startswith("node-")
    }
    assert len(boxes) == 37
    ids = sorted(boxes)
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            assert not boxes[a].overlaps(boxes[b]), (a, b)
    # Every label lies inside one box, and inside the figure.
    fig_box = fig.bbox
    texts = [t for t in ax.texts if t.get_text().startswith("#")]
    for t in texts:
        tb = t.get_window_extent(renderer)
        owner = boxes[f"node-{t.get_text().split()[0][1:]}"]
        assert owner.x0 <= tb.x0 and tb.x1 <= owner.x1 and owner.y0 <= tb.y0 and tb.y1 <= owner.y1
        assert fig_box.x0 <= tb.x0 and tb.x1 <= fig_box.x1
    # Edges: one per parent, plus one dashed per ancestor teacher of a node on the accepted path.
    path = view.accepted_path()
    assert len(path) == 6 and path[0] == 0 and path[-1] == view.final_node
    extra = sum(len(view.nodes[n].teachers) - 1 for n in path[1:])
    arrows = [p for p in ax.patches if p.get_gid() is None and type(p).__name__ == "FancyArrowPatch"]
    assert len(arrows) == 36 + extra and extra == 1 + 2 + 3 + 4
    assert sum(a.get_linestyle() not in ("-", "solid") for a in arrows) == extra


# -- unfinished, missing and broken runs --------------------------------------------------------------


def test_crashed_run_gives_a_partial_report_saying_what_is_missing(tmp_path):
    run = fake_run(
        tmp_path / "crashed", generations=2, children=2, beam=1, finished=False, extra_states=False
    )
    study = open_study(f"sqlite:///{run}/study.db", "fake")
    trial = study.ask()  # a child left RUNNING by a dead process
    first = study.trials[0]
    for k, v in node_attrs(
        generation=3,
        parents=[0],
        teachers=[0],
        operator="drop_block(block=1)",
        spec=VGGSpec.from_json(first.user_attrs["spec"]),
        key="x",
    ).items():
        trial.set_user_attr(k, v)
    report = write_report(run)
    md = report.markdown.read_text()
    assert "Partial report" in md and "why the search stopped" in md and "total wall time" in md
    assert "from the first node's start to the last one's end (training alone: 8 s)" in md  # 5 nodes x 1.5 s
    best = load_run(run)
    assert f"node {best.final_node}, the best accepted so far, is shown instead" in md
    assert f"node(s) {trial.number}" in md and "running" in md
    assert "Partial report" in report.html.read_text()


def test_run_whose_root_is_still_training_gives_a_partial_report(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"name": "early", "max_drop": 1.0}))
    study = open_study(f"sqlite:///{tmp_path}/study.db", "early")
    spec = load_space("tiny").root_spec(3, 10, 16, 1 / 16)
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.RUNNING,
            distributions={},
            params={},
            user_attrs=node_attrs(
                generation=0, parents=[], teachers=[], operator="root", spec=spec, key="root"
            ),
        )
    )
    report = write_report(tmp_path)
    assert "a finished root (sizes and drops cannot be relative to it)" in report.gaps
    assert "the final model (not recorded)" in report.gaps and "running" in report.markdown.read_text()


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: d / "nope", "does not exist"),
        (lambda d: d, "no config.json and no study.db"),
    ],
)
def test_missing_or_empty_run_directory_is_a_one_line_error(tmp_path, capsys, make, needle):
    code = main(["report", str(make(tmp_path))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("iterkd: error: ") and needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "study.db").exists()  # SQLite was not left creating an empty database


def test_run_whose_study_has_no_nodes_says_so(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"name": "empty"}))
    open_study(f"sqlite:///{tmp_path}/study.db", "empty")
    with pytest.raises(IterkdError, match="no nodes yet"):
        write_report(tmp_path)


def test_run_without_config_json_reads_the_only_study(big_run, tmp_path):
    run = Path(shutil.copytree(big_run, tmp_path / "run"))
    (run / "config.json").unlink()
    report = write_report(run)
    assert report.gaps == ("the run's settings (no config.json, none in the study)",)


def test_parquet_needs_pyarrow_and_says_how_to_get_it(big_run, monkeypatch):
    import iterkd.report as report_mod

    monkeypatch.setattr(report_mod, "_has_pyarrow", lambda: False)
    with pytest.raises(IterkdError, match=r"pip install 'iterkd\[parquet\]'"):
        write_report(big_run, fmt="parquet")


def test_parquet_table_equals_the_csv(big_run):
    pytest.importorskip("pyarrow", reason="pandas' pyarrow backend is not installed")
    report = write_report(big_run, fmt="parquet")
    csv, parquet = (pd.read_csv(report.tables[0]), pd.read_parquet(report.tables[1]))
    pd.testing.assert_frame_equal(csv, parquet, check_dtype=False)


# -- in a browser ---------------------------------------------------------------------------------------

# Reads back, after layout, whether each image decoded and whether the summary is on screen.
PROBE = """<script>
window.addEventListener('load', () => {
  const s = document.getElementById('summary').getBoundingClientRect();
  document.body.setAttribute('data-probe', JSON.stringify({
    images: [...document.images].map(i => [i.id, i.complete, i.naturalWidth, i.getBoundingClientRect().height]),
    summary: [s.top, s.height, getComputedStyle(document.getElementById('summary')).visibility],
    text: document.getElementById('summary').innerText}));
});
</script></body>"""


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless browser test needs Debian's chromium at /usr/bin/chromium "
    "(apt-get install chromium; .ci/run installs it)",
)
def test_report_renders_in_headless_chromium_with_images_and_summary(big_run, tmp_path):
    report = write_report(big_run)
    page = tmp_path / "probe.html"
    page.write_text(report.html.read_text().replace("</body>", PROBE))
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,1000",
        "--virtual-time-budget=5000",
        "--dump-dom",
        page.as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    probe = json.loads(html.unescape(dom.split('data-probe="', 1)[1].split('"', 1)[0]))
    images = {i[0]: i[1:] for i in probe["images"]}
    assert set(images) == {"tree", "plot"}
    for done, natural_width, height in images.values():
        assert done and natural_width > 300 and height > 200
    top, height, visibility = probe["summary"]
    assert 0 < top < 1000 and height > 100 and visibility == "visible"
    assert "stopped because" in probe["text"] and "reached --max-generations 5" in probe["text"]


# -- steps, back-offs and the polish ------------------------------------------------------------------


def test_the_report_shows_each_attempt_of_a_generation_and_marks_the_polish(tmp_path, monkeypatch):
    """A run whose generation 1 overshoots at 50 % and is accepted at 25 %, then is polished: the
    steps section lists both attempts with their step, target, drop and outcome; the polish has a
    heading of its own and a line in the summary."""
    from iterkd.search import Search
    from tests.conftest import smoke_config
    from tests.test_polish import fake_training

    fake_training(monkeypatch, lambda share: 0.0 if share >= 0.7 else 10.0, polish_gain=0.5)
    cfg = smoke_config(tmp_path, teacher_cache=False, max_drop=2.0, max_generations=1, final_epochs=2)
    out = Search(cfg, progress=False).run()
    report = write_report(tmp_path)
    md = report.markdown.read_text()
    summary, steps, *generations, settings = md_tables(md)
    assert steps[
        ["generation", "attempt", "step", "target ratio", "best drop pts", "outcome"]
    ].values.tolist() == [
        ["1", "1", "50.0%", "0.500", "10.00", "backed-off"],
        ["1", "2", "25.0%", "0.750", "0.00", "accepted"],
    ]
    first, retried = steps.nodes.tolist()
    assert generations[1].node.tolist() == [first, retried]  # both attempts' nodes, the first rejected
    assert generations[1].status.tolist() == ["rejected", "accepted"]
    polish = generations[-1].set_index("node").loc[str(out.final.node)]
    assert polish["operator"] == "polish" and polish["status"] == "accepted"
    assert (
        f"### Polish of node {retried} (not a generation of the search); final model: node {out.final.node}"
        in md
    )
    assert (
        f"- **polish**: node {out.final.node}: node {retried} trained 2 more epochs with KD from node(s) 0; "
        f"+0.50 pts on validation over node {retried}: it is the final model" in md
    )
    assert "- **attempts**: 2 (1 backed off to a smaller step)" in md
    assert "- **nodes**: 4 over 2 generations" in md  # the polish is not a generation
    page = report.html.read_text()
    assert '<section id="steps"><h2>Steps and back-offs</h2>' in page and page.count("backed-off") == 1


def test_a_run_without_step_records_says_so(big_run):
    md = write_report(big_run).markdown.read_text()
    assert "## Steps and back-offs\n\nNo attempt recorded." in md
