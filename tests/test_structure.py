"""The package's own shape: imports point one way (no module imports another that imports it back,
directly, through others, or lazily inside a function), and Optuna's private API stays in one module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "iterkd"


def import_graph() -> dict[str, set[str]]:
    """module -> the iterkd modules it imports anywhere in its file (top level or inside functions)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m in modules:
        for node in ast.walk(ast.parse((PACKAGE / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    graph[m].add(node.module.split(".")[0])
                else:  # from . import storage
                    graph[m].update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("iterkd."):
                graph[m].add(node.module.split(".")[1])
        graph[m] &= modules
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle_among_iterkd_modules():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["storage"] = graph["storage"] | {"search"}  # search reaches storage, so this closes a loop
    cycle = find_cycle(graph)
    assert cycle and cycle[0] == cycle[-1] and "storage" in cycle and "search" in cycle


def test_the_search_knows_generations_the_node_knows_one_trial_and_train_knows_neither():
    graph = import_graph()
    assert "search" not in graph["node"] | graph["trainer"] | graph["worker"]
    assert not {"search", "node", "trainer", "worker", "run", "lineage"} & graph["train"]


def test_optunas_private_api_is_used_in_storage_alone():
    users = sorted(
        p.name
        for p in PACKAGE.glob("*.py")
        if p.name != "storage.py"
        and (
            "._storage" in p.read_text()
            or "._trial_id" in p.read_text()
            or "optuna.storages._" in p.read_text()
        )
    )
    assert users == []
