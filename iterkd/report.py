"""Reports of a run read from its study alone (never retrained, never written to): the lineage tree
as a picture, accuracy vs size, per-generation tables and a summary, as RUN/report.html and report.md.
Every picture and table is built from the run's `Node`s; the lineage table is only ever written."""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import json
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import optuna
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch
from matplotlib.ticker import FuncFormatter, LogLocator

from .errors import IterkdError
from .files import write_atomic
from .lineage import (
    POLISH,
    Node,
    ancestry,
    epochs_summary,
    epochs_text,
    int8_line,
    lineage_frame,
    node_status,
    polish_record,
    root_node,
)
from .run import Run, open_run
from .sizes import SIZES, spec_key
from .storage import redact_url

FORMATS = ("csv", "parquet")

# One look per status, shared by the tree, the plot and the tables: (fill, edge, border style).
STATUS_STYLE = {
    "root": ("#cfe2f3", "#1f4e79", "solid"),
    "accepted": ("#d9ead3", "#38761d", "solid"),
    "rejected": ("#f3f3f3", "#999999", "solid"),
    "failed": ("#f4cccc", "#cc0000", "dashed"),
    "pruned": ("#fce5cd", "#b45f06", "dotted"),
    "running": ("#fff2cc", "#bf9000", "dashdot"),
    "queued": ("#fff2cc", "#bf9000", "dashdot"),
}
PATH_COLOR = "#e66101"  # the accepted path root -> final
TEACHER_COLOR = "#6a51a3"  # ancestor-teacher edges (ancestors variants)

# Settings worth showing, in the order a reader asks about them.
SETTINGS = (
    "variant",
    "space",
    "dataset",
    "preset",
    "max_drop",
    "shrink",
    "max_generations",
    "children",
    "beam",
    "select",
    "sampler",
    "pruner",
    "objectives",
    "teacher_weights",
    "teacher",
    "width",
    "epochs",
    "root_epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "alpha",
    "temperature",
    "hint_weight",
    "train_subset",
    "val_size",
    "test_subset",
    "seed",
    "storage",
)


@dataclass(frozen=True)
class RunView:
    """What a report shows: the run's nodes (by id, in trial order) with their status, and the
    study's run-level attributes. `gaps` says, in words for the reader, what an unfinished or
    crashed run does not have."""

    run_dir: Path
    name: str
    config: dict
    nodes: dict[int, Node]
    status: dict[int, str]  # node id -> lineage.node_status: root, accepted, rejected, failed, ...
    stop_reason: str | None
    final_node: int | None
    wall_seconds: float | None
    gaps: tuple[str, ...]
    span_seconds: float | None = None  # first node's start to last node's end, when wall time is missing
    latency_ms: dict | None = None  # the run's measured batch-1 CPU latencies by spec (sizes.spec_key)
    steps: tuple[dict, ...] = ()  # the study's `steps`: each decided attempt of a generation (search.py)
    polish: dict | None = None  # lineage.polish_record: the polish and whether it is the final model
    int8: dict | None = None  # the study's `int8`: the int8 model a --final int8 search exported

    @property
    def root(self) -> Node | None:
        """The trained root: the node lineage.csv's drops are relative to."""
        return root_node(list(self.nodes.values()))

    @property
    def final(self) -> Node | None:
        return self.nodes.get(self.final_node)

    @property
    def generations(self) -> int:
        """Generations of the search, root included (a polish is not one)."""
        return max(n.generation for n in self.nodes.values() if n.operator != POLISH) + 1

    def accepted_path(self) -> list[int]:
        """Node ids from the root to the final node along first parents."""
        final = self.final
        return [n.node for n in ancestry(list(self.nodes.values()), final)] if final is not None else []


@dataclass(frozen=True)
class Report:
    html: Path
    markdown: Path
    tree: Path
    plot: Path
    tables: tuple[Path, ...]
    gaps: tuple[str, ...]


# -- reading a run ------------------------------------------------------------------------------------


def load_run(run_dir: str | Path, storage: str | None = None) -> RunView:
    """Open a run read-only (run.open_run) and collect what a report needs; user mistakes (no such
    run, an empty study) become one-line errors, an unfinished run becomes gaps."""
    return run_view(open_run(run_dir, storage))


def run_view(run: Run) -> RunView:
    """The report's view of an open run: its nodes with their status, and what it lacks as gaps."""
    run_dir, study, name = run.run_dir, run.study, run.cfg.name
    gaps = []
    config = json.loads(run.cfg.to_json()) if run.settings_from != "defaults" else {}
    if run.settings_from != "config.json":
        gaps.append(
            "config.json (the settings were read from the study)"
            if config
            else "the run's settings (no config.json, none in the study)"
        )
    nodes = run.nodes
    if not nodes:
        raise IterkdError(
            f"run {name!r} in {run_dir} has no nodes yet (its study is empty); nothing to report. "
            f"Start or resume it with: iterkd resume {run_dir}"
        )
    accepted = run.accepted  # once, not per node: Run.accepted reads the study's attributes again
    status = {i: node_status(n, accepted) for i, n in nodes.items()}
    attrs = study.user_attrs
    stop_reason, final_node, wall = (
        attrs.get("stop_reason"),
        attrs.get("final_node"),
        attrs.get("wall_seconds"),
    )
    if not stop_reason:
        gaps.append(
            "why the search stopped (the run has not finished: it crashed, was interrupted, "
            "or is still running)"
        )
    if root_node(list(nodes.values())) is None:
        gaps.append("a finished root (sizes and drops cannot be relative to it)")
    if final_node is None:
        best = run.final_node()
        final_node = None if best is None else best.node
        gaps.append(
            "the final model (not recorded"
            + (
                f"; node {final_node}, the best accepted so far, is shown instead)"
                if final_node is not None
                else ")"
            )
        )
    span = None
    if wall is None:
        span = _span_seconds(study)
        gaps.append(
            "the total wall time (not recorded; the time from the first node's start to the last "
            "node's end is shown instead)"
        )
    unfinished = [i for i, s in status.items() if s in ("running", "queued")]
    if unfinished:
        gaps.append(
            f"results of node(s) {', '.join(map(str, unfinished))} (still marked running: a crash "
            f"leaves them so; `iterkd resume {run_dir}` resumes them)"
        )
    steps = tuple(sorted(attrs.get("steps", []), key=lambda r: (r["generation"], r["round"])))
    return RunView(
        run_dir,
        name,
        config,
        nodes,
        status,
        stop_reason,
        final_node,
        wall,
        tuple(gaps),
        span,
        dict(attrs.get("latency_ms", {})),
        steps,
        polish_record(study) or None,
        attrs.get("int8"),
    )


def _span_seconds(study: optuna.Study) -> float | None:
    """Wall time as the trials saw it (it also counts pauses between sessions of a resumed run)."""
    times = [
        (t.datetime_start, t.datetime_complete or t.datetime_start)
        for t in study.get_trials(deepcopy=False)
        if t.datetime_start
    ]
    return (max(e for _, e in times) - min(s for s, _ in times)).total_seconds() if times else None


def _parent(n: Node) -> int | None:
    """The first parent: the tree and the accepted path follow first parents, as lineage.ancestry does."""
    return n.parents[0] if n.parents else None


# -- a node's figures ---------------------------------------------------------------------------------


def drop_pts(root: Node | None, n: Node) -> float | None:
    """Validation accuracy points lost against the root, rounded as lineage.csv rounds them (so the
    tables show the same digits as the CSV); None without a trained root or a result."""
    if root is None or n.val_acc is None:
        return None
    return round(root.val_acc - n.val_acc, 4)


def _params(n: Node) -> int:
    return n.spec.params()


def _flops(n: Node) -> int:
    return n.spec.flops()


def _measured(n: Node, key: str) -> bool:
    """Whether the run measured deployment figure `key` (lineage.DEPLOY_COLUMNS) for node `n`."""
    return not _missing(n.deploy.get(key))


def _deploy_figure(key: str) -> Callable[[Node], float | None]:
    return lambda n: n.deploy.get(key)


# -- formatting -----------------------------------------------------------------------------------------


def _missing(value) -> bool:
    """None or NaN: either way the figure was not measured (or not yet)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _si(value, unit: str = "") -> str:
    """3 significant digits with an SI prefix: 921920 -> '922 k', 28208 B -> '28.2 kB'."""
    if _missing(value):
        return "—"
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:g} {unit}".strip()


def _num(value, fmt: str) -> str:
    return "—" if _missing(value) else format(value, fmt)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _short_operator(op: str) -> str:
    """'shrink_widths(block=all, factor=0.5)' -> 'shrink_widths(all, 0.5)' so tree boxes stay narrow."""
    return re.sub(r"\b\w+=", "", op)


def _smaller(root_value, value) -> float | None:
    if root_value is None or _missing(value) or not value:
        return None
    return root_value / value


# -- the lineage tree ---------------------------------------------------------------------------------


def tidy_layout(children: dict[int, list[int]], roots: list[int], level: dict[int, int]) -> dict[int, float]:
    """x slot of every node: leaves take the next free slot of their level, a parent sits over the
    middle of its children, and a subtree that would collide is shifted right (so boxes never overlap
    and narrow subtrees tuck under wide ones)."""
    x: dict[int, float] = {}
    next_free: dict[int, float] = defaultdict(float)

    def descendants(n: int):
        for c in children.get(n, ()):
            yield c
            yield from descendants(c)

    def place(n: int) -> None:
        kids = children.get(n, [])
        for c in kids:
            place(c)
        want = (x[kids[0]] + x[kids[-1]]) / 2 if kids else next_free[level[n]]
        shift = max(0.0, next_free[level[n]] - want)
        if shift:
            for d in descendants(n):
                x[d] += shift
                next_free[level[d]] = max(next_free[level[d]], x[d] + 1)
        x[n] = want + shift
        next_free[level[n]] = x[n] + 1

    for r in roots:
        place(r)
    return x


def _box_lines(n: Node, status: str, root: Node | None) -> tuple[str, str]:
    title = f"#{n.node}  {_short_operator(n.operator) if n.generation else 'root'}"
    size = f"{_si(_params(n))} params"
    ratio = _smaller(None if root is None else _params(root), _params(n))
    if n.generation and ratio:
        size += f" · {ratio:.1f}× smaller"
    if _missing(n.val_acc):
        acc = status + (f": {n.error}" if n.error else "")
        return title, f"{size}\n{acc[:34]}\n"
    acc = f"val {n.val_acc:.2f}% · test {_num(n.test_acc, '.2f')}%"
    drop = drop_pts(root, n)
    drop = (
        f"drop {drop:.2f} pts"
        if n.generation and drop is not None
        else ("reference for drops" if status == "root" else status)
    )
    return title, f"{size}\n{acc}\n{drop}"


def tree_figure(view: RunView) -> Figure:
    """The lineage as boxes on one row per generation: parent edges solid, extra (ancestor)
    teachers dashed, the accepted path root -> final highlighted, status by colour and border."""
    nodes = view.nodes
    root = view.root
    children: dict[int, list[int]] = defaultdict(list)
    roots = []
    for i, n in nodes.items():
        p = _parent(n)
        (children[p].append(i) if p in nodes else roots.append(i))
    slot = tidy_layout(children, roots, {i: n.generation for i, n in nodes.items()})
    labels = {i: _box_lines(n, view.status[i], root) for i, n in nodes.items()}

    font = 8
    measure = Figure(dpi=100)
    renderer = FigureCanvasAgg(measure).get_renderer()

    def extent(text: str, weight: str) -> tuple[float, float]:
        t = measure.text(0, 0, text, fontsize=font, weight=weight)
        bb = t.get_window_extent(renderer)
        return bb.width / 100, bb.height / 100

    titles = [extent(t, "bold") for t, _ in labels.values()]
    bodies = [extent(b, "normal") for _, b in labels.values()]
    pad = 0.07
    box_w = max(w for w, _ in titles + bodies) + 2 * pad
    title_h, body_h = max(h for _, h in titles), max(h for _, h in bodies)
    box_h = title_h + body_h + 3 * pad
    gap_x, gap_y, left, top, bottom = 0.15, 0.55, 0.75, 0.85, 0.15
    levels = view.generations
    tree_w = (max(slot.values()) + 1) * (box_w + gap_x) - gap_x
    width = max(left + tree_w + 0.2, 7.5)
    height = top + levels * (box_h + gap_y) - gap_y + bottom
    x0 = left + (width - left - 0.2 - tree_w) / 2  # centre a narrow tree under the legend

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")

    def centre(n: int) -> tuple[float, float]:
        return (
            x0 + slot[n] * (box_w + gap_x) + box_w / 2,
            height - top - nodes[n].generation * (box_h + gap_y) - box_h / 2,
        )

    for g in range(levels):
        ax.text(
            x0 - 0.62,
            height - top - g * (box_h + gap_y) - box_h / 2,
            f"gen {g}",
            fontsize=9,
            weight="bold",
            va="center",
            ha="left",
            color="#444444",
        )

    path = view.accepted_path()
    on_path = set(path)
    path_edges = set(zip(path, path[1:]))
    boxes = {}
    for n, (title, body) in labels.items():
        status = view.status[n]
        fill, edge, style = STATUS_STYLE.get(status, STATUS_STYLE["rejected"])
        cx, cy = centre(n)
        highlight = n in on_path
        boxes[n] = box = FancyBboxPatch(
            (cx - box_w / 2, cy - box_h / 2),
            box_w,
            box_h,
            boxstyle="round,pad=0,rounding_size=0.06",
            facecolor=fill,
            edgecolor=PATH_COLOR if highlight else edge,
            linestyle=style,
            linewidth=2.4 if highlight else 1.0,
            zorder=3,
            gid=f"node-{n}",
        )
        ax.add_patch(box)
        muted = "#777777" if status in ("rejected", "failed", "pruned") else "#111111"
        top_y = cy + box_h / 2 - pad
        ax.text(cx, top_y, title, fontsize=font, weight="bold", ha="center", va="top", color=muted, zorder=4)
        ax.text(
            cx,
            top_y - title_h - pad,
            body,
            fontsize=font,
            ha="center",
            va="top",
            color=muted,
            zorder=4,
            linespacing=1.2,
        )

    # Every child of an ancestors variant is taught by all its accepted ancestors, so drawing each of
    # those edges would bury the tree at 30 nodes; they are drawn into the accepted path's nodes and
    # the tables list every node's teachers.
    for n, node in nodes.items():
        parent = _parent(node)
        extra = [t for t in node.teachers if t != parent and t in nodes] if n in on_path else []
        for t in ([parent] if parent in nodes else []) + extra:
            (px, py), (cx, cy) = centre(t), centre(n)
            first, bold = t == parent, (t, n) in path_edges
            # Endpoints on the box edges computed here: matplotlib's patch clipping is slow at 30+ nodes.
            ax.add_artist(
                FancyArrowPatch(
                    (px, py - box_h / 2),
                    (cx, cy + box_h / 2),
                    shrinkA=0,
                    shrinkB=1,
                    arrowstyle="-|>",
                    mutation_scale=9,
                    connectionstyle="arc3,rad=0" if first else "arc3,rad=0.25",
                    color=PATH_COLOR if bold else ("#555555" if first else TEACHER_COLOR),
                    linestyle="solid" if first else (0, (4, 3)),
                    linewidth=2.4 if bold else (1.0 if first else 0.9),
                    alpha=1.0 if first else 0.7,
                    zorder=2 if bold else 1,
                )
            )

    handles = [
        Patch(
            facecolor=STATUS_STYLE[s][0], edgecolor=STATUS_STYLE[s][1], linestyle=STATUS_STYLE[s][2], label=s
        )
        for s in ("root", "accepted", "rejected", "failed", "pruned", "running")
    ]
    handles += [
        Line2D([], [], color=PATH_COLOR, lw=2.4, label="accepted path → final"),
        Line2D([], [], color="#555555", lw=1, label="parent → child"),
        Line2D(
            [],
            [],
            color=TEACHER_COLOR,
            lw=0.9,
            ls=(0, (4, 3)),
            alpha=0.7,
            label="ancestor teacher → path node",
        ),
    ]
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.12, height - 0.05),
        ncol=5,
        fontsize=8,
        frameon=False,
        bbox_transform=ax.transData,
        borderaxespad=0,
    )
    return fig


# -- accuracy vs size -----------------------------------------------------------------------------------


def pareto_front(nodes: Iterable[Node], size: Callable[[Node], float] = _params) -> list[Node]:
    """Finished nodes no other node beats on both size (smaller) and validation accuracy (higher),
    smallest first."""
    ok = sorted((n for n in nodes if not _missing(n.val_acc)), key=lambda n: (size(n), -n.val_acc))
    best, keep = float("-inf"), []
    for n in ok:
        if n.val_acc > best:
            keep.append(n)
            best = n.val_acc
    return keep


def _points(nodes: list[Node], size: Callable[[Node], float]) -> tuple[list[float], list[float]]:
    """x (size) and y (validation accuracy) of nodes, for matplotlib."""
    return [size(n) for n in nodes], [n.val_acc for n in nodes]


def pareto_figure(view: RunView) -> Figure:
    """Validation accuracy vs params and vs FLOPs (log axes): every node, the Pareto front, the
    accepted path, the --max-drop budget line, the root and the final model labelled."""
    done = [n for n in view.nodes.values() if not _missing(n.val_acc)]
    fig = Figure(figsize=(11, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    root, final = view.root, view.final
    budget = None
    if root is not None and view.config.get("max_drop") is not None:
        budget = root.val_acc - float(view.config["max_drop"])
    path = [view.nodes[i] for i in view.accepted_path() if not _missing(view.nodes[i].val_acc)]
    # Legend entries in a stable order, whatever order the nodes were trained in.
    by_status = {
        s: [n for n in done if view.status[n.node] == s] for s in sorted({view.status[n.node] for n in done})
    }
    for ax, size, label in zip(axes, (_params, _flops), ("parameters", "FLOPs per image")):
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.25)
        ax.plot(
            *_points(pareto_front(done, size), size),
            drawstyle="steps-post",
            color="#1f77b4",
            lw=1.2,
            alpha=0.8,
            label="Pareto front",
            zorder=2,
        )
        ax.plot(*_points(path, size), color=PATH_COLOR, lw=2, label="accepted path", zorder=3)
        for status, group in by_status.items():
            fill, edge, _ = STATUS_STYLE.get(status, STATUS_STYLE["rejected"])
            ax.scatter(
                *_points(group, size),
                s=42,
                facecolor=fill,
                edgecolor=edge,
                linewidth=1.2,
                label=status,
                zorder=4,
            )
        if budget is not None:
            ax.axhline(
                budget,
                color="#cc0000",
                ls="--",
                lw=1.2,
                zorder=1,
                label=f"budget: root − {float(view.config['max_drop']):g} pts",
            )
        marks = [(root, "root", (10, -18))] if root is not None else []
        if final is not None and not _missing(final.val_acc):
            same = root is not None and final.node == root.node
            marks = [(final, "root = final" if same else "final", (-12, 14))] + marks[: 0 if same else 1]
        for n, text, offset in marks:
            ax.annotate(
                f"{text} (#{n.node})",
                (size(n), n.val_acc),
                xytext=offset,
                textcoords="offset points",
                ha="right" if offset[0] < 0 else "left",
                fontsize=9,
                weight="bold",
                arrowprops=dict(arrowstyle="-", color="#333333", lw=0.8),
                zorder=5,
            )
        _log_ticks(ax, [size(n) for n in done])
        ax.set_xlabel(f"{label} (log scale)")
        ax.margins(x=0.12, y=0.08)
    axes[0].set_ylabel("validation accuracy (%)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


# -- tables ---------------------------------------------------------------------------------------------


def _log_ticks(ax, values: list[float]) -> None:
    """Tick labels like '150 k' that never crowd: intermediate ticks only as many as the span allows."""
    low = min(values, default=0)  # no finished node yet (a root still training): plain ticks
    decades = math.log10(max(values) / low) if low > 0 else 0
    label = FuncFormatter(lambda v, _: _si(v))
    ax.xaxis.set_major_formatter(label)
    ax.xaxis.set_minor_locator(LogLocator(subs=(2, 5) if decades > 0.7 else (1.5, 2, 3, 5, 7)))
    ax.xaxis.set_minor_formatter(label if decades <= 3 else FuncFormatter(lambda v, _: ""))


def node_table(view: RunView, nodes: list[Node]) -> pd.DataFrame:
    """Display form of some of the run's nodes: one line per candidate, numbers formatted for people."""
    root = view.root
    root_params = None if root is None else _params(root)
    out = pd.DataFrame(
        {
            "node": [str(n.node) for n in nodes],
            "parent": [_num(_parent(n), "d") for n in nodes],
            "teachers": [", ".join(map(str, n.teachers)) or "—" for n in nodes],
            "operator": [n.operator for n in nodes],
            "architecture": [n.spec.summary() for n in nodes],
            "val %": [_num(n.val_acc, ".2f") for n in nodes],
            "test %": [_num(n.test_acc, ".2f") for n in nodes],
            "drop pts": [_num(drop_pts(root, n), ".2f") for n in nodes],
            "params": [f"{_params(n):,}" for n in nodes],
            "× smaller": [_num(_smaller(root_params, _params(n)), ".2f") for n in nodes],
            "bytes": [_si(n.spec.state_bytes(), "B") for n in nodes],
            "FLOPs": [_si(_flops(n)) for n in nodes],
            "epochs": [epochs_text(n) for n in nodes],
            "seconds": [_num(n.seconds, ".1f") for n in nodes],
            "status": [view.status[n.node] for n in nodes],
        }
    )
    # Deployment figures, where the run measured them (not the smoke preset, not --no-deploy-figures).
    if any(_measured(n, "latency_ms_b1") for n in nodes):
        out.insert(12, "CPU ms (b1)", [_num(n.deploy.get("latency_ms_b1"), ".2f") for n in nodes])
        out.insert(13, "CPU img/s (b64)", [_num(n.deploy.get("throughput_b64"), ",.0f") for n in nodes])
        out.insert(14, "ONNX", [_si(n.deploy.get("onnx_bytes"), "B") for n in nodes])
    return out


def generation_tables(view: RunView) -> list[tuple[str, pd.DataFrame]]:
    """(heading, table) per generation, the heading saying who the parents were and who was accepted."""
    by_generation: dict[int, list[Node]] = defaultdict(list)
    for n in view.nodes.values():
        by_generation[n.generation].append(n)
    return [
        (_generation_heading(view, g, by_generation[g]), node_table(view, by_generation[g]))
        for g in sorted(by_generation)
    ]


def steps_table(view: RunView) -> pd.DataFrame:
    """Each attempt of each generation, in order: the step tried (the share of its parents'
    parameters a child removes), the child/parent size it aimed at, the best child's drop and
    whether the generation accepted it or backed off to a smaller step from the same parents."""
    rows = [
        {
            "generation": str(r["generation"]),
            "attempt": str(r["round"] + 1),
            "step": f"{r['step']:.1%}",
            "target ratio": f"{r['target']:.3f}",
            "parents": ", ".join(map(str, r["parents"])),
            "nodes": ", ".join(map(str, r["nodes"])),
            "best drop pts": _num(r.get("drop"), ".2f"),
            "outcome": r["outcome"],
        }
        for r in view.steps
    ]
    columns = [
        "generation",
        "attempt",
        "step",
        "target ratio",
        "parents",
        "nodes",
        "best drop pts",
        "outcome",
    ]
    return pd.DataFrame(rows, columns=columns)


def polish_line(view: RunView) -> str | None:
    """The polish in one sentence for the summary; None when the run had none."""
    p = view.polish
    if not p or p.get("node") not in view.nodes:
        return None
    n = view.nodes[p["node"]]
    taught = ", ".join(map(str, n.teachers)) or "—"
    if p.get("gain") is None:
        result = f"failed ({n.error}); node {p['from']} stays the final model"
    elif p.get("kept"):
        result = f"{p['gain']:+.2f} pts on validation over node {p['from']}: it is the final model"
    else:
        result = f"{p['gain']:+.2f} pts on validation against node {p['from']}, which stays the final model"
    return f"node {n.node}: node {p['from']} trained {p['epochs']} more epochs with KD from node(s) {taught}; {result}"


def _generation_heading(view: RunView, generation: int, nodes: list[Node]) -> str:
    if generation == 0:
        return "Generation 0: the root"
    polishes = [n for n in nodes if n.operator == POLISH]
    if polishes and len(polishes) == len(nodes):
        kept = [n.node for n in polishes if view.status[n.node] == "accepted"]
        return (
            f"Polish of node {', '.join(str(_parent(n)) for n in polishes)} (not a generation of the "
            f"search); final model: {_node_list(kept) or 'not the polish'}"
        )
    parents = sorted({p for p in map(_parent, nodes) if p is not None})
    accepted = _node_list([n.node for n in nodes if view.status[n.node] == "accepted"])
    if not accepted:
        undecided = any(view.status[n.node] in ("running", "queued") for n in nodes)
        accepted = "not decided yet (nodes still running)" if undecided else "none"
    return (
        f"Generation {generation}: {len(nodes)} candidate{'s' * (len(nodes) != 1)} from parent "
        f"{_node_list(parents)}; accepted: {accepted}"
    )


def _node_list(numbers: list[int]) -> str:
    """'node 3', 'nodes 3, 4', or '' (the word says these are node numbers, not counts)."""
    if not numbers:
        return ""
    return f"node{'s' * (len(numbers) != 1)} {', '.join(map(str, numbers))}"


def _search_latency(view: RunView) -> Callable[[Node], float | None] | None:
    """A node's latency as the search measured it (--shrink's measurement, which every search takes
    of its root and final model), when the run has it for both; else None."""
    table = view.latency_ms or {}
    root, final = view.root, view.final
    if root is None or final is None or not {spec_key(root.spec), spec_key(final.spec)} <= set(table):
        return None
    return lambda n: table[spec_key(n.spec)]


def root_vs_final_table(view: RunView) -> pd.DataFrame:
    """Root vs final model: architecture, size, cost and accuracy, with the change between them; the
    batch-1 CPU latency (the deployment figure, else the search's own measurement), and the other
    CPU deployment figures when the run measured them for both."""
    root, final = view.root, view.final
    # row label: (the node's figure, how it is shown, the word for the change; None: no change shown)
    rows = {
        "architecture": (lambda n: n.spec, lambda spec: spec.summary(), None),
        "params": (_params, lambda v: f"{int(v):,}", "smaller"),
        "bytes": (lambda n: n.spec.state_bytes(), lambda v: _si(v, "B"), "smaller"),
        "FLOPs": (_flops, _si, "fewer"),
        "validation accuracy %": (lambda n: n.val_acc, lambda v: _num(v, ".2f"), "drop"),
        "test accuracy %": (lambda n: n.test_acc, lambda v: _num(v, ".2f"), "drop"),
    }
    deployed = (
        root is not None
        and final is not None
        and _measured(root, "latency_ms_b1")
        and _measured(final, "latency_ms_b1")
    )
    threads = _num(final.deploy.get("cpu_threads"), ".0f") if deployed else "1"
    threads = f"{threads} thread{'s' * (threads != '1')}"
    searched = _search_latency(view)
    if deployed:
        rows[f"CPU latency, batch 1, {threads} (ms)"] = (
            _deploy_figure("latency_ms_b1"),
            lambda v: _num(v, ".2f"),
            "faster",
        )
    elif searched is not None:  # the search times its root and final model whatever its --shrink
        rows["CPU latency, batch 1, 1 thread (ms)"] = (searched, lambda v: _num(v, ".3f"), "faster")
    if deployed:
        rows[f"CPU throughput, batch 64, {threads} (img/s)"] = (
            _deploy_figure("throughput_b64"),
            lambda v: _num(v, ",.0f"),
            "more",
        )
        rows["ONNX file"] = (_deploy_figure("onnx_bytes"), lambda v: _si(v, "B"), "smaller")
    cols = {}
    for label, n in (
        (f"root (#{root.node})" if root is not None else "root", root),
        (f"final (#{final.node})" if final is not None else "final", final),
    ):
        cols[label] = ["—" if n is None else show(figure(n)) for figure, show, _ in rows.values()]
    both = root is not None and final is not None
    cols["change"] = [
        _change(figure(root), figure(final), word) if both else "" for figure, _, word in rows.values()
    ]
    return pd.DataFrame(cols, index=list(rows))


def _change(root_value, final_value, word: str | None) -> str:
    """The change column of root_vs_final_table: '' where there is nothing to compare."""
    if (
        word is None
        or _missing(root_value)
        or _missing(final_value)
        or (word != "drop" and not (root_value and final_value))
    ):  # ratios: nothing to divide by
        return ""
    if word == "drop":
        return f"drop {_num(root_value - final_value, '.2f')} pts"
    if word == "more":  # throughput: higher is better
        return f"{final_value / root_value:.2f}× {word}"
    return f"{_smaller(root_value, final_value):.2f}× {word}"


def facts(view: RunView) -> list[tuple[str, str]]:
    """The one-line answers: why it stopped, how long it took, how many nodes of each kind."""
    counts = Counter(view.status.values())
    kinds = ", ".join(
        f"{counts[s]} {s}"
        for s in ("accepted", "rejected", "failed", "pruned", "running", "queued")
        if s in counts
    )
    trained = _duration(sum(n.seconds or 0 for n in view.nodes.values()))
    if view.wall_seconds is not None:
        wall = _duration(view.wall_seconds)
    elif view.span_seconds is not None:
        wall = (
            f"not recorded; {_duration(view.span_seconds)} from the first node's start to the last one's end "
            f"(training alone: {trained})"
        )
    else:
        wall = f"not recorded (training alone: {trained})"
    c = view.config
    out = [
        ("stopped because", view.stop_reason or "not recorded (the run has not finished)"),
        ("total wall time", wall),
        ("nodes", f"{len(view.nodes)} over {view.generations} generations ({kinds or 'root only'})"),
    ]
    backed_off = sum(r["outcome"] == "backed-off" for r in view.steps)
    if view.steps:
        out.append(("attempts", f"{len(view.steps)} ({backed_off} backed off to a smaller step)"))
    if polish_line(view):
        out.append(("polish", polish_line(view)))
    if c:
        out.append(
            (
                "variant",
                f"{c.get('variant')} (children {c.get('children')}, beam {c.get('beam')}, "
                f"select {c.get('select')})",
            )
        )
        out.append(("budget", f"--max-drop {c.get('max_drop')} validation accuracy points vs the root"))
    root = view.root
    if root is not None and root.frozen:
        out.append(("frozen teachers", frozen_line(root)))
    smaller = _headline(view)
    if smaller:
        out.append(("smaller", smaller))
    if view.int8:
        out.append(("int8", int8_line(view.int8)))
    epochs = epochs_summary(list(view.nodes.values()))
    if epochs:
        out.append(("epochs", epochs))
    return out


def frozen_line(root: Node) -> str:
    """What the root's frozen teachers are, and what node 0 stands for when they made it."""
    teachers = "; ".join(
        f"{r['source']} ({r['params']:,} params, validation {r['val_acc']:.2f} %)" for r in root.frozen
    )
    if root.vgg_val_acc is None:
        return f"{teachers}: they teach wherever the root teaches"
    return (
        f"{teachers}. Node 0 stands for them: its accuracy is the best teacher's (the reference for the "
        f"budget); its VGG, trained by KD from them, reached {root.vgg_val_acc:.2f} % on validation"
    )


def _headline(view: RunView) -> str:
    """How much smaller the final model is in the run's --shrink measure (runs saved before --shrink
    existed measured parameters); empty without a root and a final model."""
    root, final = view.root, view.final
    name = view.config.get("shrink", "params")
    if root is None or final is None or name not in SIZES:
        return ""
    measure = SIZES[name]
    size = _search_latency(view) if measure.of_spec is None else (lambda n: measure.of_spec(n.spec))
    if size is None:
        return ""
    how = "batch-1 CPU latency as the search measured it" if measure.of_spec is None else measure.noun
    return f"{_smaller(size(root), size(final)):.2f}× {measure.fewer} (--shrink {name}: {how})"


def settings_table(view: RunView) -> pd.DataFrame:
    c = view.config
    rows = [
        (k.replace("_", "-"), redact_url(str(c[k])) if k == "storage" and c[k] else str(c[k]))
        for k in SETTINGS
        if k in c and c[k] is not None
    ]
    return pd.DataFrame(rows, columns=["setting", "value"])


# -- writing --------------------------------------------------------------------------------------------


def write_report(run_dir: str | Path, *, storage: str | None = None, fmt: str = "csv") -> Report:
    """Write RUN/report.html (self-contained), RUN/report.md with lineage.svg and pareto.png beside
    it, and the lineage table (lineage.csv, plus lineage.parquet with fmt='parquet')."""
    if fmt not in FORMATS:
        raise IterkdError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "parquet" and not _has_pyarrow():
        raise IterkdError("--format parquet needs pandas' pyarrow backend: pip install 'iterkd[parquet]'")
    run = open_run(run_dir, storage)
    view = run_view(run)
    run_dir = view.run_dir
    # The one place the lineage becomes a table of strings, and only to be written: the report itself
    # is drawn from `view`'s nodes.
    frame = lineage_frame(run.study)
    tables = [run_dir / "lineage.csv"]
    write_atomic(tables[0], frame.to_csv(index=False))
    if fmt == "parquet":
        tables.append(run_dir / "lineage.parquet")
        tmp = run_dir / f".lineage.parquet.{os.getpid()}.tmp"
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, tables[1])
    tree_svg = _render(tree_figure(view), "svg")
    plot_png = _render(pareto_figure(view), "png")
    write_atomic(run_dir / "lineage.svg", tree_svg.decode())
    _write_bytes(run_dir / "pareto.png", plot_png)
    write_atomic(run_dir / "report.html", render_html(view, tree_svg, plot_png))
    write_atomic(run_dir / "report.md", render_markdown(view))
    return Report(
        run_dir / "report.html",
        run_dir / "report.md",
        run_dir / "lineage.svg",
        run_dir / "pareto.png",
        tuple(tables),
        view.gaps,
    )


def _has_pyarrow() -> bool:
    return importlib.util.find_spec("pyarrow") is not None


def _render(fig: Figure, fmt: str) -> bytes:
    buf = io.BytesIO()
    # Fixed salt and no date: the same study gives byte-identical images.
    with matplotlib.rc_context({"svg.hashsalt": "iterkd", "svg.fonttype": "path"}):
        fig.savefig(buf, format=fmt, metadata={"Date": None} if fmt == "svg" else {"Software": None})
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


_CSS = """
body{overflow-x:hidden;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#222;margin:0;background:#fafafa}
main{max-width:1400px;margin:0 auto;padding:18px 28px 40px}
h1{font-size:24px;margin:4px 0}h2{margin:28px 0 8px;border-bottom:1px solid #ddd}h3{font-size:15px;margin:18px 0 6px}
.sub{color:#666;margin:0 0 12px}
.gaps{background:#fff4e5;border:1px solid #f0b36b;border-radius:6px;padding:8px 14px;margin:12px 0}
.cards{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;margin:0;max-width:640px}
dl.facts dt{font-weight:600;color:#444}dl.facts dd{margin:0}
table{border-collapse:collapse;font-size:12.5px;background:#fff}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f0f0f0}td:nth-child(4),td:nth-child(5){text-align:left}
table.summary td,table.summary th{text-align:left;font-size:13.5px}
.scroll{overflow-x:auto;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px}
.bleed{margin:0 calc(50% - 50vw + 12px)}  /* a wide tree may use the whole window */
.wide{overflow-x:auto}
.scroll img{max-width:none;display:block;margin:0 auto}
img.plot{max-width:100%;background:#fff;border:1px solid #ddd;border-radius:6px}
.st{padding:1px 6px;border-radius:8px;border:1px solid}
"""


def _status_span(status: str) -> str:
    fill, edge, _ = STATUS_STYLE.get(status, STATUS_STYLE["rejected"])
    return f'<span class="st" style="background:{fill};border-color:{edge}">{html.escape(status)}</span>'


def _html_table(df: pd.DataFrame, cls: str = "nodes", index: bool = False) -> str:
    """pandas' HTML table with every cell escaped and the status cells drawn in their colours."""
    safe = df.apply(lambda col: col.map(lambda v: html.escape(str(v))))
    safe.index = [html.escape(str(i)) for i in df.index]
    if "status" in df:
        safe["status"] = [_status_span(s) for s in df.status]
    return safe.to_html(index=index, escape=False, border=0, classes=cls)


def render_html(view: RunView, tree_svg: bytes, plot_png: bytes) -> str:
    """One self-contained page: both images inline as data URIs, no script, no network fetch."""
    esc = html.escape
    tree_fig_w, tree_fig_h = _svg_size_px(tree_svg)
    gaps = ""
    if view.gaps:
        gaps = (
            "<div class='gaps' id='gaps'><b>Partial report</b>: the run's study does not record"
            + "".join(f"<li>{esc(g)}</li>" for g in view.gaps).join(("<ul>", "</ul>"))
            + "</div>"
        )
    facts_html = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts(view))
    generations = "".join(
        f"<h3>{esc(h)}</h3><div class='wide'>{_html_table(t)}</div>" for h, t in generation_tables(view)
    )
    steps = steps_table(view)
    steps_html = (
        f"<div class='wide'>{_html_table(steps)}</div>"
        if len(steps)
        else "<p class='sub'>No attempt recorded (a run made before steps were recorded, or one that "
        "stopped before its first generation).</p>"
    )
    c = view.config
    subtitle = " · ".join(
        esc(str(x)) for x in (view.run_dir, c.get("dataset"), c.get("space"), c.get("variant")) if x
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>iterkd report: {esc(view.name)}</title>
<style>{_CSS}</style></head>
<body><main>
<h1>iterkd run <code>{esc(view.name)}</code></h1>
<p class="sub">{subtitle}</p>
{gaps}
<section id="summary"><h2>Summary</h2>
<div class="cards"><div>{_html_table(root_vs_final_table(view), "summary", index=True)}</div>
<dl class="facts">{facts_html}</dl></div>
</section>
<section id="lineage"><h2>Lineage tree</h2>
<div class="scroll{" bleed" if tree_fig_w > 1340 else ""}"><img id="tree" alt="lineage tree of run {esc(view.name)}" width="{tree_fig_w}" height="{tree_fig_h}"
 src="data:image/svg+xml;base64,{base64.b64encode(tree_svg).decode()}"></div>
</section>
<section id="pareto"><h2>Accuracy vs size</h2>
<img id="plot" class="plot" alt="validation accuracy vs parameters and FLOPs"
 src="data:image/png;base64,{base64.b64encode(plot_png).decode()}">
</section>
<section id="steps"><h2>Steps and back-offs</h2>{steps_html}</section>
<section id="generations"><h2>Generations</h2>{generations}</section>
<section id="settings"><h2>Settings</h2>{_html_table(settings_table(view), "summary")}</section>
<p class="sub">Written by <code>iterkd report</code> from the run's Optuna study; the machine-readable table
is <code>lineage.csv</code> beside this file.</p>
</main></body></html>
"""


def _svg_size_px(svg: bytes) -> tuple[int, int]:
    """matplotlib writes width/height in pt; browsers show 1 pt as 4/3 px."""
    head = svg[:2000].decode(errors="replace")
    w, h = (float(re.search(rf'{k}="([\d.]+)pt"', head).group(1)) for k in ("width", "height"))
    return round(w * 4 / 3), round(h * 4 / 3)


def _markdown_table(df: pd.DataFrame, index: bool = False) -> str:
    cols = ([""] if index else []) + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i, row in zip(df.index, df.itertuples(index=False)):
        cells = ([str(i)] if index else []) + [str(v) for v in row]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def render_markdown(view: RunView) -> str:
    """The summary and tables for a README or PR, with the images as files beside it."""
    parts = [f"# iterkd run `{view.name}`", ""]
    if view.gaps:
        parts += (
            ["**Partial report**: the run's study does not record", ""] + [f"- {g}" for g in view.gaps] + [""]
        )
    parts += ["## Summary", "", _markdown_table(root_vs_final_table(view), index=True), ""]
    parts += [f"- **{k}**: {v}" for k, v in facts(view)] + [""]
    parts += [
        "## Lineage tree",
        "",
        "![lineage tree](lineage.svg)",
        "",
        "## Accuracy vs size",
        "",
        "![validation accuracy vs parameters and FLOPs](pareto.png)",
        "",
        "## Steps and back-offs",
        "",
        _markdown_table(steps_table(view)) if view.steps else "No attempt recorded.",
        "",
        "## Generations",
        "",
    ]
    for heading, table in generation_tables(view):
        parts += [f"### {heading}", "", _markdown_table(table), ""]
    parts += compare_section(view.run_dir)
    parts += ["## Settings", "", _markdown_table(settings_table(view)), ""]
    return "\n".join(parts)


def compare_section(run_dir: Path) -> list[str]:
    """`iterkd compare`'s table and verdict (RUN/compare.md, when compare has run) as a section."""
    path = run_dir / "compare.md"
    if not path.is_file():
        return []
    body = path.read_text().partition("\n")[2].strip()  # its own '# ...' title gives way to this heading
    return ["## Against the alternatives (`iterkd compare`)", "", body, ""]
