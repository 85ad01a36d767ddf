"""The orchestrator: trains the root, then generation by generation asks the variant for
candidates, trains each from its teachers, records it in the study, selects, and stops when the
best child loses more than --max-drop points. Re-running on the same run directory resumes."""
from __future__ import annotations

import json
import itertools
import os
import socket
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from .cache import TeacherCache
from .checkpoints import load_model, read_checkpoint, save_checkpoint
from .choices import make_pruner, make_sampler, move_params, suggest_kd, suggest_move
from .config import SearchConfig, config_path
from .data import DataSplits, dataset_info, load_data
from .errors import IterkdError, TrainingDiverged
from .lineage import (NODE_ATTRS, Node, ancestry, default_storage, lineage_card, lineage_frame, node_attrs, node_status,
                      nodes, open_study, redact_url, root_node, selections, set_selection, set_status, write_atomic,
                      write_lineage_csv, write_note)
from .losses import LossWeights
from .arch import VGGSpec
from .models import VGG
from .spaces import load_space
from .device import resolve_device
from .inherit import inherit_weights
from .train import TrainResult, TrainSettings, evaluate, evaluate_ensemble, recalibrate_bn, train
from .variants import VARIANTS, Slot, candidate_seed, diverse_order


MAX_RETRIES = 3  # a candidate whose worker dies more often than this stops the search with its error
POLL_S = 1.0  # how often a coordinator looks at the queued trials


def train_settings(cfg: SearchConfig, epochs: int, seed: int, *, child: bool = False) -> TrainSettings:
    """The TrainSettings of a run's root, or of a child before its own KD settings (also `iterkd compare`'s)."""
    c = cfg
    # Children share the run's augmentation views, so one teacher cache serves all of them.
    views = dict(views=c.views, augment_seed=c.seed) if child else {}
    return TrainSettings(epochs=epochs, batch_size=c.batch_size, lr=c.lr, weight_decay=c.weight_decay,
                         loss=LossWeights(c.alpha, c.temperature, c.hint_weight, c.hint), seed=seed,
                         compile=c.compile, **views)


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
        self.cfg, self.progress, self.log = cfg, progress, log
        self.run_dir = Path(cfg.run_dir)
        self.space = load_space(cfg.space)
        self.variant = VARIANTS[cfg.variant]
        self.info = dataset_info(cfg.dataset)
        self.device = resolve_device(cfg.device)
        self._prepare_run_dir()
        self.multi_objective = cfg.objectives == "acc,params"
        self.sampler = make_sampler(cfg.sampler, cfg.seed)
        self.study = open_study(cfg.storage or default_storage(self.run_dir), cfg.name,
                                directions=("maximize", "minimize") if self.multi_objective else ("maximize",),
                                sampler=self.sampler, pruner=make_pruner(cfg.pruner, cfg.epochs),
                                heartbeat=self.remote)
        self.artifacts = FileSystemArtifactStore(str(self.run_dir / "artifacts"))
        if not config_path(self.run_dir).exists():  # saved only once the run can really start
            # Passwords never reach disk or the study: a resumed run asks for --storage again.
            saved = replace(cfg, storage=redact_url(cfg.storage) if cfg.storage else None)
            write_atomic(config_path(self.run_dir), saved.to_json())
            self.study.set_user_attr("config", json.loads(saved.to_json()))  # reports read it from the study
        self._data: DataSplits | None = None
        self._models: dict[int | str, VGG] = {}  # node, or 'node-member' of an ensemble root
        self._caches: dict[int | str, TeacherCache] = {}

    # -- setup --------------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        try:
            for sub in ("checkpoints", "artifacts"):
                (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise IterkdError(f"run directory {self.run_dir} is not writable ({e.strerror}); "
                              "choose another with --run-dir") from None

    @property
    def data(self) -> DataSplits:
        if self._data is None:
            self._data = load_data(self.cfg.dataset, self.cfg.data_dir, val_size=self.cfg.val_size,
                                   train_subset=self.cfg.train_subset, test_subset=self.cfg.test_subset,
                                   seed=self.cfg.seed, download=self.cfg.download).to(self.device)
        return self._data

    def settings(self, epochs: int, seed: int, *, child: bool = False) -> TrainSettings:
        return train_settings(self.cfg, epochs, seed, child=child)

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> SearchOutcome:
        if self.remote:
            from .worker import LocalWorkers

            self.study.set_user_attr("coordinator", "running")
            with LocalWorkers(self.cfg, self.cfg.workers) as self._workers:
                try:
                    return self._run()
                finally:
                    self.study.set_user_attr("coordinator", "done")  # idle workers exit
        return self._run()

    @property
    def remote(self) -> bool:
        """True when workers (`iterkd worker`, or `--workers N` local ones) train the nodes and
        this process only enqueues, waits and selects."""
        return self.cfg.workers is not None

    def _run(self) -> SearchOutcome:
        start = time.perf_counter()
        self._fail_interrupted_trials()
        self._check_checkpoints()
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
            elif root.val_acc - best.val_acc > self.cfg.max_drop:
                stop = (f"best child of generation {generation} (node {best.node}) dropped "
                        f"{root.val_acc - best.val_acc:.2f} points > --max-drop {self.cfg.max_drop:g}")
            else:
                frontier = self._select(ok, root)
                set_selection(self.study, generation, [n.node for n in frontier])
                generation += 1
            self._refresh_notes(trained, root)
            write_lineage_csv(self.study, self.run_dir / "lineage.csv")  # current while the search runs
        final = frontier[0]
        seconds = time.perf_counter() - start
        self.study.set_user_attr("stop_reason", stop)
        self.study.set_user_attr("final_node", final.node)
        self.study.set_user_attr("wall_seconds", self.study.user_attrs.get("wall_seconds", 0.0) + seconds)
        write_lineage_csv(self.study, self.run_dir / "lineage.csv")
        return SearchOutcome(root, final, stop, generation - 1, seconds)

    def _refresh_notes(self, generation_nodes: list[Node], root: Node) -> None:
        """Rewrite a generation's dashboard notes once selection has decided each node's status."""
        accepted = {i for ids in selections(self.study).values() for i in ids}
        for n in [root] * (root.node not in {g.node for g in generation_nodes}) + generation_nodes:
            status = node_status(n, accepted)
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
        within = [n for n in ok if root.val_acc - n.val_acc <= self.cfg.max_drop]
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

    def _ancestors(self, node: Node) -> list[Node]:
        return ancestry(nodes(self.study), node)

    def _train_generation(self, generation: int, frontier: list[Node]) -> list[Node]:
        trained = []
        for slot in self.variant.plan(frontier, self._ancestors, self.cfg.children):
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
                    waiting = self._in_flight(key)
                    if waiting is None:
                        queued.append(self._enqueue(self._child_attrs(generation, slot, key, moves[0]),
                                                    move_params(moves[0], slot.parent.spec)))
                        planned.add(moves[0].spec)
                    else:
                        queued.append(waiting.number)
                        planned.add(VGGSpec.from_json(waiting.user_attrs["spec"]))
                else:
                    results.append(self._train_candidate(generation, slot, key, moves))
                grew = True
            if not grew:
                return results
            results += self._await(queued)

    def _child_attrs(self, generation: int, slot: Slot, key: str, move) -> dict:
        return node_attrs(generation=generation, parents=(slot.parent.node,), teachers=[t.node for t in slot.teachers],
                          operator=move.label, spec=move.spec, key=key, epochs=self.cfg.epochs)

    # -- workers ------------------------------------------------------------------------------------
    def _enqueue(self, attrs: dict, params: dict | None = None) -> int:
        """Queue one node as a WAITING trial (Optuna's enqueue_trial) for any worker to take; its
        move is fixed by `params`, its KD settings are sampled by the worker's trial."""
        self.study.enqueue_trial(params or {}, user_attrs=attrs)
        number = max(t.number for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
                     if t.user_attrs.get("key") == attrs["key"])
        self.log(f"gen {attrs['generation']}: queued node {number} {attrs['operator']} for the workers")
        return number

    def _in_flight(self, key: str) -> optuna.trial.FrozenTrial | None:
        """A queued or running trial for this candidate, left by an earlier coordinator: wait for it."""
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,
                                                               optuna.trial.TrialState.RUNNING)):
            if t.user_attrs.get("key") == key:
                return t
        return None

    def _await(self, numbers: list[int]) -> list[Node]:
        """Wait until the workers have finished these trials. A trial whose worker died (its process
        is gone, or its heartbeat went stale) is failed and its candidate queued again."""
        pending, done, tries = list(numbers), [], {}
        while pending:
            self._fail_interrupted_trials()
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since v2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)  # workers on other machines: heartbeats
            trials = self.study.get_trials(deepcopy=False)
            for number in [n for n in pending if trials[n].state.is_finished()]:
                pending.remove(number)
                t = trials[number]
                node = Node.from_trial(t)
                if t.state == optuna.trial.TrialState.FAIL and node.failure != "diverged":
                    key = t.user_attrs["key"]
                    tries[key] = tries.get(key, 0) + 1
                    if tries[key] > MAX_RETRIES:
                        raise IterkdError(f"node {number} ({t.user_attrs['operator']}) failed {tries[key]} times on "
                                          f"workers; last error: {node.error}")
                    attrs = {k: v for k, v in t.user_attrs.items() if k in NODE_ATTRS}
                    pending.append(self._enqueue(attrs, t.system_attrs.get("fixed_params")))
                else:
                    done.append(node)
            if pending:
                self._workers.check()
                time.sleep(POLL_S)
        done.sort(key=lambda n: n.node)
        for n in done:
            if n.state == "COMPLETE":
                self._log_node(n)
        return done

    def work(self, trial: optuna.Trial) -> Node:
        """Train the node a coordinator queued as this (claimed) trial: the worker's side of _enqueue."""
        a = trial.user_attrs
        if a["key"] == "root":
            return self._train_root(trial)
        by_id = {n.node: n for n in nodes(self.study)}
        parent = by_id[a["parents"][0]]
        spec = VGGSpec.from_json(a["spec"])
        moves = [m for m in self.space.moves(parent.spec) if m.spec == spec]
        if not moves:
            raise IterkdError(f"trial {trial.number}: {spec.summary()} is not a move of node {parent.node} in this space")
        slot = Slot(parent, tuple(by_id[i] for i in a["teachers"]), 1)
        return self._train_candidate(int(a["generation"]), slot, a["key"], moves, trial=trial)

    # -- nodes --------------------------------------------------------------------------------------
    def _existing(self, key: str) -> Node | None:
        """A finished node with this key, if a previous (interrupted) run already trained it."""
        for n in nodes(self.study):
            if n.key == key and n.state in ("COMPLETE", "PRUNED"):
                return n
            if n.key == key and n.state == "FAIL" and n.failure == "diverged":
                return n
        return None

    def _ensure_root(self) -> Node:
        root = root_node(nodes(self.study))
        if root is not None:
            return root
        if self.cfg.teacher:
            return self._root_from_teachers([Path(p) for p in self.cfg.teacher])
        if self.remote:
            waiting = self._in_flight("root")
            return self._await([self._enqueue(self._root_attrs()) if waiting is None else waiting.number])[0]
        return self._train_root()

    def _root_attrs(self) -> dict:
        spec = self.space.root_spec(self.info.channels, self.info.num_classes, self.info.size, self.cfg.width)
        return node_attrs(generation=0, parents=(), teachers=(), operator="root", spec=spec, key="root",
                          epochs=self.cfg.root_epochs)

    def _train_root(self, trial: optuna.Trial | None = None) -> Node:
        attrs = self._root_attrs()
        spec = VGGSpec.from_json(attrs["spec"])
        torch.manual_seed(self.cfg.seed)
        model = VGG(spec)
        return self._run_trial(attrs, model, lambda m, on_epoch: train(
            m, self.data, self.settings(self.cfg.root_epochs, self.cfg.seed), on_epoch=on_epoch,
            desc=f"root {spec.summary()}", progress=self.progress), trial=trial)

    def _root_from_teachers(self, paths: list[Path]) -> Node:
        """The root from given checkpoints. One: that model. Several: an ensemble whose averaged
        probabilities are the root's outputs (its accuracy is the reference for --max-drop and its
        members teach together); children derive from the member with the best validation accuracy,
        which is also the hint teacher and the root's checkpoint. Members are copied into the run."""
        info, members = self.info, []
        for path in paths:
            model = load_model(path).to(self.device)
            spec = model.spec
            if (spec.in_channels, spec.num_classes, spec.input_size) != (info.channels, info.num_classes, info.size):
                raise IterkdError(
                    f"teacher {path} takes {spec.in_channels}-channel {spec.input_size}px input with {spec.num_classes} "
                    f"classes, but {info.name} has {info.channels} channels, {info.size}px, {info.num_classes} classes")
            members.append((path, model, evaluate(model, self.data.val_x, self.data.val_y, self.data)))
        best = max(range(len(members)), key=lambda i: (members[i][2], -i))
        path, model, _ = members[best]
        name = path.name if len(paths) == 1 else f"ensemble of {len(paths)}"
        attrs = node_attrs(generation=0, parents=(), teachers=(), operator=f"teacher:{name}", spec=model.spec,
                           key="root")
        if len(paths) > 1:
            attrs["members"] = []
            for i, (p, m, val) in enumerate(members):
                ckpt = Path("checkpoints") / f"root-member-{i}.safetensors"
                save_checkpoint(self.run_dir / ckpt, m, source=str(p), val_acc=val)
                attrs["members"].append({"checkpoint": str(ckpt), "source": p.name, "spec_summary": m.spec.summary(),
                                         "params": m.spec.params(), "val_acc": val,
                                         "test_acc": evaluate(m, self.data.test_x, self.data.test_y, self.data)})
            attrs["ensemble_params"] = sum(m.spec.params() for _, m, _ in members)
        models = [m for _, m, _ in members]

        def measure(m, on_epoch):
            val = evaluate_ensemble(models, self.data.val_x, self.data.val_y, self.data)
            test = evaluate_ensemble(models, self.data.test_x, self.data.test_y, self.data)
            return TrainResult(val, test, 0.0, 0, [val], 0.0)

        return self._run_trial(attrs, model, measure)

    def _train_candidate(self, generation: int, slot: Slot, key: str, moves: list,
                         trial: optuna.Trial | None = None) -> Node:
        """Ask the study for a trial (or take the one a worker claimed, its move fixed when it was
        queued), let it choose the move and KD settings, train, record."""
        parent = slot.parent
        if trial is None and self.cfg.sampler == "greedy":  # the space's preferred move; only KD ranges are sampled
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.study.sampler = optuna.samplers.PartialFixedSampler(move_params(moves[0], parent.spec),
                                                                         self.sampler)
        try:  # a trial samples through study.sampler when it suggests, so keep it until then
            trial = trial or self.study.ask()
            move = suggest_move(trial, self.space, parent.spec, moves)
            kd = suggest_kd(trial, self.space, {"alpha": self.cfg.alpha, "temperature": self.cfg.temperature,
                                                "hint_weight": self.cfg.hint_weight, "lr": self.cfg.lr})
        finally:
            self.study.sampler = self.sampler
        seed = candidate_seed(self.cfg.seed, key)
        torch.manual_seed(seed)
        model = VGG(move.spec)
        hint_teacher = self._model(parent)
        init = {"init": self.cfg.init, **(inherit_weights(model, hint_teacher) if self.cfg.init == "inherit" else {})}
        # Accuracy before training, BN statistics re-estimated: how much of the parent the child starts with.
        recalibrate_bn(model.to(self.device), self.data)
        init["init_val_acc"] = evaluate(model, self.data.val_x, self.data.val_y, self.data)
        # An ensemble root teaches through its members; each counts as one teacher.
        members = [(t, i) for t in slot.teachers for i in range(max(1, len(t.members)))]
        teachers = [self._model(t, i) for t, i in members]
        caches = [self._teacher_cache(t, i) for t, i in members] if self.cfg.teacher_cache else []
        weights = [t.members[i]["val_acc"] if t.members else t.val_acc for t, i in members] \
            if self.cfg.teacher_weights == "accuracy" else None
        settings = replace(self.settings(self.cfg.epochs, seed, child=True), lr=kd["lr"],
                           loss=LossWeights(kd["alpha"], kd["temperature"], kd["hint_weight"], self.cfg.hint))
        attrs = node_attrs(generation=generation, parents=(parent.node,), teachers=[t.node for t in slot.teachers],
                           operator=move.label, spec=move.spec, key=key, loss=kd, epochs=self.cfg.epochs)
        attrs.update(init)
        return self._run_trial(attrs, model, lambda m, on_epoch: train(
            m, self.data, settings, teachers=teachers, teacher_weights=weights, hint_teacher=hint_teacher,
            teacher_cache=caches, on_epoch=on_epoch, progress=self.progress, desc=f"gen {generation} {move.label}"),
            trial=trial, parent=parent)

    def _model(self, node: Node, member: int | None = None) -> VGG:
        """A node's model; with `member`, that model of an ensemble root (a plain node is its own member 0)."""
        key = node.node if member is None or not node.members else f"{node.node}-{member}"
        if key not in self._models:
            path = node.checkpoint if key == node.node else node.members[member]["checkpoint"]
            self._models[key] = load_model(self.run_dir / path).to(self.device)
        return self._models[key]

    def _teacher_cache(self, node: Node, member: int = 0) -> TeacherCache:
        """A teacher's soft labels, shared by every student it teaches; kept in RUN/cache for resumed runs."""
        key = node.node if not node.members else f"{node.node}-{member}"
        if key not in self._caches:
            self._caches[key] = TeacherCache(self._model(node, member), self.data, seed=self.cfg.seed,
                                             views=self.cfg.views, directory=self.run_dir / "cache", node=key)
        return self._caches[key]

    def _run_trial(self, attrs: dict, model: VGG, fit, *, trial: optuna.Trial | None = None,
                   parent: Node | None = None) -> Node:
        """Run one node as one Optuna trial: attributes first (so a crash leaves a visible RUNNING
        trial), then training, checkpoint (also an Optuna artifact), accuracies, and the final state."""
        trial = trial or self.study.ask()
        # pid before host: a coordinator fails a RUNNING trial of its host whose pid is gone, and
        # must never see this trial with the host set and no pid yet.
        for k, v in {**attrs, "pid": os.getpid(), "host": socket.gethostname()}.items():
            trial.set_user_attr(k, v)

        def on_epoch(epoch: int, val_acc: float) -> None:
            # Children are compared by how far below their parent they are at each epoch, so the
            # pruner does not cut every child of a later (smaller) generation against earlier ones.
            if parent is None or self.multi_objective:
                return
            trial.report(val_acc - parent.val_acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch + 1}: {val_acc:.2f}% is weak against its siblings")

        try:
            result = fit(model, on_epoch)
            ckpt = Path("checkpoints") / f"node-{trial.number}.safetensors"
            save_checkpoint(self.run_dir / ckpt, model, node=trial.number, val_acc=result.val_acc)
            artifact_id = self._attach(trial, self.run_dir / ckpt)
        except TrainingDiverged as e:
            return self._finish(trial, optuna.trial.TrialState.FAIL, error=str(e), failure="diverged")
        except optuna.TrialPruned as e:
            return self._finish(trial, optuna.trial.TrialState.PRUNED, error=str(e))
        except BaseException as e:  # Ctrl-C, a full disk or a bug: the trial fails, its candidate is retried on resume
            if not isinstance(e, KeyboardInterrupt):
                trial.set_user_attr("error", (str(e).splitlines() or [type(e).__name__])[0][:300])
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        self._models[trial.number] = model.eval()
        root = root_node(nodes(self.study))
        drop = 0.0 if root is None else root.val_acc - result.val_acc
        for k, v in {"checkpoint": str(ckpt), "artifact_id": artifact_id, "val_acc": result.val_acc,
                     "test_acc": result.test_acc, "drop": round(drop, 4), "seconds": round(result.seconds, 2),
                     "history": result.history, "images_per_s": round(result.images_per_s, 1),
                     "budget": "within" if drop <= self.cfg.max_drop else "over",
                     "teacher_cache_hit_rate": result.cache_hit_rate}.items():
            trial.set_user_attr(k, v)
        if self.cfg.deploy_figures:  # CPU latency/throughput + ONNX size, for the lineage and model cards
            from .deploy import node_figures
            for k, v in node_figures(load_model(self.run_dir / ckpt)).items():
                trial.set_user_attr(k, v)
        trial.set_constraint("drop_over_budget", drop - self.cfg.max_drop)  # feasible when <= 0
        values = [result.val_acc, model.spec.params()] if self.multi_objective else result.val_acc
        node = self._finish(trial, optuna.trial.TrialState.COMPLETE, values=values)
        self._log_node(node)
        return node

    def _finish(self, trial: optuna.Trial, state, *, values=None, error: str = "", failure: str = "") -> Node:
        if error:
            trial.set_user_attr("error", error)
            self.log(f"node {trial.number} {state.name.lower()}: {error}")
        if failure:
            trial.set_user_attr("failure", failure)
        write_note(self.study, trial.number, lineage_card(self._node_of(trial, state), root_node(nodes(self.study))))
        if values is None:
            self.study.tell(trial, state=state)
        else:
            self.study.tell(trial, values)
        return Node.from_trial(self.study.get_trials(deepcopy=False)[trial.number])

    def _node_of(self, trial: optuna.Trial, state) -> Node:
        """The node as it will read once told (for its dashboard note, written before `tell`)."""
        frozen = self.study.get_trials(deepcopy=False)[trial.number]
        return replace(Node.from_trial(frozen), state=state.name)

    def _attach(self, trial: optuna.Trial, path: Path) -> str | None:
        """Attach the checkpoint to the trial as an Optuna artifact (downloadable from the
        dashboard); the artifact file is then a hard link to the checkpoint, so it costs no disk."""
        artifact_id = upload_artifact(artifact_store=self.artifacts, file_path=str(path), study_or_trial=trial)
        copy = self.run_dir / "artifacts" / artifact_id
        try:
            tmp = copy.with_name(f".{artifact_id}.link")
            os.link(path, tmp)
            os.replace(tmp, copy)
        except OSError:
            pass  # another filesystem: keep the copy
        return artifact_id

    def _log_node(self, n: Node) -> None:
        root = root_node(nodes(self.study)) if n.generation else n
        ratio = root.spec.params() / n.spec.params()
        drop = f"drop {root.val_acc - n.val_acc:+.2f} pts" if n.generation else "root"
        self.log(f"gen {n.generation} node {n.node:>3}  {n.operator:<28} {n.spec.params():>11,} params "
                 f"({ratio:.1f}x smaller)  val {n.val_acc:.2f}%  test {n.test_acc:.2f}%  {drop}  {n.seconds:.0f}s")

    def _check_checkpoints(self) -> None:
        """Verify the checkpoints a resumed run will load: the root's and every accepted node's. A
        damaged one is reported with its path, its node then reads as failed (lineage.nodes) and is
        trained again, and the generations selected from it onwards are decided again."""
        sel = selections(self.study)
        all_nodes = nodes(self.study)
        root = root_node(all_nodes)
        needed = {i for ids in sel.values() for i in ids} | ({root.node} if root else set())
        damaged: dict[int, str] = {}
        for n in all_nodes:
            if n.node in needed and n.ok:
                paths = [n.checkpoint] + [m["checkpoint"] for m in n.members]
                for path in filter(None, paths):
                    try:
                        read_checkpoint(self.run_dir / path)
                    except IterkdError as e:
                        damaged[n.node] = str(e)
        if not damaged:
            return
        for i, why in damaged.items():
            self.log(f"node {i}: {why}. It will be trained again.")
        self.study.set_user_attr("damaged", sorted(set(self.study.user_attrs.get("damaged", ())) | set(damaged)))
        first = min(n.generation for n in all_nodes if n.node in damaged)
        self.study.set_user_attr("selections", {str(g): ids for g, ids in sel.items() if g < first})

    def _fail_interrupted_trials(self) -> None:
        """RUNNING trials left by a process of this machine that no longer exists are marked failed
        ('interrupted'), so their candidates are trained again."""
        host = socket.gethostname()
        if not self.remote:  # trials queued for workers by an earlier coordinator: nobody will take them
            for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
                # Study.tell takes RUNNING trials only; the storage call is what it does underneath.
                self.study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)  # noqa: SLF001
                self.log(f"node {t.number} was queued for workers; it will be trained here instead")
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            pid = t.user_attrs.get("pid")
            if t.user_attrs.get("host") == host and isinstance(pid, int) and pid != os.getpid() and not _alive(pid):
                self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                self.log(f"node {t.number} was interrupted by a crash; its candidate will be trained again")


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def summary_table(study: optuna.Study):
    """The lineage as a compact pandas table for the terminal."""
    df = lineage_frame(study)
    cols = ["node", "generation", "parents", "teachers", "operator", "params", "val_acc", "test_acc", "drop",
            "status", "seconds"]
    return df[cols]

