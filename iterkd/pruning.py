"""Stopping a child early against the budget (`--pruner budget`): a child that is clearly over
--max-drop is pruned, one that has clearly converged stops and is kept.

After each epoch a child's validation accuracy is compared with two things:

- **Over budget** (pruned): its drop against the root, minus --max-drop, is more than it can still
  recover. What it can recover from epoch e is learned from the run itself: the most any finished
  child with the same planned epochs gained from the end of epoch e to its last epoch, times
  RECOVERY_SAFETY, plus RECOVERY_SLACK_PTS. Until one child has finished, nothing is pruned for
  being over budget (there is nothing to learn from), and the last epoch is never cut (stopping
  there saves nothing, and the finished child is recorded as rejected with its accuracy). Nor is
  a child cut while the one-cycle learning rate still rises (the first WARMUP of the epochs):
  accuracy then swings by tens of points, and what other children gained is no guide (on a real
  smoke run a child at 42.75 % after its first epoch of four ended at 94.0 %, gaining 15 points
  more than the run's other finished child had).
- **Converged** (stopped, recorded COMPLETE with its weights, so it can be accepted): no gain of
  more than TOLERANCE_PTS over the last PATIENCE epochs, and its last accuracy within TOLERANCE_PTS
  of its best. Children train with a one-cycle schedule, whose learning rate rises for the first
  quarter of the steps and then anneals to almost nothing; a plateau at a high learning rate is
  noise around a point the annealing would still improve, and stopping there keeps weights trained
  at that rate. So convergence is declared only once ANNEAL_FROM of the epochs are done, where the
  learning rate is at most half its peak, and never at the last epoch (nothing would be saved).
"""

from __future__ import annotations

import math

import optuna

from .lineage import Node, nodes, root_node


class OverBudget(optuna.TrialPruned):
    """A child pruned for being clearly over --max-drop: the node is recorded with failure
    'over-budget', and the search treats it as an overshoot (it backs off to a smaller step)."""


class BudgetPruner(optuna.pruners.BasePruner):
    """Built with the run's child epochs and --max-drop; the root's and finished children's
    accuracies are read from the study. `over_budget` and `converged` take a child's validation
    accuracies so far; `prune` is the same test through Optuna's pruner interface, on the values
    iterkd reports (validation accuracy minus the parent's)."""

    RECOVERY_SAFETY = 1.25
    RECOVERY_SLACK_PTS = 0.25
    WARMUP = 0.25  # the share of the schedule over which the one-cycle learning rate rises
    PATIENCE = 2
    TOLERANCE_PTS = 0.1
    # One-cycle: warm-up over the first quarter, then cosine annealing; the learning rate is at most
    # half its peak from 0.25 + 0.75 / 2 = 0.625 of the schedule on.
    ANNEAL_FROM = 0.625

    def __init__(self, epochs: int, max_drop: float):
        self.epochs, self.max_drop = epochs, max_drop

    def recoverable_pts(self, all_nodes: list[Node], epoch: int) -> float | None:
        """How many points a child may still gain after `epoch` (0-based), learned from the run's
        finished children; None before any has finished."""
        gains = [
            n.history[-1] - n.history[epoch]
            for n in all_nodes
            if n.ok and n.generation and n.epochs == self.epochs and len(n.history) > epoch + 1
        ]
        if not gains:
            return None
        return self.RECOVERY_SAFETY * max(0.0, max(gains)) + self.RECOVERY_SLACK_PTS

    def over_budget(self, study: optuna.Study, history: list[float]) -> str:
        """Why a child with validation accuracies `history` is clearly over budget, or ''."""
        epoch = len(history) - 1
        all_nodes = nodes(study)
        root = root_node(all_nodes)
        if root is None or epoch + 1 >= self.epochs or epoch + 1 <= math.ceil(self.WARMUP * self.epochs):
            return ""
        excess = root.val_acc - history[-1] - self.max_drop
        recoverable = self.recoverable_pts(all_nodes, epoch)
        if recoverable is None or excess <= recoverable:
            return ""
        return (
            f"over budget after epoch {epoch + 1} of {self.epochs}: {history[-1]:.2f}% is "
            f"{excess:.2f} points past --max-drop {self.max_drop:g}, and children of this run gained "
            f"at most {(recoverable - self.RECOVERY_SLACK_PTS) / self.RECOVERY_SAFETY:.2f} after that epoch"
        )

    def converged(self, history: list[float]) -> bool:
        """Whether a child with validation accuracies `history` has clearly converged (see the module)."""
        done, k = len(history), self.PATIENCE
        if done >= self.epochs or done < math.ceil(self.ANNEAL_FROM * self.epochs) or done <= k:
            return False
        no_gain = max(history[-k:]) <= max(history[:-k]) + self.TOLERANCE_PTS
        return no_gain and history[-1] >= max(history) - self.TOLERANCE_PTS

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        parents = trial.user_attrs.get("parents") or []
        by_id = {n.node: n for n in nodes(study)}
        parent: Node | None = by_id.get(parents[0]) if parents else None
        if parent is None or parent.val_acc is None or not trial.intermediate_values:
            return False
        steps = sorted(trial.intermediate_values)
        history = [parent.val_acc + trial.intermediate_values[s] for s in steps]
        return bool(self.over_budget(study, history))
