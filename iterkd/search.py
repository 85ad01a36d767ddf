"""The generation loop: train (or take) the root, then generation by generation ask the variant for
slots and the space for moves, have each candidate trained (here, or by workers), select, and stop
when the best child loses more than --max-drop points. Re-running on the same run directory resumes."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna

from .checkpoints import read_checkpoint
from .choices import make_pruner, make_sampler, move_params
from .config import SearchConfig
from .data import dataset_info
from .device import resolve_device, resolve_precision
from .errors import IterkdError
from .faults import fault_point
from .lineage import (Node, accepted, ancestry, lineage_card, lineage_frame, node_status, nodes, root_node, selections,
                      set_selection, within_budget, write_lineage_csv, write_note)
from .run import WriterLock, fail_interrupted_trials, start_run, verify_checkpoints
from .spaces import load_space
from .storage import set_status
from .trainer import NodeTrainer
from .variants import VARIANTS, Slot, diverse_order
from .worker import LocalWorkers, WorkQueue


@dataclass(frozen=True)
class SearchOutcome:
    root: Node
    final: Node
    stop_reason: str
    generations: int
    seconds: float


class Search:
    """One run: its config, space, study and run directory. `run()` is idempotent: nodes already
    in the study are reused, never retrained."""

    def __init__(self, cfg: SearchConfig, *, progress: bool = True, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.space, self.variant = load_space(cfg.space), VARIANTS[cfg.variant]
        # Every input is checked before the run directory, the study or a trial exists, so a refused
        # command leaves nothing behind and the corrected one starts cleanly.
        for path in cfg.teacher or ():
            read_checkpoint(path)
        if not cfg.teacher:  # the root this space and --width make must be buildable
            info = dataset_info(cfg.dataset)
            try:
                self.space.root_spec(info.channels, info.num_classes, info.size, cfg.width)
            except IterkdError as e:
                raise IterkdError(f"--width {cfg.width:g} with space {cfg.space}: {e}") from None
        resolve_precision(cfg.precision, resolve_device(cfg.device))  # bf16 where it cannot run: refused now
        data = None if self.remote else cfg.load_data(resolve_device(cfg.device))
        self.sampler = make_sampler(cfg.sampler, cfg.seed)
        multi = cfg.objectives == "acc,params"
        self.opened = start_run(cfg, directions=("maximize", "minimize") if multi else ("maximize",),
                             sampler=self.sampler, pruner=make_pruner(cfg.pruner, cfg.epochs), heartbeat=self.remote)
        self.study = self.opened.study
        self.trainer = NodeTrainer(self.opened, data=data, progress=progress, log=log)
        self.queue: WorkQueue | None = None

    @property
    def remote(self) -> bool:
        """True when workers (`iterkd worker`, or `--workers N` local ones) train the nodes and
        this process only enqueues, waits and selects."""
        return self.cfg.workers is not None

    def run(self) -> SearchOutcome:
        """Drive the run to its stop; a second process driving the same run is refused (WriterLock)."""
        run = self.opened
        with WriterLock(run.run_dir, run.storage, self.cfg.name).acquire(self.log):
            if not self.remote:
                return self._run()
            self.study.set_user_attr("coordinator", "running")
            with LocalWorkers(self.cfg, self.cfg.workers) as workers:
                self.queue = WorkQueue(run, workers, self.log)
                try:
                    return self._run()
                finally:
                    self.study.set_user_attr("coordinator", "done")  # idle workers exit

    def _run(self) -> SearchOutcome:
        start = time.perf_counter()
        fail_interrupted_trials(self.study, self.log, remote=self.remote)
        verify_checkpoints(self.opened, self.log)
        root = self._ensure_root()
        frontier, generation = self._frontier(root)
        stop = ""
        while not stop:
            if generation > self.cfg.max_generations:
                stop = f"reached --max-generations {self.cfg.max_generations}"
                break
            trained = self._train_generation(generation, frontier)
            ok = [n for n in trained if n.ok]
            best = max(ok, key=lambda n: n.val_acc) if ok else None
            if not trained:
                stop = "the space has no smaller child to propose (min_model reached)"
            elif best is None:
                stop = f"every candidate of generation {generation} failed"
            elif not within_budget(root.val_acc - best.val_acc, self.cfg.max_drop):
                stop = (f"best child of generation {generation} (node {best.node}) dropped "
                        f"{root.val_acc - best.val_acc:.2f} points > --max-drop {self.cfg.max_drop:g}")
            else:
                frontier = self._select(ok, root)
                fault_point("selection")
                set_selection(self.study, generation, [n.node for n in frontier])
                generation += 1
            self._refresh_notes(trained, root)
            write_lineage_csv(self.study, self.opened.run_dir / "lineage.csv")  # current while the search runs
            fault_point("between-generations")
        final = frontier[0]
        seconds = time.perf_counter() - start
        self.study.set_user_attr("stop_reason", stop)
        self.study.set_user_attr("final_node", final.node)
        self.study.set_user_attr("wall_seconds", self.study.user_attrs.get("wall_seconds", 0.0) + seconds)
        write_lineage_csv(self.study, self.opened.run_dir / "lineage.csv")
        return SearchOutcome(root, final, stop, generation - 1, seconds)

    def _refresh_notes(self, generation_nodes: list[Node], root: Node) -> None:
        """Rewrite a generation's dashboard notes once selection has decided each node's status."""
        chosen = accepted(self.study)
        for n in [root] * (root.node not in {g.node for g in generation_nodes}) + generation_nodes:
            status = node_status(n, chosen)
            write_note(self.study, n.node, lineage_card(n, root, status))
            set_status(self.study, n.node, status)  # the dashboard's status column

    def _frontier(self, root: Node) -> tuple[list[Node], int]:
        """The accepted nodes to grow from, and the next generation number (resume-aware)."""
        sel = selections(self.study)
        if not sel:
            return [root], 1
        last = max(sel)
        by_id = {n.node: n for n in nodes(self.study)}
        return [by_id[i] for i in sel[last]], last + 1

    def _select(self, ok: list[Node], root: Node) -> list[Node]:
        within = [n for n in ok if within_budget(root.val_acc - n.val_acc, self.cfg.max_drop)]
        # Ties go to the candidate proposed first: the number of the first trial made for its key, so
        # a candidate retried after a crash (a later trial number) keeps its place.
        first: dict[str, int] = {}
        for n in nodes(self.study):
            first.setdefault(n.key, n.node)
        if self.cfg.select == "smallest-within-budget":
            ranked = sorted(within, key=lambda n: (n.spec.params(), -n.val_acc, first[n.key]))
        else:
            ranked = sorted(within, key=lambda n: (-n.val_acc, n.spec.params(), first[n.key]))
        return ranked[:self.cfg.beam]

    def _train_generation(self, generation: int, frontier: list[Node]) -> list[Node]:
        trained = []
        for slot in self.variant.plan(frontier, lambda n: ancestry(nodes(self.study), n), self.cfg.children):
            trained += self._fill_slot(generation, slot)
        return trained

    def _fill_slot(self, generation: int, slot: Slot) -> list[Node]:
        """Train `slot.count` children of one parent (or reuse those a previous run trained). A child
        that diverges is replaced by another move; if every child was pruned, more moves are tried
        until one completes or the space has none left, so one bad child does not end the search.
        In process, candidates are trained one at a time; with workers, as many as are still needed
        are queued at once (the same moves, in the same order) and trained in parallel."""
        results: list[Node] = []
        attempts = itertools.count()
        while True:
            settled = [n for n in results if n.ok or n.state == "PRUNED"]
            if len(settled) >= slot.count and any(n.ok for n in results):
                return results
            wave = max(1, slot.count - len(settled)) if self.remote else 1
            queued: list[int] = []
            planned = {n.spec for n in results}
            grew = False
            for _ in range(wave):
                key = slot.key(generation, next(attempts))
                node = self._existing(key)
                if node is not None:
                    self.log(f"gen {generation}: reusing node {node.node} {node.operator} (already trained)")
                    results.append(node)
                    planned.add(node.spec)
                    grew = True
                    continue
                moves = [m for m in diverse_order(self.space.moves(slot.parent.spec)) if m.spec not in planned]
                if not moves:
                    break
                if self.remote:
                    queued.append(self._queue_child(generation, slot, key, moves[0], planned))
                else:
                    results.append(self.trainer.train_child(generation, slot, key, moves))
                grew = True
            if not grew:
                return results
            results += self.queue.wait(queued) if queued else []

    def _queue_child(self, generation: int, slot: Slot, key: str, move, planned: set) -> int:
        """Queue this candidate for the workers (or wait for the one an earlier coordinator queued)."""
        waiting = self.queue.in_flight(key)
        if waiting is not None:
            planned.add(Node.from_trial(waiting).spec)
            return waiting.number
        planned.add(move.spec)
        return self.queue.enqueue(self.trainer.child_attrs(generation, slot, key, move),
                                  move_params(move, slot.parent.spec))

    def _existing(self, key: str) -> Node | None:
        """A finished node with this key, if a previous (interrupted) run already trained it."""
        for n in nodes(self.study):
            if n.key == key and (n.state in ("COMPLETE", "PRUNED") or (n.state == "FAIL" and n.failure == "diverged")):
                return n
        return None

    def _ensure_root(self) -> Node:
        root = root_node(nodes(self.study))
        if root is None and self.cfg.teacher:
            root = self.trainer.root_from_teachers([Path(p) for p in self.cfg.teacher])
        elif root is None and self.remote:
            waiting = self.queue.in_flight("root")
            number = self.queue.enqueue(self.trainer.root_attrs()) if waiting is None else waiting.number
            root = self.queue.wait([number])[0]
        elif root is None:
            root = self.trainer.train_root()
        if not root.ok:
            raise IterkdError(f"the root {root.failure or 'failed'} ({root.error}); lower --lr (or check "
                              "--weight-decay) and start again with another --name")
        return root


def summary_table(study: optuna.Study):
    """The lineage as a compact pandas table for the terminal."""
    df = lineage_frame(study)
    cols = ["node", "generation", "parents", "teachers", "operator", "params", "val_acc", "test_acc", "drop",
            "status", "seconds"]
    return df[cols]

