"""How a trial picks its child through Optuna's suggest API: the mutation operator and where it
acts (from the space), and the KD settings whose ranges the space YAML declares.

The parameter domains are the same for every trial of a run, so the sampler learns across
generations: `operator` (the space's operator names), `position` (relative depth of the block to
act on, 0 = first block, 1 = last), `scope` and `factor` (shrink_widths). A suggestion is resolved
to the nearest move the parent actually allows."""

from __future__ import annotations

from collections.abc import Callable

import optuna

from .arch import VGGSpec
from .errors import IterkdError
from .pruning import BudgetPruner
from .spaces import Move, SearchSpace


def _block_of(move: Move) -> int | None:
    block = dict(move.args).get("block")
    return block if isinstance(block, int) else None


def _position(move: Move, parent: VGGSpec) -> float:
    block = _block_of(move)
    n = len(parent.blocks)
    return 0.0 if block is None or n == 1 else (block - 1) / (n - 1)


def move_params(move: Move, parent: VGGSpec) -> dict:
    """The trial parameters that resolve to exactly `move` (enqueued by the greedy sampler)."""
    params: dict = {"operator": move.operator}
    args = dict(move.args)
    if move.operator == "shrink_widths":
        params["scope"] = "all" if args["block"] == "all" else "block"
        params["factor"] = args["factor"]
    if params.get("scope") != "all":
        params["position"] = _position(move, parent)
    return params


def suggest_move(
    trial: optuna.Trial, space: SearchSpace, parent: VGGSpec, moves: list[Move], *, head: bool = False
) -> Move:
    """Ask the trial for a move and resolve it among `moves` (the parent's allowed, untried moves,
    in the space's preferred order). Records what was actually built as user attribute `move`.
    `head`: the run's root has a head, so the head operators are in the domain (fixed per run, as
    Optuna's categorical distributions must be)."""
    operators = [name for name, _ in space.operators_for(head)]
    op = trial.suggest_categorical("operator", operators)
    want: dict = {"operator": op}
    if op == "shrink_widths":
        params = dict(space.operators)[op]
        scopes = params.get("scope", ["block", "all"])
        scopes = [scopes] if isinstance(scopes, str) else list(scopes)
        want["scope"] = trial.suggest_categorical("scope", scopes)
        want["factor"] = trial.suggest_categorical("factor", list(params.get("factors", [0.5])))
    if want.get("scope") != "all":
        want["position"] = trial.suggest_float("position", 0.0, 1.0)

    def distance(m: Move) -> tuple:
        p = move_params(m, parent)
        return (
            p["operator"] != want["operator"],
            p.get("scope") != want.get("scope"),
            p.get("factor") != want.get("factor"),
            abs(p.get("position", 0.0) - want.get("position", 0.0)),
        )

    chosen = min(moves, key=distance)  # min keeps the first of equals: the space's order breaks ties
    trial.set_user_attr("move", chosen.label)
    return chosen


def kd_ranges(space: SearchSpace) -> dict[str, tuple[float, float]]:
    """The KD settings the space searches (declared as [low, high] in its `kd:` section)."""
    return {k: tuple(v) for k, v in space.kd.items() if isinstance(v, (list, tuple))}


def suggest_kd(trial: optuna.Trial, space: SearchSpace, defaults: dict) -> dict:
    """KD settings for one child: searched ones suggested (lr on a log scale), fixed ones from the
    space, the rest from the run's config."""
    values = dict(defaults)
    for key, value in space.kd.items():
        if isinstance(value, (list, tuple)):
            values[key] = trial.suggest_float(key, float(value[0]), float(value[1]), log=key == "lr")
        else:
            values[key] = float(value)
    return values


# Samplers by name, each built from the run's seed. 'greedy' is TPE too: the search enqueues the
# space's preferred move for each trial, so the sampler only chooses within the space's KD ranges.
# The drop budget is stored as each trial's constraint (iterkd.objective) for best_trial(s) and the
# dashboard; no sampler is given a constraints_func, so none steers by it.
SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "greedy": lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=5),
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=5),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed, population_size=8),
}

# Pruners by name, each built from the epochs a child trains (Hyperband's largest resource) and
# --max-drop. 'budget' (iterkd.pruning) stops a child that is clearly over budget or converged.
PRUNERS: dict[str, Callable[[int, float], optuna.pruners.BasePruner]] = {
    "none": lambda epochs, max_drop: optuna.pruners.NopPruner(),
    "median": lambda epochs, max_drop: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    "hyperband": lambda epochs, max_drop: optuna.pruners.HyperbandPruner(
        min_resource=1, max_resource=max(epochs, 2), reduction_factor=3
    ),
    "budget": lambda epochs, max_drop: BudgetPruner(epochs, max_drop),
}
# Pruners that need Optuna's intermediate values, which multi-objective studies do not take; the
# budget pruner reads a child's accuracies directly (iterkd.node), so it works with any objectives.
NEEDS_ONE_OBJECTIVE = ("median", "hyperband")


def _registered(registry: dict, name: str, flag: str):
    if name not in registry:
        raise IterkdError(f"unknown {flag} {name!r}; choose one of {', '.join(registry)}")
    return registry[name]


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The seeded sampler registered as `name`."""
    return _registered(SAMPLERS, name, "--sampler")(seed)


def make_pruner(name: str, epochs: int, max_drop: float) -> optuna.pruners.BasePruner:
    """The pruner registered as `name`, for children trained `epochs` epochs within `max_drop`."""
    return _registered(PRUNERS, name, "--pruner")(epochs, max_drop)
