"""One node, one Optuna trial: create the trial with its attributes in one write, train, write the
checkpoint (also the trial's artifact), record the results and finish the trial. The local search
and `iterkd worker` both train through `run_node`; neither knows how the other queues work."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from . import objective
from .checkpoints import load_model, save_checkpoint
from .errors import TrainingDiverged
from .faults import fault_point
from .lineage import Node, lineage_card, nodes, root_node, test_text, within_budget, write_note
from .models import VGG
from .pruning import BudgetPruner, OverBudget
from .run import Run
from .train import TrainResult

Fit = Callable[[VGG, Callable[[int, float], bool]], TrainResult]  # (model, on_epoch) -> result


def owner_attrs() -> dict:
    """Which process trains a trial: a resume on this host fails a RUNNING trial whose pid is gone."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def create_trial(study: optuna.Study, attrs: dict, params: dict | None = None) -> optuna.Trial:
    """A RUNNING trial that carries `attrs` and its owner from its first write: queued with them
    (Optuna's enqueue_trial, one transaction), then taken by `ask`. A kill at any moment leaves
    either nothing or a trial whose owner a resume can check; `params` fixes those choices."""
    study.enqueue_trial(params or {}, user_attrs={**attrs, **owner_attrs()})
    trial = study.ask()  # takes the oldest queued trial: the one just queued (nobody else queues here)
    fault_point("trial-created")
    return trial


def run_node(
    run: Run,
    trial: optuna.Trial,
    model: VGG,
    fit: Fit,
    *,
    parent: Node | None = None,
    log: Callable[[str], None] = print,
    data_meta: dict | None = None,
) -> Node:
    """Train `model` with `fit` as the RUNNING `trial`, then record it. Diverged and pruned nodes
    finish as FAIL/PRUNED; anything else (Ctrl-C, a full disk, a bug) fails the trial and propagates,
    and the candidate is trained again on resume. A child the budget pruner finds converged stops
    training there and is recorded like any other; `epochs_trained` says how far each node got."""
    cfg = run.cfg
    multi_objective = len(run.study.directions) > 1
    pruner = run.study.pruner
    history: list[float] = []

    def on_epoch(epoch: int, val_acc: float) -> bool:
        """True: stop training here, keeping the weights (converged)."""
        history.append(val_acc)
        if parent is None:
            return False
        # Children are compared by how far below their parent they are at each epoch, so the
        # pruner does not cut every child of a later (smaller) generation against earlier ones.
        if not multi_objective:
            trial.report(val_acc - parent.val_acc, epoch)
        if isinstance(pruner, BudgetPruner):  # reads the accuracies itself: any objectives
            reason = pruner.over_budget(run.study, history)
            if reason:
                raise OverBudget(reason)
            return pruner.converged(history)
        if not multi_objective and trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch + 1}: {val_acc:.2f}% is weak against its siblings")
        return False

    try:
        result = fit(model, on_epoch)
        ckpt = Path("checkpoints") / f"node-{trial.number}.safetensors"
        save_checkpoint(
            run.run_dir / ckpt, model, node=trial.number, val_acc=result.val_acc, **(data_meta or {})
        )
        fault_point("checkpoint-written")
        artifact_id = attach(run, trial, run.run_dir / ckpt)
    except TrainingDiverged as e:
        trial.set_user_attr("epochs_trained", len(history))
        return _finish(run, trial, optuna.trial.TrialState.FAIL, log, error=str(e), failure="diverged")
    except optuna.TrialPruned as e:
        trial.set_user_attr("epochs_trained", len(history))
        trial.set_user_attr("history", history)  # how far it got: an over-budget child's drop
        failure = "over-budget" if isinstance(e, OverBudget) else ""
        return _finish(run, trial, optuna.trial.TrialState.PRUNED, log, error=str(e), failure=failure)
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            trial.set_user_attr("error", (str(e).splitlines() or [type(e).__name__])[0][:300])
        run.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    root = root_node(nodes(run.study))
    drop = 0.0 if root is None else root.val_acc - result.val_acc
    figures = {
        "checkpoint": str(ckpt),
        "artifact_id": artifact_id,
        "val_acc": result.val_acc,
        "test_acc": result.test_acc,
        "drop": round(drop, 4),
        "seconds": round(result.seconds, 2),
        "history": result.history,
        "epochs_trained": result.epochs,
        "images_per_s": round(result.images_per_s, 1),
        "budget": "within" if within_budget(drop, cfg.max_drop) else "over",
        "teacher_cache_hit_rate": result.cache_hit_rate,
        "precision": result.precision,
    }
    if cfg.deploy_figures:  # CPU latency/throughput + ONNX size, for the lineage and model cards
        from .deploy import node_figures

        figures.update(node_figures(load_model(run.run_dir / ckpt)))
    for k, v in figures.items():
        trial.set_user_attr(k, v)
    # What Optuna optimises (iterkd.objective): constraints are feasible when <= 0, and a drop at
    # the budget up to float error is exactly 0.
    values, constraints = objective.told(run.study, model.spec.params(), result.val_acc, drop, cfg.max_drop)
    for name, value in constraints.items():
        trial.set_constraint(name, value)
    node = _finish(run, trial, optuna.trial.TrialState.COMPLETE, log, values=values)
    fault_point("trial-told")
    log_node(run, node, log)
    return node


def _finish(
    run: Run,
    trial: optuna.Trial,
    state,
    log: Callable[[str], None],
    *,
    values=None,
    error: str = "",
    failure: str = "",
) -> Node:
    if error:
        trial.set_user_attr("error", error)
        log(f"node {trial.number} {state.name.lower()}: {error}")
    if failure:
        trial.set_user_attr("failure", failure)
    # The dashboard note is written before `tell`, with the node as it will read once told.
    told = replace(Node.from_trial(run.study.get_trials(deepcopy=False)[trial.number]), state=state.name)
    write_note(run.study, trial.number, lineage_card(told, root_node(nodes(run.study))))
    if values is None:
        run.study.tell(trial, state=state)
    else:
        run.study.tell(trial, values)
    return Node.from_trial(run.study.get_trials(deepcopy=False)[trial.number])


def attach(run: Run, trial: optuna.Trial, path: Path) -> str | None:
    """Attach the checkpoint to the trial as an Optuna artifact (downloadable from the
    dashboard); the artifact file is then a hard link to the checkpoint, so it costs no disk."""
    store = FileSystemArtifactStore(str(run.run_dir / "artifacts"))
    artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)
    copy = run.run_dir / "artifacts" / artifact_id
    try:
        tmp = copy.with_name(f".{artifact_id}.link")
        os.link(path, tmp)
        os.replace(tmp, copy)
    except OSError:
        pass  # another filesystem: keep the copy
    return artifact_id


def log_node(run: Run, n: Node, log: Callable[[str], None]) -> None:
    root = root_node(nodes(run.study)) if n.generation else n
    ratio = root.spec.params() / n.spec.params()
    drop = f"drop {root.val_acc - n.val_acc:+.2f} pts" if n.generation else "root"
    log(
        f"gen {n.generation} node {n.node:>3}  {n.operator:<28} {n.spec.params():>11,} params "
        f"({ratio:.1f}x smaller)  val {n.val_acc:.2f}%  {test_text(n.test_acc)}  {drop}  {n.seconds:.0f}s"
    )
