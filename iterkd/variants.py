"""The four ways to grow the lineage, as strategy objects with one method: given the accepted
frontier, how many children each parent gets next and who teaches them."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import optuna

from .lineage import POLISH, Node
from .spaces import Move

# How candidate keys name the nodes they grow from. 1: by trial number (runs made before
# 2026-12-06); a node trained again after a crash takes a new number, so every key after it, and
# with it every seed, changed, and a resumed run took another path. 2: by lineage identity (the
# node's own key, which names its parent's, and so on up to the root), the same however the trials
# were numbered. A run keeps the format it was made with (study attribute `key_format`).
KEY_FORMAT = 2


def key_format(study: optuna.Study) -> int:
    return int(study.user_attrs.get("key_format", 1))


def adopt_key_format(study: optuna.Study) -> None:
    """Give a new study the current key format; one that already holds nodes keeps its own."""
    if "key_format" not in study.user_attrs and not study.get_trials(deepcopy=False):
        study.set_user_attr("key_format", KEY_FORMAT)


def node_ref(node: Node, key_format: int) -> str:
    """How a key names `node`: its trial number (format 1), or a digest of its own key (format 2),
    which does not depend on how many trials failed before it."""
    if key_format < 2:
        return str(node.node)
    if node.key == "root":
        return "root"
    return hashlib.sha1(node.key.encode()).hexdigest()[:12]


def polish_key(node: Node, epochs: int, key_format: int) -> str:
    """The polish of `node` for `epochs`: a polish already trained is found again, another length is new."""
    return f"{POLISH}|n{node_ref(node, key_format)}|e{epochs}"


@dataclass(frozen=True)
class Slot:
    """`count` children of `parent`, each taught by `teachers` (the hint comes from the parent)."""

    parent: Node
    teachers: tuple[Node, ...]
    count: int

    def key(self, generation: int, attempt: int, key_format: int) -> str:
        """Stable identity of one candidate: a resumed run recognises what it already trained by it,
        and its seed derives from it (`candidate_seed`)."""
        teachers = ",".join(node_ref(t, key_format) for t in self.teachers)
        return f"g{generation}|p{node_ref(self.parent, key_format)}|t{teachers}|c{attempt}"


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
