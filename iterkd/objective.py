"""What a run's Optuna study optimises, chosen so that Optuna's own answer is the search's final
model: `study.best_trial` and the dashboard's "Best Trial" badge (single objective), and
`study.best_trials` (--objectives acc,params) among which the final model always is.

The *final path* is the final model and those of its ancestors that have more parameters than it
(the accepted chain root -> final; the node a polish started from has the same size and is left off).

- Single objective: maximise **× smaller** (the root's parameters / the node's) for nodes on the final
  path; every other finished node scores 0. Along the path the size strictly falls, so the final
  model is the one maximum: no tie for the storage to break. The value is a rewrite: a node is told 0
  (undecided) and rises when a selection or the polish puts it on the path. Constraints are not
  enough here, because the dashboard's badge (optuna_dashboard `storage.get_best_trial`) reads values
  alone; maximising also keeps pruners comparing intermediate accuracies as before.
- Multi-objective: validation accuracy (max) and parameters (min) are never rewritten; a constraint
  `off_final_path` (0 on the path, 1 elsewhere) joins `drop_over_budget`, so best_trials is the front
  of the final path, on which nothing can dominate the final model (no other node there is as
  small). The dashboard's own Pareto plot ignores constraints and still shows every node.

Runs made before this (no `objective` study attribute) keep what they had: validation accuracy as
the value and only the budget constraint; nothing of theirs is rewritten."""

from __future__ import annotations

import warnings

import optuna

from .lineage import Node, ancestry, nodes, root_node, within_budget
from .storage import rewrite_result

FINAL_PATH = "final-path"  # the study attribute `objective` of runs made with this scheme


def adopt(study: optuna.Study) -> None:
    """Give a new study this objective (and its metric names, for the dashboard); a study that
    already holds nodes without it was made before it and is left as it is."""
    if "objective" in study.user_attrs or study.get_trials(deepcopy=False):
        return
    study.set_user_attr("objective", FINAL_PATH)
    names = ["× smaller"] if len(study.directions) == 1 else ["val_acc", "params"]
    with warnings.catch_warnings():  # metric names are "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(names)


def on_final_path(study: optuna.Study) -> bool:
    return study.user_attrs.get("objective") == FINAL_PATH


def told(study: optuna.Study, node_params: int, val_acc: float, drop: float, max_drop: float):
    """(values, constraints) a node is told with when it finishes. A child is not on the final
    path yet (a selection may put it there); the root is, until a child replaces it."""
    constraints = {"drop_over_budget": 0.0 if within_budget(drop, max_drop) else drop - max_drop}
    multi = len(study.directions) > 1
    if not on_final_path(study):
        return ([val_acc, node_params] if multi else val_acc), constraints
    root = root_node(nodes(study))
    if multi:
        return [val_acc, node_params], {**constraints, "off_final_path": 0.0 if root is None else 1.0}
    return (1.0 if root is None else 0.0), constraints


def final_path(all_nodes: list[Node], final: Node) -> set[int]:
    """The final model and its strictly larger ancestors."""
    size = final.spec.params()
    return {final.node} | {n.node for n in ancestry(all_nodes, final) if n.spec.params() > size}


def agree(study: optuna.Study, final: Node) -> None:
    """Rewrite what Optuna reads so that `final` is its best trial; only trials whose value or
    constraint changes are written, so calling it again (a resumed run) is cheap and harmless."""
    if not on_final_path(study):
        return
    all_nodes = nodes(study)
    path = final_path(all_nodes, final)
    root_params = (root_node(all_nodes) or final).spec.params()
    multi = len(study.directions) > 1
    trials = study.get_trials(deepcopy=False)
    for n in all_nodes:
        t = trials[n.node]
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        on = n.node in path
        if multi:
            wanted = 0.0 if on else 1.0
            if t.constraints.get("off_final_path") != wanted:
                rewrite_result(study, n.node, constraints={"off_final_path": wanted})
        else:
            wanted = root_params / n.spec.params() if on else 0.0
            if t.value != wanted:
                rewrite_result(study, n.node, values=[wanted])
