"""The orchestrator: trains the root, then generation by generation asks the variant for
candidates, trains each from its teachers, records it in the study, selects, and stops when the
best child loses more than --max-drop points. Re-running on the same run directory resumes."""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import optuna
import torch

from .arch import VGGSpec
from .checkpoints import load_model, save_checkpoint
from .config import SearchConfig, config_path
from .data import DataSplits, dataset_info, load_data
from .errors import IterkdError, TrainingDiverged
from .lineage import (Node, ancestry, default_storage, redact_url, lineage_frame, node_attrs, nodes, open_study,
                      root_node, selections, set_selection, write_atomic, write_lineage_csv)
from .losses import LossWeights
from .models import VGG
from .spaces import load_space
from .train import TrainSettings, resolve_device, train
from .variants import VARIANTS, Candidate


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
        self.study = open_study(cfg.storage or default_storage(self.run_dir), cfg.name)
        if not config_path(self.run_dir).exists():  # saved only once the run can really start
            # Passwords never reach disk or the study: a resumed run asks for --storage again.
            saved = replace(cfg, storage=redact_url(cfg.storage) if cfg.storage else None)
            write_atomic(config_path(self.run_dir), saved.to_json())
            self.study.set_user_attr("config", json.loads(saved.to_json()))  # reports read it from the study
        self._data: DataSplits | None = None
        self._models: dict[int, VGG] = {}

    # -- setup --------------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        try:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
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

    def settings(self, epochs: int, seed: int) -> TrainSettings:
        c = self.cfg
        return TrainSettings(epochs=epochs, batch_size=c.batch_size, lr=c.lr, weight_decay=c.weight_decay,
                             loss=LossWeights(c.alpha, c.temperature, c.hint_weight), seed=seed)

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> SearchOutcome:
        start = time.perf_counter()
        self._fail_interrupted_trials()
        root = self._ensure_root()
        frontier, generation = self._frontier(root)
        stop = ""
        while not stop:
            if generation > self.cfg.max_generations:
                stop = f"reached --max-generations {self.cfg.max_generations}"
                break
            trained = self._train_generation(generation, frontier)
            if not trained:
                stop = "the space has no smaller child to propose (min_model reached)"
                break
            ok = [n for n in trained if n.ok]
            if not ok:
                stop = f"every candidate of generation {generation} failed"
                break
            best = max(ok, key=lambda n: n.val_acc)
            drop = root.val_acc - best.val_acc
            if drop > self.cfg.max_drop:
                stop = (f"best child of generation {generation} (node {best.node}) dropped {drop:.2f} points "
                        f"> --max-drop {self.cfg.max_drop:g}")
                break
            frontier = self._select(ok, root)
            set_selection(self.study, generation, [n.node for n in frontier])
            generation += 1
        final = frontier[0]
        seconds = time.perf_counter() - start
        self.study.set_user_attr("stop_reason", stop)
        self.study.set_user_attr("final_node", final.node)
        self.study.set_user_attr("wall_seconds", self.study.user_attrs.get("wall_seconds", 0.0) + seconds)
        write_lineage_csv(self.study, self.run_dir / "lineage.csv")
        return SearchOutcome(root, final, stop, generation - 1, seconds)

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
        if self.cfg.select == "smallest-within-budget":
            ranked = sorted(within, key=lambda n: (n.spec.params(), -n.val_acc, n.node))
        else:
            ranked = sorted(within, key=lambda n: (-n.val_acc, n.spec.params(), n.node))
        return ranked[:self.cfg.beam]

    def _ancestors(self, node: Node) -> list[Node]:
        return ancestry(nodes(self.study), node)

    def _train_generation(self, generation: int, frontier: list[Node]) -> list[Node]:
        """Train (or reuse) this generation's candidates; a child that diverges is replaced by the
        next move the space offers, so one bad child does not end the search."""
        done: dict[str, Node] = {}
        excluded: set[str] = set()
        while True:
            cands = self.variant.plan(generation, frontier, self._ancestors, self.space, self.cfg.children, excluded)
            todo = [c for c in cands if c.key not in done]
            if not todo:
                return list(done.values())
            for c in todo:
                done[c.key] = node = self._train_candidate(c)
                if not node.ok:
                    excluded.add(c.key)

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
            return self._root_from_teacher(Path(self.cfg.teacher))
        spec = self.space.root_spec(self.info.channels, self.info.num_classes, self.info.size, self.cfg.width)
        torch.manual_seed(self.cfg.seed)
        model = VGG(spec)
        attrs = node_attrs(generation=0, parents=(), teachers=(), operator="root", spec=spec, key="root",
                           epochs=self.cfg.root_epochs)
        return self._run_trial(attrs, model, lambda m, on_epoch: train(
            m, self.data, self.settings(self.cfg.root_epochs, self.cfg.seed), on_epoch=on_epoch,
            desc=f"root {spec.summary()}", progress=self.progress))

    def _root_from_teacher(self, path: Path) -> Node:
        from .train import evaluate

        model = load_model(path)
        spec, info = model.spec, self.info
        if (spec.in_channels, spec.num_classes, spec.input_size) != (info.channels, info.num_classes, info.size):
            raise IterkdError(
                f"teacher {path} takes {spec.in_channels}-channel {spec.input_size}px input with {spec.num_classes} "
                f"classes, but {info.name} has {info.channels} channels, {info.size}px, {info.num_classes} classes")
        attrs = node_attrs(generation=0, parents=(), teachers=(), operator=f"teacher:{path.name}", spec=spec,
                           key="root")

        def measure(m, on_epoch):
            m.to(self.device)
            val = evaluate(m, self.data.val_x, self.data.val_y, self.data)
            test = evaluate(m, self.data.test_x, self.data.test_y, self.data)
            from .train import TrainResult
            return TrainResult(val, test, 0.0, 0, [val], 0.0)

        return self._run_trial(attrs, model, measure)

    def _train_candidate(self, c: Candidate) -> Node:
        existing = self._existing(c.key)
        if existing is not None:
            self.log(f"gen {c.generation}: reusing node {existing.node} {c.move.label} (already trained)")
            return existing
        seed = c.seed(self.cfg.seed)
        torch.manual_seed(seed)
        model = VGG(c.move.spec)
        teachers = [self._model(t) for t in c.teachers]
        hint_teacher = self._model(c.parent)
        weights = [t.val_acc for t in c.teachers] if self.cfg.teacher_weights == "accuracy" else None
        loss = {"alpha": self.cfg.alpha, "temperature": self.cfg.temperature, "hint_weight": self.cfg.hint_weight}
        attrs = node_attrs(generation=c.generation, parents=(c.parent.node,), teachers=[t.node for t in c.teachers],
                           operator=c.move.label, spec=c.move.spec, key=c.key, loss=loss, epochs=self.cfg.epochs)
        return self._run_trial(attrs, model, lambda m, on_epoch: train(
            m, self.data, self.settings(self.cfg.epochs, seed), teachers=teachers, teacher_weights=weights,
            hint_teacher=hint_teacher, on_epoch=on_epoch, progress=self.progress,
            desc=f"gen {c.generation} {c.move.label}"))

    def _model(self, node: Node) -> VGG:
        if node.node not in self._models:
            self._models[node.node] = load_model(self.run_dir / node.checkpoint).to(self.device)
        return self._models[node.node]

    def _run_trial(self, attrs: dict, model: VGG, fit) -> Node:
        """Run one node as one Optuna trial: attributes first (so a crash leaves a visible RUNNING
        trial), then training, checkpoint, accuracies, and the trial's final state."""
        trial = self.study.ask()
        for k, v in {**attrs, "host": socket.gethostname(), "pid": os.getpid()}.items():
            trial.set_user_attr(k, v)

        def on_epoch(epoch: int, val_acc: float) -> None:
            trial.report(val_acc, epoch)

        try:
            result = fit(model, on_epoch)
        except TrainingDiverged as e:
            trial.set_user_attr("error", str(e))
            trial.set_user_attr("failure", "diverged")
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self.log(f"node {trial.number} failed: {e}")
            return Node.from_trial(self.study.get_trials(deepcopy=False)[trial.number])
        except BaseException:  # Ctrl-C or a bug: the trial fails, its candidate is retried on resume
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        ckpt = Path("checkpoints") / f"node-{trial.number}.safetensors"
        save_checkpoint(self.run_dir / ckpt, model, node=trial.number, val_acc=result.val_acc)
        self._models[trial.number] = model.eval()
        for k, v in {"checkpoint": str(ckpt), "val_acc": result.val_acc, "test_acc": result.test_acc,
                     "seconds": round(result.seconds, 2), "history": result.history,
                     "images_per_s": round(result.images_per_s, 1)}.items():
            trial.set_user_attr(k, v)
        if self.cfg.deploy_figures:  # CPU latency/throughput + ONNX size, for the lineage and model cards
            from .deploy import node_figures
            for k, v in node_figures(load_model(self.run_dir / ckpt)).items():
                trial.set_user_attr(k, v)
        self.study.tell(trial, result.val_acc)
        node = Node.from_trial(self.study.get_trials(deepcopy=False)[trial.number])
        self._log_node(node)
        return node

    def _log_node(self, n: Node) -> None:
        root = root_node(nodes(self.study)) if n.generation else n
        ratio = root.spec.params() / n.spec.params()
        drop = f"drop {root.val_acc - n.val_acc:+.2f} pts" if n.generation else "root"
        self.log(f"gen {n.generation} node {n.node:>3}  {n.operator:<28} {n.spec.params():>11,} params "
                 f"({ratio:.1f}x smaller)  val {n.val_acc:.2f}%  test {n.test_acc:.2f}%  {drop}  {n.seconds:.0f}s")

    def _fail_interrupted_trials(self) -> None:
        """RUNNING trials left by a process of this machine that no longer exists are marked failed
        ('interrupted'), so their candidates are trained again."""
        host = socket.gethostname()
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            pid = t.user_attrs.get("pid")
            if t.user_attrs.get("host") == host and pid != os.getpid() and not _alive(pid):
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
