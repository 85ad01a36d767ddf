"""The four ways to grow the lineage, as strategy objects with one method: given the accepted
frontier, how many children each parent gets next and who teaches them."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

from .lineage import Node
from .spaces import Move


@dataclass(frozen=True)
class Slot:
    """`count` children of `parent`, each taught by `teachers` (the hint comes from the parent)."""

    parent: Node
    teachers: tuple[Node, ...]
    count: int

    def key(self, generation: int, attempt: int) -> str:
        """Stable identity of one candidate: a resumed run recognises what it already trained by it."""
        teachers = ",".join(str(t.node) for t in self.teachers)
        return f"g{generation}|p{self.parent.node}|t{teachers}|c{attempt}"


def candidate_seed(run_seed: int, key: str) -> int:
    return (run_seed * 1_000_003 + zlib.crc32(key.encode())) % 2**31


@dataclass(frozen=True)
class Variant:
    """`children`: K candidates per parent (else one); `all_ancestors`: every accepted ancestor,
    root included, teaches (else the parent alone)."""

    name: str
    children: bool
    all_ancestors: bool

    def plan(self, frontier: list[Node], ancestors: Callable[[Node], list[Node]], k: int) -> list[Slot]:
        return [
            Slot(p, tuple(ancestors(p)) if self.all_ancestors else (p,), k if self.children else 1)
            for p in frontier
        ]

    def polish_teachers(self, chain: list[Node]) -> tuple[Node, ...]:
        """Who teaches the polish of `chain[-1]` (chain: root, ..., that node): the root, or in the
        ancestors variants every accepted ancestor from the root on."""
        return tuple(chain[:-1]) if self.all_ancestors else (chain[0],)


def diverse_order(moves: list[Move]) -> list[Move]:
    """Moves round-robin across operators (each operator's moves keep the space's preference order,
    and the operator of the most preferred move leads), so K siblings try different kinds of change
    rather than K variants of one."""
    by_op: dict[str, list[Move]] = {}
    for m in moves:
        by_op.setdefault(m.operator, []).append(m)
    queues = list(by_op.values())
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("parent-child", children=False, all_ancestors=False),
        Variant("parent-children", children=True, all_ancestors=False),
        Variant("ancestors-child", children=False, all_ancestors=True),
        Variant("ancestors-children", children=True, all_ancestors=True),
    )
}
