"""The lineage tree as a view of the run's Optuna study: one trial per trained node, its record in
the trial's user attributes, the accepted nodes of each generation in the study's user attributes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
import pandas as pd

from .arch import VGGSpec
from .files import write_atomic
from .storage import trial_handle

LINEAGE_COLUMNS = [
    "node",
    "generation",
    "parents",
    "teachers",
    "operator",
    "spec",
    "params",
    "bytes",
    "flops",
    "val_acc",
    "test_acc",
    "drop",
    "status",
    "seconds",
    "epochs",
    "epochs_trained",
    "alpha",
    "temperature",
    "hint_weight",
    "checkpoint",
    "error",
]
# Deployment figures the search records per node (iterkd.deploy.node_figures); empty when turned off.
DEPLOY_COLUMNS = ["latency_ms_b1", "throughput_b64", "cpu_threads", "onnx_bytes"]
LINEAGE_COLUMNS += DEPLOY_COLUMNS


@dataclass(frozen=True)
class Node:
    """One trained (or failed) model of the lineage, read back from its trial."""

    node: int
    state: str  # Optuna trial state: COMPLETE, FAIL, PRUNED, RUNNING, WAITING
    generation: int
    parents: tuple[int, ...]
    teachers: tuple[int, ...]
    operator: str
    spec: VGGSpec
    key: str = ""
    val_acc: float | None = None
    test_acc: float | None = None
    seconds: float | None = None
    epochs: int = 0  # planned
    epochs_trained: int | None = None  # fewer when a pruner stopped it; None: not recorded (older runs)
    checkpoint: str | None = None
    error: str = ""
    failure: str = ""  # "diverged" (NaN/inf loss: not retried); empty for an interrupted trial
    loss: dict = field(default_factory=dict)
    history: tuple[float, ...] = ()
    deploy: dict = field(default_factory=dict)  # DEPLOY_COLUMNS that were measured
    members: tuple[
        dict, ...
    ] = ()  # an ensemble root's models: checkpoint, spec_summary, params, val_acc, test_acc
    # The root's frozen teachers (importers.frozen): file (in the run), source, kind, sha256, params,
    # val_acc, test_acc. They teach wherever the root teaches.
    frozen: tuple[dict, ...] = ()
    # A root made by KD from frozen teachers alone: its val_acc/test_acc are the best teacher's (the
    # reference for --max-drop), these the generation-0 VGG's own.
    vgg_val_acc: float | None = None
    vgg_test_acc: float | None = None

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETE" and self.val_acc is not None

    @classmethod
    def from_trial(cls, t: optuna.trial.FrozenTrial) -> Node | None:
        a = t.user_attrs
        if "spec" not in a:
            return None
        return cls(
            node=t.number,
            state=t.state.name,
            generation=int(a["generation"]),
            parents=tuple(a.get("parents", ())),
            teachers=tuple(a.get("teachers", ())),
            operator=a.get("operator", ""),
            spec=VGGSpec.from_json(a["spec"]),
            key=a.get("key", ""),
            val_acc=a.get("val_acc"),
            test_acc=a.get("test_acc"),
            seconds=a.get("seconds"),
            epochs=int(a.get("epochs", 0)),
            epochs_trained=a.get("epochs_trained"),
            checkpoint=a.get("checkpoint"),
            error=a.get("error", "interrupted" if t.state.name == "FAIL" else ""),
            failure=a.get("failure", ""),
            loss=a.get("loss", {}),
            history=tuple(a.get("history", ())),
            deploy={k: a[k] for k in DEPLOY_COLUMNS if k in a},
            members=tuple(a.get("members", ())),
            frozen=tuple(a.get("frozen", ())),
            vgg_val_acc=a.get("vgg_val_acc"),
            vgg_test_acc=a.get("vgg_test_acc"),
        )


NODE_ATTRS = (
    "generation",
    "parents",
    "teachers",
    "operator",
    "spec",
    "spec_summary",
    "params",
    "bytes",
    "flops",
    "key",
    "loss",
    "epochs",
)  # what node_attrs writes: all a worker needs to train a queued node


def node_attrs(
    *,
    generation: int,
    parents,
    teachers,
    operator: str,
    spec: VGGSpec,
    key: str,
    loss: dict | None = None,
    epochs: int = 0,
) -> dict:
    """User attributes a trial gets when its node starts: who it comes from and what it is."""
    return {
        "generation": generation,
        "parents": list(parents),
        "teachers": list(teachers),
        "operator": operator,
        "spec": spec.to_json(),
        "spec_summary": spec.summary(),
        "params": spec.params(),
        "bytes": spec.state_bytes(),
        "flops": spec.flops(),
        "key": key,
        "loss": loss or {},
        "epochs": epochs,
    }


# -- the view -------------------------------------------------------------------------------------


def nodes(study: optuna.Study) -> list[Node]:
    """Every node of the study. A node whose checkpoint was found damaged (study attribute `damaged`)
    reads as failed: it is trained again, and never used as a teacher or parent."""
    damaged = set(study.user_attrs.get("damaged", ()))
    out = []
    for t in study.get_trials(deepcopy=False):
        n = Node.from_trial(t)
        if n is not None and n.node in damaged:
            n = replace(
                n, state="FAIL", error=f"checkpoint {n.checkpoint} was found damaged", failure="damaged"
            )
        if n is not None:
            out.append(n)
    return out


# Accuracies are 100 * correct / n, so a drop exactly at the budget can come out a few ulps above it
# (90.04 - 89.74 = 0.30000000000000426); drops within this many points of --max-drop count as within.
BUDGET_TOLERANCE_PTS = 1e-9


def within_budget(drop_pts: float, max_drop_pts: float) -> bool:
    """The one budget test: stop rule, selection, the `budget` attribute and the trial's constraint."""
    return drop_pts <= max_drop_pts + BUDGET_TOLERANCE_PTS


def selections(study: optuna.Study) -> dict[int, list[int]]:
    """Accepted node ids per generation (the parents of the next generation)."""
    return {int(g): list(ids) for g, ids in study.user_attrs.get("selections", {}).items()}


def accepted(study: optuna.Study) -> set[int]:
    """Every node some generation accepted (selected as a parent of the next), and the polish when
    it was kept as the final model."""
    kept = study.user_attrs.get("polish") or {}
    return {i for ids in selections(study).values() for i in ids} | (
        {kept["node"]} if kept.get("kept") else set()
    )


POLISH = "polish"  # the operator (and key prefix) of a polish node: the final model trained on


def polish_record(study: optuna.Study) -> dict:
    """The last polish's decision: node, from (the node it polished), epochs, kept, gain (validation
    points over `from`; None when it failed); empty when the run has no polish."""
    return dict(study.user_attrs.get("polish") or {})


def record_polish(study: optuna.Study, record: dict) -> None:
    """Record whether the polish is the final model (decided after it finished, like a selection)."""
    study.set_user_attr("polish", record)


def set_selection(study: optuna.Study, generation: int, node_ids: list[int], by: str = "search") -> None:
    """Accept `node_ids` as generation `generation`'s parents of the next; logged with who chose."""
    sel = selections(study)
    sel[generation] = list(node_ids)
    _write_selections(study, sel)
    log = study.user_attrs.get("selection_log", [])
    study.set_user_attr(
        "selection_log", log + [{"generation": generation, "nodes": list(node_ids), "by": by}]
    )


def drop_selections(study: optuna.Study, *, from_generation: int) -> None:
    """Forget the selections of `from_generation` onwards (they are decided again); the log keeps them."""
    _write_selections(study, {g: ids for g, ids in selections(study).items() if g < from_generation})


def _write_selections(study: optuna.Study, sel: dict[int, list[int]]) -> None:
    study.set_user_attr("selections", {str(g): list(ids) for g, ids in sorted(sel.items())})


def ancestry(all_nodes: list[Node], node: Node) -> list[Node]:
    """The chain root, ..., node along first parents."""
    by_id = {n.node: n for n in all_nodes}
    chain = [node]
    while chain[-1].parents:
        chain.append(by_id[chain[-1].parents[0]])
    return chain[::-1]


def root_node(all_nodes: list[Node]) -> Node | None:
    roots = [n for n in all_nodes if n.generation == 0 and n.ok]
    return roots[-1] if roots else None


def node_status(n: Node, accepted: set[int]) -> str:
    if n.state in ("FAIL", "PRUNED", "RUNNING", "WAITING"):
        return {"FAIL": "failed", "PRUNED": "pruned", "RUNNING": "running", "WAITING": "queued"}[n.state]
    if n.generation == 0:
        return "root"
    return "accepted" if n.node in accepted else "rejected"


def lineage_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per node with the columns of LINEAGE_COLUMNS (drop in accuracy points vs the root)."""
    all_nodes = nodes(study)
    root = root_node(all_nodes)
    chosen = accepted(study)
    rows = []
    for n in all_nodes:
        drop = None if (root is None or n.val_acc is None) else round(root.val_acc - n.val_acc, 4)
        rows.append(
            {
                "node": n.node,
                "generation": n.generation,
                "parents": json.dumps(list(n.parents)),
                "teachers": json.dumps(list(n.teachers)),
                "operator": n.operator,
                "spec": n.spec.to_json(),
                "params": n.spec.params(),
                "bytes": n.spec.state_bytes(),
                "flops": n.spec.flops(),
                "val_acc": n.val_acc,
                "test_acc": n.test_acc,
                "drop": drop,
                "status": node_status(n, chosen),
                "seconds": n.seconds,
                "epochs": n.epochs,
                "epochs_trained": n.epochs_trained,
                "alpha": n.loss.get("alpha"),
                "temperature": n.loss.get("temperature"),
                "hint_weight": n.loss.get("hint_weight"),
                "checkpoint": n.checkpoint,
                "error": n.error,
                **{k: n.deploy.get(k) for k in DEPLOY_COLUMNS},
            }
        )
    return pd.DataFrame(rows, columns=LINEAGE_COLUMNS)


def write_lineage_csv(study: optuna.Study, path: Path) -> pd.DataFrame:
    df = lineage_frame(study)
    write_atomic(Path(path), df.to_csv(index=False))
    return df


# -- dashboard notes ------------------------------------------------------------------------------


def test_text(test_acc: float | None) -> str:
    """A node's test accuracy in words: a folder without test/ has none."""
    return "no test set" if test_acc is None else f"test {test_acc:.2f}%"


def lineage_card(n: Node, root: Node | None, status: str | None = None) -> str:
    """A node's Markdown card for the Optuna dashboard's trial note."""
    status = status or {"COMPLETE": "trained", "FAIL": "failed", "PRUNED": "pruned"}.get(
        n.state, n.state.lower()
    )
    size = n.spec.params()
    ratio = (
        f" ({root.spec.params() / size:.1f}x smaller than the root)"
        if root is not None and n.generation
        else ""
    )
    acc = "—" if n.val_acc is None else f"{n.val_acc:.2f} % val, {test_text(n.test_acc)}"
    drop = (
        ""
        if root is None or n.val_acc is None or not n.generation
        else f"{root.val_acc - n.val_acc:+.2f} pts"
    )
    rows = [
        ("status", status),
        ("generation", n.generation),
        ("parent", ", ".join(map(str, n.parents)) or "—"),
        ("teachers", ", ".join(map(str, n.teachers)) or "—"),
        ("made by", f"`{n.operator}`"),
        ("architecture", f"`{n.spec.summary()}`"),
        ("params", f"{size:,}{ratio}"),
        ("bytes (fp32)", f"{n.spec.state_bytes():,}"),
        ("FLOPs / image", f"{n.spec.flops():,}"),
        ("accuracy", acc),
        ("drop vs root", drop or "—"),
        ("KD settings", ", ".join(f"{k}={v:g}" for k, v in n.loss.items()) or "labels only"),
        ("epochs", epochs_text(n)),
        ("error", n.error or "—"),
    ]
    lines = [f"## Node {n.node}", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def epochs_text(n: Node) -> str:
    """'4', or '3 of 4' for a node a pruner stopped early."""
    if n.epochs_trained is None or n.epochs_trained == n.epochs:
        return str(n.epochs)
    return f"{n.epochs_trained} of {n.epochs}"


def int8_line(record: dict) -> str:
    """The int8 model a `--final int8` search recorded (study attribute `int8`), in one line: root
    fp32 against final int8 in bytes and batch-1 latency, and its accuracy against the budget."""
    r = record
    where = f"int8 of node {r['node']} ({r['method'].upper()}, {r['path']}): "
    if r.get("root_fp32_bytes"):
        where += (
            f"{r['root_fp32_bytes']:,} B root fp32 -> {r['bytes']:,} B "
            f"({r['root_fp32_bytes'] / r['bytes']:.1f}x fewer bytes), batch-1 onnxruntime "
            f"{r['root_fp32_latency_ms_b1']:.3f} -> {r['latency_ms_b1']:.3f} ms ({r['threads']} thread); "
        )
    else:
        where += f"{r['fp32_bytes']:,} B fp32 -> {r['bytes']:,} B, {r['latency_ms_b1']:.3f} ms batch 1; "
    return where + (
        f"val {r['val_acc']:.2f}%, test {r['test_acc']:.2f}% (drop {r['drop']:.2f} pts, "
        f"{'within' if r['within_budget'] else 'over'} --max-drop {r['max_drop']:g})"
    )


def epochs_summary(all_nodes: list[Node]) -> str:
    """What early stopping (--pruner) saved: the epochs the children trained against their planned
    epochs, and how many were pruned or stopped converged. Empty when no child recorded its epochs."""
    done = [n for n in all_nodes if n.generation and n.epochs_trained is not None and n.state != "FAIL"]
    if not done:
        return ""
    trained, planned = sum(n.epochs_trained for n in done), sum(n.epochs for n in done)
    pruned = sum(n.state == "PRUNED" for n in done)
    converged = sum(n.state == "COMPLETE" and n.epochs_trained < n.epochs for n in done)
    return (
        f"children trained {trained} of {planned} planned epochs ({planned - trained} saved: "
        f"{pruned} pruned, {converged} stopped converged)"
    )


def write_note(study: optuna.Study, number: int, body: str) -> None:
    """Set a trial's dashboard note; notes live in study attributes, so this works after the trial ended."""
    from optuna_dashboard import save_note

    save_note(trial_handle(study, number), body)  # the handle changes no state
