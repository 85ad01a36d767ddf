"""The four ways to grow the lineage, as strategy objects with one method: given the accepted
frontier, which children to train next and who teaches each."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

from .lineage import Node
from .spaces import Move, SearchSpace


@dataclass(frozen=True)
class Candidate:
    generation: int
    parent: Node
    teachers: tuple[Node, ...]
    move: Move

    @property
    def key(self) -> str:
        """Stable identity: a resumed run recognises a candidate it already trained by this key."""
        teachers = ",".join(str(t.node) for t in self.teachers)
        return f"g{self.generation}|p{self.parent.node}|t{teachers}|{self.move.label}"

    def seed(self, run_seed: int) -> int:
        return (run_seed * 1_000_003 + zlib.crc32(self.key.encode())) % 2**31


@dataclass(frozen=True)
class Variant:
    """`children`: several candidates per parent (else one); `all_ancestors`: every accepted ancestor
    teaches (else the parent alone). The hint always comes from the direct parent."""

    name: str
    children: bool
    all_ancestors: bool

    def plan(self, generation: int, frontier: list[Node], ancestors: Callable[[Node], list[Node]],
             space: SearchSpace, k: int, exclude: set[str] = frozenset()) -> list[Candidate]:
        """Candidates for `generation`, skipping keys in `exclude` (children that already failed)."""
        out = []
        for parent in frontier:
            teachers = tuple(ancestors(parent)) if self.all_ancestors else (parent,)
            cands = [Candidate(generation, parent, teachers, m) for m in diverse_order(space.moves(parent.spec))]
            cands = [c for c in cands if c.key not in exclude]
            out.extend(cands[:k if self.children else 1])
        return out


def diverse_order(moves: list[Move]) -> list[Move]:
    """Moves round-robin across operators (each operator's moves keep their largest-reduction-first
    order), so K siblings try different kinds of change rather than K variants of one."""
    by_op: dict[str, list[Move]] = {}
    for m in moves:
        by_op.setdefault(m.operator, []).append(m)
    # The operator whose best move shrinks the most goes first.
    queues = sorted(by_op.values(), key=lambda ms: ms[0].spec.params())
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


VARIANTS: dict[str, Variant] = {
    v.name: v for v in (
        Variant("parent-child", children=False, all_ancestors=False),
        Variant("parent-children", children=True, all_ancestors=False),
        Variant("ancestors-child", children=False, all_ancestors=True),
        Variant("ancestors-children", children=True, all_ancestors=True),
    )
}
