"""What a node is trained with: the root (on labels, or given checkpoints), and each child (its move
in the space, weights inherited from its parent, its teachers and their soft-label caches, its KD
settings). `NodeTrainer` holds what nodes share in one process (data, loaded teachers, caches); the
local search and `iterkd worker` both train through it, and it records each node with `run_node`."""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import optuna
import torch

from .cache import TeacherCache, cache_dir
from .checkpoints import load_model, save_checkpoint
from .choices import move_params, suggest_kd, suggest_move
from .data import DatasetInfo, DataSplits
from .device import resolve_device, resolve_precision
from .errors import IterkdError
from .importers import FrozenTeacher, check_input, file_sha256, load_teacher
from .importers.frozen import frozen_for_data
from .inherit import inherit_weights
from .lineage import POLISH, Node, node_attrs, nodes
from .models import VGG
from .node import create_trial, run_node
from .run import Run
from .spaces import Move, has_head, load_space
from .train import TrainResult, TrainSettings, evaluate, evaluate_ensemble, recalibrate_bn, train
from .variants import Slot, candidate_seed, key_format, polish_key


def train_settings(cfg, epochs: int, seed: int, *, child: bool = False) -> TrainSettings:
    """The TrainSettings of a run's root, or of a child before its own KD settings (also `iterkd compare`'s)."""
    # Children share the run's augmentation views, so one teacher cache serves all of them.
    views = dict(views=cfg.views, augment_seed=cfg.seed) if child else {}
    return TrainSettings(
        epochs=epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        loss=cfg.loss_weights(),
        seed=seed,
        compile=cfg.compile,
        precision=cfg.precision,
        **views,
    )


def kd_settings(cfg, epochs: int, seed: int, kd: dict) -> TrainSettings:
    """A child's TrainSettings with its own KD values (`alpha`, `temperature`, `hint_weight`, `lr`),
    sampled by its trial or recorded on a node (also `iterkd compare`'s one-shot KD)."""
    loss = replace(
        cfg.loss_weights(), alpha=kd["alpha"], temperature=kd["temperature"], hint_weight=kd["hint_weight"]
    )
    return replace(train_settings(cfg, epochs, seed, child=True), lr=kd["lr"], loss=loss)


def frozen_teacher(run_dir: Path, record: dict, cfg, info: DatasetInfo, device="cpu") -> FrozenTeacher:
    """A root's frozen teacher (`record`, one of its `frozen`) from the run directory on `device`,
    checked against the hash it had when the run began, its inputs normalised as the run says."""
    path = Path(run_dir) / record["file"]
    if not path.is_file() or file_sha256(path) != record["sha256"]:
        raise IterkdError(
            f"frozen teacher {path} is missing or was changed since the run began (sha256 "
            f"{record['sha256'][:12]}...); put {record['source']} back there"
        )
    return frozen_for_data(path, info, cfg.frozen_inputs(), device, name=record["source"])


class NodeTrainer:
    def __init__(
        self,
        run: Run,
        *,
        data: DataSplits | None = None,
        info: DatasetInfo | None = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ):
        self.run, self.cfg, self.progress, self.log = run, run.cfg, progress, log
        self.space = load_space(self.cfg.space)
        self.info = info or (data.info if data is not None else self.cfg.data_info())
        self.device = resolve_device(self.cfg.device)
        resolve_precision(
            self.cfg.precision, self.device
        )  # an impossible --precision is refused before any node
        self._data = data  # loaded on first use when not given
        self._models: dict[int | str, VGG] = {}  # node, or 'node-member' of an ensemble root
        self._caches: dict[int | str, TeacherCache] = {}

    @property
    def data(self) -> DataSplits:
        if self._data is None:
            self._data = self.run.load_data(self.device, progress=self.progress, log=self.log)
        return self._data

    # -- the root -----------------------------------------------------------------------------------
    def root_spec(self):
        """The root this run's space, dataset and --width make."""
        return self.space.root_spec(self.info.channels, self.info.num_classes, self.info.size, self.cfg.width)

    def root_attrs(self) -> dict:
        return node_attrs(
            generation=0,
            parents=(),
            teachers=(),
            operator="root",
            spec=self.root_spec(),
            key="root",
            epochs=self.cfg.root_epochs,
        )

    def train_root(self, trial: optuna.Trial | None = None) -> Node:
        """The root trained on labels; `trial` when a worker claimed it, else a new one."""
        trial = trial or create_trial(self.run.study, self.root_attrs())
        torch.manual_seed(self.cfg.seed)
        model = VGG(self.root_spec())
        settings = train_settings(self.cfg, self.cfg.root_epochs, self.cfg.seed)
        return self._train(trial, model, settings, f"root {model.spec.summary()}")

    def root_from_teachers(
        self,
        paths: list[Path],
        *,
        operator: str | None = None,
        epochs: int = 0,
        loaded: dict | None = None,
        frozen: list[Path] = (),
    ) -> Node:
        """The root from given checkpoints. One: that model. Several: an ensemble whose averaged
        probabilities are the root's outputs (its accuracy is the reference for --max-drop and its
        members teach together); children derive from the member with the best validation accuracy,
        which is also the hint teacher and the root's checkpoint. Members are copied into the run.
        `operator` and `epochs` describe where the checkpoint came from (a packaged root) when known.
        `frozen` teachers (programs) are copied into the run and teach wherever the root teaches."""
        info, data, members = self.info, self.data, []
        for path in paths:
            teacher = (loaded or {}).get(path) or load_teacher(
                path, size=info.size, arch=self.cfg.teacher_arch
            )
            check_input(teacher.model.spec, info, path)
            model = teacher.model.to(self.device)
            val = evaluate(model, data.val_x, data.val_y, data)
            line = f"teacher {teacher.describe(path)}; validation accuracy {val:.2f} %"
            self.log(line + self._chance_note(val))
            members.append((path, model, val))
        best = max(range(len(members)), key=lambda i: (members[i][2], -i))
        path, model, _ = members[best]
        name = path.name if len(paths) == 1 else f"ensemble of {len(paths)}"
        attrs = node_attrs(
            generation=0,
            parents=(),
            teachers=(),
            operator=operator or f"teacher:{name}",
            spec=model.spec,
            key="root",
            epochs=epochs,
        )
        if frozen:
            attrs["frozen"] = self._frozen_records(frozen, loaded or {})
        if len(paths) > 1:
            attrs["members"] = []
            for i, (p, m, val) in enumerate(members):
                ckpt = Path("checkpoints") / f"root-member-{i}.safetensors"
                save_checkpoint(self.run.run_dir / ckpt, m, source=str(p), val_acc=val)
                attrs["members"].append(
                    {
                        "checkpoint": str(ckpt),
                        "source": p.name,
                        "spec_summary": m.spec.summary(),
                        "params": m.spec.params(),
                        "val_acc": val,
                        "test_acc": evaluate(m, data.test_x, data.test_y, data),
                    }
                )
            attrs["ensemble_params"] = sum(m.spec.params() for _, m, _ in members)
        models = [m for _, m, _ in members]

        def measure(m, on_epoch):
            val = evaluate_ensemble(models, data.val_x, data.val_y, data)
            test = evaluate_ensemble(models, data.test_x, data.test_y, data)
            return TrainResult(val, test, 0.0, 0, [val], 0.0)

        return self._record(create_trial(self.run.study, attrs), model, measure)

    def root_from_frozen(self, paths: list[Path], loaded: dict) -> Node:
        """With frozen teachers only, generation 0 is the space's root VGG trained for --root-epochs
        by KD from them (no hint: they have no blocks to give one). The node stands for its teachers:
        its val_acc/test_acc are the best teacher's, the reference for --max-drop, and the VGG's own
        are `vgg_val_acc`/`vgg_test_acc`; its checkpoint is the VGG that children derive from."""
        records = self._frozen_records(paths, loaded)
        best = max(records, key=lambda r: r["val_acc"])
        name = paths[0].name if len(paths) == 1 else f"{len(paths)} frozen teachers"
        attrs = node_attrs(
            generation=0,
            parents=(),
            teachers=(),
            operator=f"kd:{name}",
            spec=self.root_spec(),
            key="root",
            loss=self.kd_defaults(),
            epochs=self.cfg.root_epochs,
        )
        attrs["frozen"] = records
        trial = create_trial(self.run.study, attrs)
        torch.manual_seed(self.cfg.seed)
        model = VGG(self.root_spec())
        settings = kd_settings(self.cfg, self.cfg.root_epochs, self.cfg.seed, self.kd_defaults())
        teaching = self._frozen_teaching(records)
        desc = f"root {model.spec.summary()} from {name}"

        def fit(m, on_epoch):
            result = train(
                m, self.data, settings, on_epoch=on_epoch, progress=self.progress, desc=desc, **teaching
            )
            trial.set_user_attr("vgg_val_acc", result.val_acc)
            trial.set_user_attr("vgg_test_acc", result.test_acc)
            self.log(
                f"generation 0: {model.spec.summary()} after {result.epochs} epochs of KD from {name}: "
                f"validation {result.val_acc:.2f} % (drop {best['val_acc'] - result.val_acc:+.2f} points "
                f"against {best['source']}'s {best['val_acc']:.2f} %, the reference for --max-drop)"
            )
            return replace(result, val_acc=best["val_acc"], test_acc=best["test_acc"])

        return self._record(trial, model, fit)

    def _frozen_records(self, paths: list[Path], loaded: dict) -> list[dict]:
        """Copy each frozen teacher into RUN/teachers (resume and workers load it from there), measure
        it on the validation and test splits, and say so; the records the root node keeps."""
        records = []
        folder = self.run.run_dir / "teachers"
        folder.mkdir(exist_ok=True)
        for i, path in enumerate(paths):
            teacher = loaded[path]
            target = folder / f"{i}-{path.name}"
            if not target.is_file() or file_sha256(target) != teacher.spec.sha256:
                tmp = target.with_name(f".{target.name}.tmp")
                shutil.copyfile(path, tmp)
                os.replace(tmp, target)
            model = teacher.to(self.device)
            val = evaluate(model, self.data.val_x, self.data.val_y, self.data)
            test = evaluate(model, self.data.test_x, self.data.test_y, self.data)
            self.log(
                f"teacher {path.name}: frozen {teacher.spec.summary()}, {teacher.spec.params():,} params, "
                f"inputs normalised as {teacher.spec.normalize}; validation accuracy {val:.2f} %"
                + self._chance_note(val)
            )
            self._models[f"frozen-{i}"] = model
            records.append(
                {
                    "file": str(target.relative_to(self.run.run_dir)),
                    "source": path.name,
                    "kind": teacher.spec.kind,
                    "sha256": teacher.spec.sha256,
                    "params": teacher.spec.params(),
                    "val_acc": val,
                    "test_acc": test,
                }
            )
        return records

    def frozen(self, records, i: int) -> FrozenTeacher:
        """Frozen teacher `i` of the root (`records`: its `frozen`), loaded from the run directory."""
        key = f"frozen-{i}"
        if key not in self._models:
            self._models[key] = frozen_teacher(self.run.run_dir, records[i], self.cfg, self.info, self.device)
        return self._models[key]

    def _frozen_teaching(self, records) -> dict:
        """train()'s teachers, caches and weights for the frozen teachers `records` alone."""
        teachers = [self.frozen(records, i) for i in range(len(records))]
        caches = (
            [self.teacher_cache_of(t, f"frozen-{i}") for i, t in enumerate(teachers)]
            if self.cfg.teacher_cache
            else []
        )
        weights = [r["val_acc"] for r in records] if self.cfg.teacher_weights == "accuracy" else None
        return {
            "teachers": teachers,
            "teacher_cache": caches,
            "teacher_weights": weights,
            "hint_teacher": None,
        }

    def _chance_note(self, val: float) -> str:
        """What a teacher's validation accuracy near chance probably means, else nothing."""
        info, chance = self.info, 100 / self.info.num_classes
        if val >= 2 * chance:
            return ""
        return (
            f", near chance ({chance:.0f} % for {info.num_classes} classes): the class order here "
            f"({', '.join(info.class_names[:3])}, ...: sorted folder names for an image folder) "
            "probably differs from the one the model was trained with, or its inputs were "
            "normalised otherwise (--normalize / --teacher-normalize imagenet, or its mean/std)"
        )

    # -- children -----------------------------------------------------------------------------------
    def child_attrs(
        self, generation: int, slot: Slot, key: str, move: Move, loss: dict | None = None
    ) -> dict:
        return node_attrs(
            generation=generation,
            parents=(slot.parent.node,),
            teachers=[t.node for t in slot.teachers],
            operator=move.label,
            spec=move.spec,
            key=key,
            loss=loss,
            epochs=self.cfg.epochs,
        )

    def train_child(
        self, generation: int, slot: Slot, key: str, moves: list[Move], trial: optuna.Trial | None = None
    ) -> Node:
        """Create the candidate's trial (or take the one a worker claimed, its move fixed when it was
        queued), let it choose the move and KD settings, inherit, train with its teachers, record."""
        parent = slot.parent
        if trial is None:
            # greedy: the space's preferred move, fixed when the trial is queued; else Optuna chooses it
            greedy = self.cfg.sampler == "greedy"
            attrs = self.child_attrs(generation, slot, key, moves[0])
            if not greedy:  # the move is not chosen yet: no spec until it is, so no node shows a wrong one
                attrs = {k: attrs[k] for k in ("generation", "parents", "teachers", "key", "epochs")}
            trial = create_trial(
                self.run.study, attrs, move_params(moves[0], parent.spec) if greedy else None
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            move = suggest_move(trial, self.space, parent.spec, moves, head=has_head(self.run.root.spec))
            cfg = self.cfg
            kd = suggest_kd(trial, self.space, self.kd_defaults())
        seed = candidate_seed(cfg.seed, key)
        torch.manual_seed(seed)
        model = VGG(move.spec)
        hint_teacher = self.model(parent)
        init = {"init": cfg.init, **(inherit_weights(model, hint_teacher) if cfg.init == "inherit" else {})}
        # Accuracy before training, BN statistics re-estimated: how much of the parent the child starts with.
        recalibrate_bn(model.to(self.device), self.data)
        init["init_val_acc"] = evaluate(model, self.data.val_x, self.data.val_y, self.data)
        for k, v in {**self.child_attrs(generation, slot, key, move, kd), **init}.items():
            if trial.user_attrs.get(k) != v:
                trial.set_user_attr(k, v)
        settings = kd_settings(cfg, cfg.epochs, seed, kd)
        desc = f"gen {generation} {move.label}"
        return self._distil(trial, model, settings, desc, slot.teachers, hint_teacher, parent=parent)

    # -- the polish -----------------------------------------------------------------------------------
    def polish_attrs(self, node: Node, teachers: tuple[Node, ...], epochs: int) -> dict:
        """The polish of `node`: the same architecture, one generation below it, taught by `teachers`
        (the root, or every ancestor) for `epochs` with the node's own KD settings, keyed by
        `polish_key`."""
        return node_attrs(
            generation=node.generation + 1,
            parents=(node.node,),
            teachers=[t.node for t in teachers],
            operator=POLISH,
            spec=node.spec,
            key=polish_key(node, epochs, key_format(self.run.study)),
            loss=node.loss or self.kd_defaults(),
            epochs=epochs,
        )

    def train_polish(
        self, node: Node, teachers: tuple[Node, ...], epochs: int, trial: optuna.Trial | None = None
    ) -> Node:
        """Fine-tune a copy of `node` (its own weights, no move) with KD from `teachers`; the hint
        comes from the nearest of them, as a child's comes from its parent. No pruner cuts it short."""
        attrs = self.polish_attrs(node, teachers, epochs)
        trial = trial or create_trial(self.run.study, attrs)
        model = load_model(self.run.run_dir / node.checkpoint).to(
            self.device
        )  # a copy: the cached one teaches
        settings = kd_settings(self.cfg, epochs, candidate_seed(self.cfg.seed, attrs["key"]), attrs["loss"])
        desc = f"polish node {node.node}"
        return self._distil(trial, model, settings, desc, teachers, self.model(teachers[-1]))

    def kd_defaults(self) -> dict:
        cfg = self.cfg
        return {
            "alpha": cfg.alpha,
            "temperature": cfg.temperature,
            "hint_weight": cfg.hint_weight,
            "lr": cfg.lr,
        }

    def _distil(
        self,
        trial,
        model: VGG,
        settings: TrainSettings,
        desc: str,
        teacher_nodes,
        hint_teacher,
        *,
        parent=None,
    ) -> Node:
        """Train `model` with KD from `teacher_nodes`; an ensemble root teaches through its members,
        each counting as one teacher."""
        cfg = self.cfg
        members = [(t, i) for t in teacher_nodes for i in range(max(1, len(t.members)))]
        teachers = [self.model(t, i) for t, i in members]
        caches = [self.teacher_cache(t, i) for t, i in members] if cfg.teacher_cache else []
        weights = (
            # a root made from frozen teachers weighs in with its own VGG's accuracy, not theirs
            [t.members[i]["val_acc"] if t.members else t.vgg_val_acc or t.val_acc for t, i in members]
            if cfg.teacher_weights == "accuracy"
            else None
        )
        # The root's frozen teachers teach beside it, wherever it teaches (never as the hint teacher).
        root = next((t for t in teacher_nodes if t.generation == 0 and t.frozen), None)
        if root is not None:
            extra = self._frozen_teaching(root.frozen)
            teachers += extra["teachers"]
            caches += extra["teacher_cache"]
            weights = None if weights is None else weights + extra["teacher_weights"]
        return self._train(
            trial,
            model,
            settings,
            desc,
            teachers=teachers,
            teacher_weights=weights,
            hint_teacher=hint_teacher,
            teacher_cache=caches,
            parent=parent,
        )

    def train_queued(self, trial: optuna.Trial) -> Node:
        """Train the node a coordinator queued as this (claimed) trial: the worker's side of queueing."""
        a = trial.user_attrs
        if a["key"] == "root":
            return self.train_root(trial)
        by_id = {n.node: n for n in nodes(self.run.study)}
        if a["operator"] == POLISH:
            teachers = tuple(by_id[i] for i in a["teachers"])
            return self.train_polish(by_id[a["parents"][0]], teachers, int(a["epochs"]), trial=trial)
        parent = by_id[a["parents"][0]]
        spec = Node.from_trial(self.run.study.get_trials(deepcopy=False)[trial.number]).spec
        moves = [m for m in self.space.moves(parent.spec) if m.spec == spec]
        if not moves:
            raise IterkdError(
                f"trial {trial.number}: {spec.summary()} is not a move of node {parent.node} in this space"
            )
        slot = Slot(parent, tuple(by_id[i] for i in a["teachers"]), 1)
        return self.train_child(int(a["generation"]), slot, a["key"], moves, trial=trial)

    # -- shared by the nodes of a process -----------------------------------------------------------
    def _train(
        self, trial, model: VGG, settings: TrainSettings, desc: str, *, parent=None, **teaching
    ) -> Node:
        """Train `model` with `train()` as the node of `trial` (`teaching`: teachers, caches, hint teacher)."""

        def fit(m, on_epoch):
            return train(
                m, self.data, settings, on_epoch=on_epoch, progress=self.progress, desc=desc, **teaching
            )

        return self._record(trial, model, fit, parent=parent)

    def _record(self, trial: optuna.Trial, model: VGG, fit, *, parent: Node | None = None) -> Node:
        # Every checkpoint says what its outputs are and how its inputs were normalised.
        info = self.info
        data_meta = {"classes": info.class_names, "mean": list(info.mean), "std": list(info.std)}
        node = run_node(self.run, trial, model, fit, parent=parent, log=self.log, data_meta=data_meta)
        if node.ok:
            self._models[node.node] = model.eval()
        return node

    def model(self, node: Node, member: int | None = None) -> VGG:
        """A node's model; with `member`, that model of an ensemble root (a plain node is its own member 0)."""
        key = node.node if member is None or not node.members else f"{node.node}-{member}"
        if key not in self._models:
            path = node.checkpoint if key == node.node else node.members[member]["checkpoint"]
            self._models[key] = load_model(self.run.run_dir / path).to(self.device)
        return self._models[key]

    def teacher_cache(self, node: Node, member: int = 0) -> TeacherCache:
        """A teacher's soft labels, shared by every student it teaches; kept in RUN/cache for resumed runs
        until the search ends (cache.remove_cache)."""
        key = node.node if not node.members else f"{node.node}-{member}"
        return self.teacher_cache_of(self.model(node, member), key)

    def teacher_cache_of(self, model, key: int | str) -> TeacherCache:
        """The cache of `model` (a node's, a member's or a frozen teacher's), named `key` in RUN/cache."""
        if key not in self._caches:
            self._caches[key] = TeacherCache(
                model,
                self.data,
                seed=self.cfg.seed,
                views=self.cfg.views,
                directory=cache_dir(self.run.run_dir),
                node=key,
                precision=self.cfg.precision,
                feature_mb=self.cfg.cache_mb,
                log=self.log,
            )
        return self._caches[key]
