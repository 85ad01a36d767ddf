"""The lineage tree as a view of the run's Optuna study: one trial per trained node, its record in
the trial's user attributes, the accepted nodes of each generation in the study's user attributes."""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import optuna
import pandas as pd

from .arch import VGGSpec
from .errors import IterkdError

LINEAGE_COLUMNS = ["node", "generation", "parents", "teachers", "operator", "spec", "params", "bytes", "flops",
                   "val_acc", "test_acc", "drop", "status", "seconds", "epochs", "alpha", "temperature",
                   "hint_weight", "checkpoint", "error"]
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
    epochs: int = 0
    checkpoint: str | None = None
    error: str = ""
    failure: str = ""  # "diverged" (NaN/inf loss: not retried); empty for an interrupted trial
    loss: dict = field(default_factory=dict)
    history: tuple[float, ...] = ()
    deploy: dict = field(default_factory=dict)  # DEPLOY_COLUMNS that were measured
    members: tuple[dict, ...] = ()  # an ensemble root's models: checkpoint, spec_summary, params, val_acc, test_acc

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETE" and self.val_acc is not None

    @classmethod
    def from_trial(cls, t: optuna.trial.FrozenTrial) -> "Node | None":
        a = t.user_attrs
        if "spec" not in a:
            return None
        return cls(node=t.number, state=t.state.name, generation=int(a["generation"]),
                   parents=tuple(a.get("parents", ())), teachers=tuple(a.get("teachers", ())),
                   operator=a.get("operator", ""), spec=VGGSpec.from_json(a["spec"]), key=a.get("key", ""),
                   val_acc=a.get("val_acc"), test_acc=a.get("test_acc"), seconds=a.get("seconds"),
                   epochs=int(a.get("epochs", 0)), checkpoint=a.get("checkpoint"),
                   error=a.get("error", "interrupted" if t.state.name == "FAIL" else ""), failure=a.get("failure", ""),
                   loss=a.get("loss", {}), history=tuple(a.get("history", ())),
                   deploy={k: a[k] for k in DEPLOY_COLUMNS if k in a}, members=tuple(a.get("members", ())))


NODE_ATTRS = ("generation", "parents", "teachers", "operator", "spec", "spec_summary", "params", "bytes", "flops",
              "key", "loss", "epochs")  # what node_attrs writes: all a worker needs to train a queued node


def node_attrs(*, generation: int, parents, teachers, operator: str, spec: VGGSpec, key: str,
               loss: dict | None = None, epochs: int = 0) -> dict:
    """User attributes a trial gets when its node starts: who it comes from and what it is."""
    return {"generation": generation, "parents": list(parents), "teachers": list(teachers), "operator": operator,
            "spec": spec.to_json(), "spec_summary": spec.summary(), "params": spec.params(),
            "bytes": spec.state_bytes(), "flops": spec.flops(), "key": key, "loss": loss or {}, "epochs": epochs}


# -- storage ------------------------------------------------------------------------------------

def redact_url(url: str) -> str:
    """The storage URL with any password replaced by '***', for logs, reports and the lineage."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc[-1]}"))


def default_storage(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / 'study.db').resolve()}"


HEARTBEAT_S = 10  # a worker's heartbeat interval (seconds)
GRACE_S = 60  # a RUNNING trial without a heartbeat for this long belongs to a dead worker


def open_study(storage: str, name: str, *, create: bool = True, directions: tuple[str, ...] = ("maximize",),
               sampler: optuna.samplers.BaseSampler | None = None,
               pruner: optuna.pruners.BasePruner | None = None, heartbeat: bool = False) -> optuna.Study:
    """Open (or create) the run's study; bad or unreachable storage URLs become one-line errors.
    Samplers and pruners are not stored by Optuna: every process passes its own. `heartbeat`: a
    coordinator's view, which fails RUNNING trials whose worker stopped beating (docs/distributed.md)."""
    if "://" not in storage:
        raise IterkdError(f"--storage {redact_url(storage)!r} is not a database URL; expected e.g. "
                          "sqlite:///runs/NAME/study.db or postgresql://USER@HOST/DB")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        # Workers record a heartbeat while they train; a trial whose heartbeat is older than the
        # grace period is failed by the coordinator (optuna.storages.fail_stale_trials) and retried.
        beat = dict(heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S) if heartbeat else {}
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since v2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(storage, engine_kwargs=_engine_kwargs(storage), **beat)
        if create:
            return optuna.create_study(storage=rdb, study_name=name, directions=list(directions), sampler=sampler,
                                       pruner=pruner, load_if_exists=True)
        return optuna.load_study(storage=rdb, study_name=name, sampler=sampler, pruner=pruner)
    except KeyError:
        raise IterkdError(f"no run named {name!r} in storage {redact_url(storage)}") from None
    except ImportError as e:
        raise IterkdError(f"storage {redact_url(storage)} needs a database driver that is not installed ({e.name or e}); "
                          "for PostgreSQL: pip install 'iterkd[postgres]'") from None
    except Exception as e:  # SQLAlchemy's errors: bad URL, refused connection, auth failure, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise IterkdError(f"cannot open storage {redact_url(storage)}: {redact_url(first)[:300]}") from None


def _engine_kwargs(storage: str) -> dict:
    if storage.startswith("postgresql"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    if storage.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}  # several local processes may write
    return {}


# -- the view -------------------------------------------------------------------------------------

def nodes(study: optuna.Study) -> list[Node]:
    """Every node of the study. A node whose checkpoint was found damaged (study attribute `damaged`)
    reads as failed: it is trained again, and never used as a teacher or parent."""
    damaged = set(study.user_attrs.get("damaged", ()))
    out = []
    for t in study.get_trials(deepcopy=False):
        n = Node.from_trial(t)
        if n is not None and n.node in damaged:
            n = replace(n, state="FAIL", error=f"checkpoint {n.checkpoint} was found damaged", failure="damaged")
        if n is not None:
            out.append(n)
    return out


def selections(study: optuna.Study) -> dict[int, list[int]]:
    """Accepted node ids per generation (the parents of the next generation)."""
    return {int(g): list(ids) for g, ids in study.user_attrs.get("selections", {}).items()}


def set_selection(study: optuna.Study, generation: int, node_ids: list[int], by: str = "search") -> None:
    sel = study.user_attrs.get("selections", {})
    sel[str(generation)] = list(node_ids)
    study.set_user_attr("selections", sel)
    log = study.user_attrs.get("selection_log", [])
    study.set_user_attr("selection_log", log + [{"generation": generation, "nodes": list(node_ids), "by": by}])


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
    accepted = {i for ids in selections(study).values() for i in ids}
    rows = []
    for n in all_nodes:
        drop = None if (root is None or n.val_acc is None) else round(root.val_acc - n.val_acc, 4)
        rows.append({
            "node": n.node, "generation": n.generation, "parents": json.dumps(list(n.parents)),
            "teachers": json.dumps(list(n.teachers)), "operator": n.operator, "spec": n.spec.to_json(),
            "params": n.spec.params(), "bytes": n.spec.state_bytes(), "flops": n.spec.flops(),
            "val_acc": n.val_acc, "test_acc": n.test_acc, "drop": drop, "status": node_status(n, accepted),
            "seconds": n.seconds, "epochs": n.epochs, "alpha": n.loss.get("alpha"),
            "temperature": n.loss.get("temperature"), "hint_weight": n.loss.get("hint_weight"),
            "checkpoint": n.checkpoint, "error": n.error, **{k: n.deploy.get(k) for k in DEPLOY_COLUMNS}})
    return pd.DataFrame(rows, columns=LINEAGE_COLUMNS)


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_lineage_csv(study: optuna.Study, path: Path) -> pd.DataFrame:
    df = lineage_frame(study)
    write_atomic(Path(path), df.to_csv(index=False))
    return df


# -- dashboard notes ------------------------------------------------------------------------------

def lineage_card(n: Node, root: Node | None, status: str | None = None) -> str:
    """A node's Markdown card for the Optuna dashboard's trial note."""
    status = status or {"COMPLETE": "trained", "FAIL": "failed", "PRUNED": "pruned"}.get(n.state, n.state.lower())
    size = n.spec.params()
    ratio = f" ({root.spec.params() / size:.1f}x smaller than the root)" if root is not None and n.generation else ""
    acc = "—" if n.val_acc is None else f"{n.val_acc:.2f} % val, {n.test_acc:.2f} % test"
    drop = "" if root is None or n.val_acc is None or not n.generation else f"{root.val_acc - n.val_acc:+.2f} pts"
    rows = [("status", status), ("generation", n.generation),
            ("parent", ", ".join(map(str, n.parents)) or "—"), ("teachers", ", ".join(map(str, n.teachers)) or "—"),
            ("made by", f"`{n.operator}`"), ("architecture", f"`{n.spec.summary()}`"),
            ("params", f"{size:,}{ratio}"), ("bytes (fp32)", f"{n.spec.state_bytes():,}"),
            ("FLOPs / image", f"{n.spec.flops():,}"), ("accuracy", acc), ("drop vs root", drop or "—"),
            ("KD settings", ", ".join(f"{k}={v:g}" for k, v in n.loss.items()) or "labels only"),
            ("epochs", n.epochs), ("error", n.error or "—")]
    lines = [f"## Node {n.node}", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def set_status(study: optuna.Study, number: int, status: str) -> bool:
    """Record a node's status (root/accepted/rejected/failed/pruned) as its trial's `status` user
    attribute, for the dashboard. Acceptance is decided after the trial has ended, and Optuna's API
    refuses to change a finished trial, so this writes the attribute row through Optuna's RDB models
    (the storage iterkd always uses). Reports and lineage.csv compute the status from the study's
    selections, so if this fails (another storage, a schema change) only the dashboard column is
    missing: returns False then."""
    try:
        from optuna.storages._rdb import models

        backend = getattr(study._storage, "_backend", study._storage)  # noqa: SLF001 - under the trial cache
        trial_id = study.get_trials(deepcopy=False)[number]._trial_id  # noqa: SLF001
        session = backend.scoped_session()
        try:
            row = session.query(models.TrialUserAttributeModel).filter_by(trial_id=trial_id, key="status").one_or_none()
            if row is None:
                session.add(models.TrialUserAttributeModel(trial_id=trial_id, key="status", value_json=json.dumps(status)))
            else:
                row.value_json = json.dumps(status)
            session.commit()
        except Exception:
            session.rollback()
            raise
        finally:
            session.close()
    except Exception:
        return False
    return True


def write_note(study: optuna.Study, number: int, body: str) -> None:
    """Set a trial's dashboard note; notes live in study attributes, so this works after the trial ended."""
    from optuna_dashboard import save_note

    frozen = study.get_trials(deepcopy=False)[number]
    save_note(optuna.trial.Trial(study, frozen._trial_id), body)  # Trial is only a handle here: no state change
