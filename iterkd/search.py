"""The generation loop: train (or take) the root, then generation by generation ask the variant for
slots and the space for moves sized by the step controller, have each candidate trained (here, or by
workers), select within --max-drop or back off to a smaller step, and stop when no step of at least
--min-step stays within the budget (or at a limit). Re-running on the same run directory resumes."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna

from . import objective
from .cache import remove_cache
from .choices import make_pruner, make_sampler, move_params
from .config import SearchConfig, config_path
from .device import resolve_device, resolve_precision
from .errors import IterkdError
from .export import Int8Request, export_node
from .faults import fault_point
from .importers import check_input, is_frozen_file, load_teacher
from .importers.frozen import frozen_for_data
from .lineage import (
    POLISH,
    Node,
    accepted,
    ancestry,
    int8_line,
    lineage_card,
    lineage_frame,
    node_status,
    nodes,
    record_polish,
    root_node,
    selections,
    set_selection,
    within_budget,
    write_lineage_csv,
    write_note,
)
from .quantize import fp32_onnx_figures
from .roots import PackagedRoot, packaged_root
from .run import WriterLock, agree_data, fail_interrupted_trials, start_run, verify_checkpoints
from .sizes import SIZES, Sizes
from .spaces import Move, load_space
from .storage import set_status
from .trainer import NodeTrainer
from .variants import VARIANTS, Slot, adopt_key_format, diverse_order, key_format
from .worker import LocalWorkers, WorkQueue


@dataclass(frozen=True)
class SearchOutcome:
    root: Node
    final: Node
    stop_reason: str
    generations: int
    seconds: float
    model: object = None  # iterkd.compress: the final model as an nn.Module (eval mode, CPU)


@dataclass(frozen=True)
class Round:
    """One attempt at a generation: its number (0, then 1, 2, ... after each back-off), the step it
    tries (the fraction of its parent's size a child removes, in the run's --shrink measure) and the
    nodes the earlier attempts of this generation trained (they overshot; no child of theirs is
    proposed again)."""

    generation: int
    number: int
    step: float
    overshot: tuple[int, ...] = ()

    @property
    def target(self) -> float:
        """The child/parent size ratio this step aims at (in the run's --shrink measure)."""
        return 1 - self.step

    def key(self, slot: Slot, attempt: int, key_format: int) -> str:
        # Round 0 keeps the key it always had, so runs made before back-offs existed resume unchanged.
        return slot.key(self.generation, attempt, key_format) + (f"|r{self.number}" if self.number else "")


@dataclass(frozen=True)
class StepController:
    """Sizes each generation's step against the budget; a step is the fraction of its parent's size
    (parameters, FLOPs or latency: --shrink) a child removes. A generation whose best child is over
    --max-drop backs off: the same parents try again with half the step (0.5 -> 0.25 -> 0.125 of
    the parent removed, i.e. ratio 0.5 -> 0.75 -> 0.875). One whose best child lost at most half of
    --max-drop lets the next step grow by half, up to `largest`. Every decided attempt is a record
    in the study attribute `steps`; the controller's state is a pure function of those records, so
    a resumed run takes the steps an uninterrupted one takes."""

    start: float  # the space's step, as a fraction removed (at most `largest`)
    smallest: float  # --min-step
    largest: float  # --max-step, else the start
    max_drop: float

    BACK_OFF, GROW = 0.5, 1.5

    def after(self, record: dict) -> float:
        """The step that follows a decided attempt."""
        if record["outcome"] == "backed-off":
            return record["step"] * self.BACK_OFF
        if record["drop"] <= self.max_drop / 2:
            return min(self.largest, record["step"] * self.GROW)
        return record["step"]

    def next_round(self, records: list[dict], generation: int, parents: list[int]) -> Round:
        """The attempt `generation` makes next from `parents`. Records of later generations, of this
        one from other parents (`iterkd select` chose anew) and this generation's acceptance (its
        selection was not written: it is decided again) do not count."""
        step, number, overshot = self.start, 0, ()
        for r in sorted(records, key=lambda r: (r["generation"], r["round"])):
            current = r["generation"] == generation
            if r["generation"] > generation or (
                current and (r["outcome"] != "backed-off" or r["parents"] != parents)
            ):
                continue
            step = self.after(r)
            if current:
                number, overshot = number + 1, overshot + tuple(r["nodes"])
        return Round(generation, number, step, overshot)

    def allows(self, child_size: float, parent_size: float, floor: float) -> bool:
        """A proposed child removes at least --min-step of its parent's size and, after a back-off,
        is larger than every child of this parent that overshot (`floor`); sizes in one measure."""
        return 1 - child_size / parent_size >= self.smallest and child_size > floor


def step_records(study: optuna.Study) -> list[dict]:
    return list(study.user_attrs.get("steps", []))


def record_step(study: optuna.Study, record: dict) -> None:
    """Add a decided attempt to the study's `steps`. Records from this attempt on are replaced: the
    one a killed run wrote for it, and those of a path `iterkd select` has since abandoned."""
    here = (record["generation"], record["round"])
    study.set_user_attr(
        "steps", [r for r in step_records(study) if (r["generation"], r["round"]) < here] + [record]
    )


class Search:
    """One run: its config, space, study and run directory. `run()` is idempotent: nodes already
    in the study are reused, never retrained."""

    def __init__(self, cfg: SearchConfig, *, progress: bool = True, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.space, self.variant = load_space(cfg.space), VARIANTS[cfg.variant]
        self.steps = step_controller(cfg, self.space)
        # Every input is checked before the run directory, the study or a trial exists, so a refused
        # command leaves nothing behind and the corrected one starts cleanly.
        # The data first: a folder that cannot be a dataset is refused before anything is recorded.
        store = cfg.data_store(progress=progress, log=log)
        info = cfg.data_info(store)
        # Then the teachers, read (an imported VGG checked against the file's own model) and matched
        # to the data, once: the root is made from these models.
        # A program (.pt2, TorchScript) is a frozen teacher, run on the data's input shape here.
        device = resolve_device(cfg.device)
        self.teachers, self.frozen, self.missing = {}, {}, []
        inputs = cfg.frozen_inputs(store)
        resuming = config_path(cfg.run_dir).is_file()
        for path in cfg.teacher or ():
            if resuming and not Path(path).exists():
                # A resumed run reads its root, and the frozen teachers' copies, from the run: the
                # files given when it began are needed again only if its root was never recorded.
                self.missing.append(path)
                continue
            if is_frozen_file(path):
                self.frozen[Path(path)] = frozen_for_data(path, info, inputs, device)
                continue
            teacher = load_teacher(path, size=info.size, arch=cfg.teacher_arch)
            check_input(teacher.model.spec, info, Path(path))
            self.teachers[Path(path)] = teacher
        if not (self.teachers or self.missing):  # the root this space and --width make must be buildable
            try:
                self.space.root_spec(info.channels, info.num_classes, info.size, cfg.width)
            except IterkdError as e:
                raise IterkdError(f"--width {cfg.width:g} with space {cfg.space}: {e}") from None
        resolve_precision(cfg.precision, device)  # bf16 where it cannot run: refused now
        data = None if self.remote else cfg.load_data(device, store)
        self.sampler = make_sampler(cfg.sampler, cfg.seed)
        multi = cfg.objectives == "acc,params"
        self.opened = start_run(
            cfg,
            directions=("maximize", "minimize") if multi else ("maximize",),
            sampler=self.sampler,
            pruner=make_pruner(cfg.pruner, cfg.epochs, cfg.max_drop),
            heartbeat=self.remote,
        )
        self.study = self.opened.study
        agree_data(self.study, store, cfg.data_dir)  # a resume reads the images the run was made with
        self.size = run_sizes(self.study, cfg.shrink)  # the run's --shrink measure
        objective.adopt(self.study)  # a new run's objective; one made before it keeps its own
        adopt_key_format(self.study)  # likewise its candidate keys
        self.key_format = key_format(self.study)
        self.trainer = NodeTrainer(self.opened, data=data, info=info, progress=progress, log=log)
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
            attempt = self.steps.next_round(step_records(self.study), generation, [n.node for n in frontier])
            stop = limit_reason(self.cfg, self.study, attempt, time.perf_counter() - start)
            if stop:
                break
            trained = self._train_generation(attempt, frontier)
            ok = [n for n in trained if n.ok]
            best = max(ok, key=lambda n: n.val_acc) if ok else None
            # Children --pruner budget cut for being clearly over budget overshot too: when no child
            # finished, the generation backs off with the drop they had when they were cut.
            over = [n for n in trained if n.failure == "over-budget" and n.history]
            if not trained:
                stop = nothing_to_propose_reason(self.cfg, self.space, attempt, frontier)
            elif best is None and not over:
                stop = f"every candidate of generation {generation} failed"
            else:
                drop = (
                    root.val_acc - best.val_acc
                    if best is not None
                    else min(root.val_acc - n.history[-1] for n in over)
                )
                within = best is not None and within_budget(drop, self.cfg.max_drop)
                # Recorded before the selection: a run killed between the two decides this attempt again.
                decided = {
                    "generation": generation,
                    "round": attempt.number,
                    "step": attempt.step,
                    "target": attempt.target,
                    "parents": [n.node for n in frontier],
                    "outcome": "accepted" if within else "backed-off",
                    "drop": drop,
                    "nodes": [n.node for n in trained],
                }
                record_step(self.study, decided)
                if within:
                    frontier = self._select(ok, root)
                    fault_point("selection")
                    set_selection(self.study, generation, [n.node for n in frontier])
                    objective.agree(self.study, frontier[0])  # Optuna's best trial follows the search
                    generation += 1
                else:
                    who = f"best child (node {best.node})" if best is not None else "every child (pruned)"
                    # The controller's next step, as the stop rule sees it.
                    smaller = self.steps.after(decided)
                    then = (
                        f"backing off to a step of {smaller:.1%} from the same parents"
                        if smaller >= self.steps.smallest
                        else f"a half step ({smaller:.1%}) would be under --min-step {self.cfg.min_step:g}"
                    )
                    self.log(
                        f"gen {generation}: {who} dropped {drop:.2f} points > "
                        f"--max-drop {self.cfg.max_drop:g}; {then}"
                    )
            refresh_notes(self.study, trained, root)
            write_lineage_csv(
                self.study, self.opened.run_dir / "lineage.csv"
            )  # current while the search runs
            fault_point("between-generations")
        final = self._polish(frontier[0])
        self.size.measure_specs(root.spec, final.spec)  # the report shows every measure, --shrink or not
        seconds = time.perf_counter() - start
        self.study.set_user_attr("stop_reason", stop)
        self.study.set_user_attr("final_node", final.node)
        objective.agree(self.study, final)
        self.study.set_user_attr("wall_seconds", self.study.user_attrs.get("wall_seconds", 0.0) + seconds)
        write_lineage_csv(self.study, self.opened.run_dir / "lineage.csv")
        if self.cfg.final == "int8":
            self._int8(root, final)
        freed = remove_cache(self.opened.run_dir)
        if freed:
            self.log(
                f"teacher cache: removed {freed / 2**20:,.1f} MB (the search is over; a resumed run rebuilds it)"
            )
        return SearchOutcome(root, final, stop, generation - 1, seconds)

    def _int8(self, root: Node, final: Node) -> None:
        """--final int8: export the final model with post-training int8, as `iterkd export --int8`
        does (every format, verified, in RUN/export/node-N), and record the int8 model in the study
        attribute `int8`: bytes, accuracies, drop and batch-1 latency beside the root's fp32 figures.
        An int8 model over --max-drop is refused as export refuses it: nothing is exported, the
        search's nodes are kept, and the line says how to go on. A resumed run reuses the file."""
        done = self.study.user_attrs.get("int8") or {}
        if done.get("node") == final.node and Path(done.get("path", "")).is_file():
            self.log(f"int8: {done['path']} (already exported)")
            return
        run_dir = self.opened.run_dir
        try:
            result = export_node(self.opened, final, data_dir=self.cfg.data_dir, int8=Int8Request())
        except IterkdError as e:
            raise IterkdError(
                f"--final int8: {e} (iterkd export {run_dir} --qat-epochs 2); the search's nodes are kept"
            ) from None
        f = result.int8.figures
        root_bytes, root_ms = (
            (None, None) if root.members else fp32_onnx_figures(self.opened.model(root), f.threads)
        )
        record = {
            "node": final.node,
            "path": str(result.files["int8"]),
            "method": f.method,
            "calibration_images": f.calibration_images,
            "val_acc": f.val_acc,
            "test_acc": f.test_acc,
            "drop": f.drop_pts,
            "max_drop": f.max_drop,
            "within_budget": f.within_budget,
            "bytes": f.int8_bytes,
            "latency_ms_b1": f.latency_ms_b1,
            "fp32_bytes": f.fp32_bytes,
            "fp32_latency_ms_b1": f.fp32_latency_ms_b1,
            "root_fp32_bytes": root_bytes,
            "root_fp32_latency_ms_b1": root_ms,
            "threads": f.threads,
        }
        self.study.set_user_attr("int8", record)
        self.log(int8_line(record))

    def _polish(self, node: Node) -> Node:
        """Polish the last accepted node for --final-epochs (KD from the root, or its ancestors) and
        return the final model: the polish, unless it validates worse than `node` (a demanding user
        wants the better model, so `node` stays final and the log says so). A polish a previous run
        finished is reused; with workers it is queued like a child. The root is never polished."""
        epochs = self.cfg.final_epochs
        if not epochs or node.generation == 0:
            return node
        teachers = self.variant.polish_teachers(ancestry(nodes(self.study), node))
        attrs = self.trainer.polish_attrs(node, teachers, epochs)
        polish = self._existing(attrs["key"])
        if polish is not None:
            self.log(f"polish: reusing node {polish.node} (already trained)")
        elif self.remote:
            waiting = self.queue.in_flight(attrs["key"])
            polish = self.queue.wait([waiting.number if waiting else self.queue.enqueue(attrs)])[0]
        else:
            polish = self.trainer.train_polish(node, teachers, epochs)
        kept = polish.ok and polish.val_acc >= node.val_acc
        gain = polish.val_acc - node.val_acc if polish.ok else None
        record_polish(
            self.study, {"node": polish.node, "from": node.node, "epochs": epochs, "kept": kept, "gain": gain}
        )
        # Every polish's status: one made for another length or node earlier is set aside now.
        polishes = [n for n in nodes(self.study) if n.operator == POLISH]
        refresh_notes(self.study, polishes, root_node(nodes(self.study)))
        if kept:
            self.log(
                f"polish: node {polish.node} ({gain:+.2f} pts on validation over node {node.node}) is the final model"
            )
            return polish
        why = f"validates {gain:+.2f} pts against it" if polish.ok else f"failed ({polish.error})"
        self.log(f"polish: node {polish.node} {why}; node {node.node} stays the final model")
        return node

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
            # Smallest in the run's --shrink measure (prepared when the children were proposed).
            ranked = sorted(within, key=lambda n: (self.size(n.spec), -n.val_acc, first[n.key]))
        else:
            ranked = sorted(within, key=lambda n: (-n.val_acc, n.spec.params(), first[n.key]))
        return ranked[: self.cfg.beam]

    def _train_generation(self, attempt: Round, frontier: list[Node]) -> list[Node]:
        trained = []
        for slot in self.variant.plan(frontier, lambda n: ancestry(nodes(self.study), n), self.cfg.children):
            trained += self._fill_slot(attempt, slot)
        return trained

    def _moves(self, attempt: Round, parent: Node) -> list[Move]:
        """The children this attempt may propose from `parent`, closest to its step first (sizes in
        the run's --shrink measure; latencies are timed, and recorded, before they are compared)."""
        earlier = [
            n for n in nodes(self.study) if n.node in attempt.overshot and n.parents[:1] == (parent.node,)
        ]
        size = self.size
        size.prepare([parent.spec] + [m.spec for m in self.space.moves(parent.spec)])
        floor = max((size(n.spec) for n in earlier if n.ok), default=0)
        tried = {n.spec for n in earlier}
        return [
            m
            for m in self.space.moves(parent.spec, target=attempt.target, size=size)
            if m.spec not in tried and self.steps.allows(size(m.spec), size(parent.spec), floor)
        ]

    def _fill_slot(self, attempt: Round, slot: Slot) -> list[Node]:
        """Train `slot.count` children of one parent (or reuse those a previous run trained). A child
        that diverges is replaced by another move; if every child was pruned, more moves are tried
        until one completes or the space has none left, so one bad child does not end the search.
        In process, candidates are trained one at a time; with workers, as many as are still needed
        are queued at once (the same moves, in the same order) and trained in parallel."""
        generation = attempt.generation
        allowed = self._moves(attempt, slot.parent)
        results: list[Node] = []
        attempts = itertools.count()
        while True:
            settled = [n for n in results if n.ok or n.state == "PRUNED"]
            # A child pruned as over budget is an overshoot, like a finished one over --max-drop:
            # the generation backs off instead of trying another move of the same size.
            if len(settled) >= slot.count and any(n.ok or n.failure == "over-budget" for n in results):
                return results
            wave = max(1, slot.count - len(settled)) if self.remote else 1
            queued: list[int] = []
            planned = {n.spec for n in results}
            grew = False
            for _ in range(wave):
                key = attempt.key(slot, next(attempts), self.key_format)
                node = self._existing(key)
                if node is not None:
                    self.log(f"gen {generation}: reusing node {node.node} {node.operator} (already trained)")
                    results.append(node)
                    planned.add(node.spec)
                    grew = True
                    continue
                moves = [m for m in diverse_order(allowed) if m.spec not in planned]
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
        return self.queue.enqueue(
            self.trainer.child_attrs(generation, slot, key, move), move_params(move, slot.parent.spec)
        )

    def _existing(self, key: str) -> Node | None:
        """A finished node with this key, if a previous (interrupted) run already trained it."""
        for n in nodes(self.study):
            if n.key == key and (
                n.state in ("COMPLETE", "PRUNED") or (n.state == "FAIL" and n.failure == "diverged")
            ):
                return n
        return None

    def _ensure_root(self) -> Node:
        root = root_node(nodes(self.study))
        packaged = self._packaged_root() if root is None and not self.cfg.teacher else None
        if root is None and self.missing:
            raise IterkdError(f"teacher {self.missing[0]} does not exist")
        if root is None and self.teachers:
            root = self.trainer.root_from_teachers(
                list(self.teachers), loaded={**self.teachers, **self.frozen}, frozen=list(self.frozen)
            )
        elif root is None and self.frozen:
            root = self.trainer.root_from_frozen(list(self.frozen), self.frozen)
        elif packaged is not None:
            root = self.trainer.root_from_teachers(
                [packaged.path], operator=packaged.operator, epochs=packaged.epochs
            )
        elif root is None and self.remote:
            waiting = self.queue.in_flight("root")
            number = self.queue.enqueue(self.trainer.root_attrs()) if waiting is None else waiting.number
            root = self.queue.wait([number])[0]
        elif root is None:
            root = self.trainer.train_root()
        if not root.ok:
            raise IterkdError(
                f"the root {root.failure or 'failed'} ({root.error}); lower --lr (or check "
                "--weight-decay) and start again with another --name"
            )
        if root.vgg_val_acc is not None and not within_budget(
            root.val_acc - root.vgg_val_acc, self.cfg.max_drop
        ):
            best = max(root.frozen, key=lambda r: r["val_acc"])
            raise IterkdError(
                f"the first VGG ({root.spec.summary()}, {root.vgg_val_acc:.2f} % after KD from the frozen "
                f"teachers) is already {root.val_acc - root.vgg_val_acc:.2f} points below {best['source']} "
                f"({root.val_acc:.2f} %), over --max-drop {self.cfg.max_drop:g}: start again with another "
                f"--name and a wider space root (--width {2 * self.cfg.width:g}) or more --root-epochs"
            )
        return root

    def _packaged_root(self) -> PackagedRoot | None:
        """With --root packaged, the shipped root that fits this run, or None when the root is to be
        trained; says which in one line."""
        if self.cfg.root != "packaged":
            return None
        packaged, line = packaged_root(self.cfg)
        self.log(line)
        return packaged


# -- the stop rule's words and the dashboard notes, outside the loop ------------------------------


def run_sizes(study: optuna.Study, shrink: str) -> Sizes:
    """The run's size measure; measured latencies live in the study attribute `latency_ms`, so a
    resumed run reads the values its decisions were made with instead of timing again."""
    return Sizes(
        shrink, study.user_attrs.get("latency_ms", {}), lambda table: study.set_user_attr("latency_ms", table)
    )


def step_controller(cfg: SearchConfig, space) -> StepController:
    """The run's step controller: it starts at the space's step (no larger than --max-step)."""
    start = 1 - space.step
    largest = start if cfg.max_step is None else cfg.max_step
    return StepController(
        start=min(start, largest), smallest=cfg.min_step, largest=largest, max_drop=cfg.max_drop
    )


def limit_reason(cfg: SearchConfig, study: optuna.Study, attempt: Round, seconds: float) -> str:
    """Why the search stops before `attempt`, in words; empty when it goes on."""
    if attempt.generation > cfg.max_generations:
        return f"reached --max-generations {cfg.max_generations}"
    if cfg.time_budget and seconds >= cfg.time_budget:
        return (
            f"used the --time-budget of {cfg.time_budget:g} s ({seconds:.0f} s) before generation "
            f"{attempt.generation}"
        )
    if attempt.step < cfg.min_step and not attempt.number:
        return (
            f"the first step ({attempt.step:.1%} of the parent's {SIZES[cfg.shrink].noun}: the "
            f"space's step, or --max-step) is below --min-step {cfg.min_step:g}; lower --min-step"
        )
    if attempt.step < cfg.min_step:
        last = max(
            (
                r
                for r in step_records(study)
                if r["generation"] == attempt.generation and r["outcome"] == "backed-off"
            ),
            key=lambda r: r["round"],
        )
        return (
            f"no step of at least --min-step {cfg.min_step:g} of the parent stays within --max-drop "
            f"{cfg.max_drop:g}: generation {attempt.generation}'s smallest step ({last['step']:.1%} of "
            f"node(s) {', '.join(map(str, last['parents']))}) still dropped {last['drop']:.2f} points"
        )
    return ""


def nothing_to_propose_reason(cfg: SearchConfig, space, attempt: Round, frontier: list[Node]) -> str:
    """Why a generation had no candidate, in words."""
    parents = ", ".join(str(n.node) for n in frontier)
    if attempt.number:
        return (
            f"generation {attempt.generation} overshot --max-drop {cfg.max_drop:g} and node(s) "
            f"{parents} have no smaller step of at least --min-step {cfg.min_step:g} left to try"
        )
    if any(space.moves(n.spec) for n in frontier):
        return (
            f"every child the space allows from node(s) {parents} removes less than --min-step "
            f"{cfg.min_step:g} of its parent's {SIZES[cfg.shrink].noun}"
        )
    return "the space has no smaller child to propose (min_model reached)"


def refresh_notes(study: optuna.Study, generation_nodes: list[Node], root: Node) -> None:
    """Rewrite a generation's dashboard notes once selection has decided each node's status."""
    chosen = accepted(study)
    for n in [root] * (root.node not in {g.node for g in generation_nodes}) + generation_nodes:
        status = node_status(n, chosen)
        write_note(study, n.node, lineage_card(n, root, status))
        set_status(study, n.node, status)  # the dashboard's status column


def summary_table(study: optuna.Study):
    """The lineage as a compact pandas table for the terminal."""
    df = lineage_frame(study)
    cols = [
        "node",
        "generation",
        "parents",
        "teachers",
        "operator",
        "params",
        "val_acc",
        "test_acc",
        "drop",
        "status",
        "seconds",
    ]
    return df[cols]
