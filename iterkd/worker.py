"""Workers: processes that train the nodes a coordinator queued. With `iterkd search --workers N`
the coordinator only enqueues each generation's candidates as WAITING trials of the run's Optuna
study, waits, selects and enqueues the next; `iterkd worker` processes — any number, on any machine
that reaches the storage and sees the run directory — each take one waiting trial at a time, train
it and tell the result. A worker records an Optuna heartbeat while it trains, so the coordinator
fails (and queues again) the trial of a worker that died anywhere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import optuna

from . import storage as storage_mod
from .choices import make_pruner, make_sampler
from .config import SearchConfig, config_path
from .errors import IterkdError
from .lineage import NODE_ATTRS, Node
from .node import log_node, owner_attrs
from .run import Run, fail_interrupted_trials, open_run
from .storage import claim_waiting, default_storage, record_heartbeat, redact_url
from .trainer import NodeTrainer

STORAGE_ENV = (
    "ITERKD_STORAGE"  # how local workers get the storage URL: never on a command line (ps shows those)
)
MAX_RETRIES = 3  # a candidate whose worker dies more often than this stops the search with its error
POLL_S = 1.0  # how often a coordinator looks at the queued trials


def claim(study: optuna.Study) -> optuna.Trial | None:
    """Take one queued trial for this process, or None, recording this process as its owner (and a
    first heartbeat) in the same transaction: a kill at any moment leaves a trial the coordinator fails."""
    return claim_waiting(study, owner_attrs())


class Heartbeat:
    """Record the trial's heartbeat in the storage every HEARTBEAT_S seconds while training."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial):
        self._study, self._trial = study, trial
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                record_heartbeat(self._study, self._trial)
            except Exception:  # a database hiccup: the next beat tries again; the grace period covers it
                pass
            if self._stop.wait(storage_mod.HEARTBEAT_S):
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_worker(
    storage: str,
    name: str,
    *,
    run_dir: str | None = None,
    device: str | None = None,
    data_dir: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    poll_s: float = 1.0,
) -> int:
    """Train queued nodes until the coordinator says the search is over and nothing is queued.
    Returns how many nodes this worker trained."""
    run = open_run(None, storage, name=name)  # the run's settings as the coordinator saved them in the study
    here = {k: v for k, v in dict(run_dir=run_dir, device=device, data_dir=data_dir).items() if v is not None}
    run = replace(
        run, cfg=replace(run.cfg, storage=storage, workers=None, **here), run_dir=Path(run_dir or run.run_dir)
    )
    # Optuna does not store samplers and pruners: without these a worker's trials got Optuna's
    # defaults (an unseeded TPE, a MedianPruner) whatever --sampler/--pruner the run was started with.
    run.study.sampler = make_sampler(run.cfg.sampler, run.cfg.seed)
    run.study.pruner = make_pruner(run.cfg.pruner, run.cfg.epochs, run.cfg.max_drop)
    if not config_path(run.run_dir).exists():
        raise IterkdError(
            f"run directory {run.run_dir} has no config.json: a worker needs the run directory the "
            "coordinator writes (a shared filesystem path); give it with --run-dir"
        )
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = (
        signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    )  # SIGTERM fails the trial cleanly
    try:
        return _work(run, NodeTrainer(run, progress=progress, log=log), log, poll_s)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _work(run: Run, trainer: NodeTrainer, log: Callable[[str], None], poll_s: float) -> int:
    """The worker loop: claim, train with a heartbeat, tell; until the coordinator is done."""
    trained, study = 0, run.study
    log(f"worker {os.getpid()}: waiting for nodes of run {run.cfg.name!r} in {redact_url(run.storage)}")
    while True:
        trial = claim(study)
        if trial is None:
            if study.user_attrs.get("coordinator") == "done":
                log(f"worker {os.getpid()}: the search is over; trained {trained} node(s)")
                return trained
            time.sleep(poll_s)
            continue
        log(f"worker {os.getpid()}: training node {trial.number} ({trial.user_attrs.get('operator')})")
        with Heartbeat(study, trial):
            try:
                trainer.train_queued(trial)
            except optuna.exceptions.UpdateFinishedTrialError:
                # The coordinator gave this trial up (its heartbeat went stale, e.g. the database was
                # out of reach) and has queued the candidate again: drop this result, take more work.
                log(
                    f"worker {os.getpid()}: node {trial.number} was failed by the coordinator meanwhile "
                    "(heartbeat missed); its result is dropped"
                )
                continue
            except BaseException as e:
                _fail(study, trial, e)
                raise
        trained += 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _fail(study: optuna.Study, trial: optuna.Trial, e: BaseException) -> None:
    """A trial this worker could not train is failed with its error (the coordinator queues it again)."""
    if study.get_trials(deepcopy=False)[trial.number].state.is_finished():
        return
    if not isinstance(e, KeyboardInterrupt):
        trial.set_user_attr("error", (str(e).splitlines() or [type(e).__name__])[0][:300])
        trial.set_user_attr("failure", "worker-error")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)


class WorkQueue:
    """The coordinator's side: queue candidates as WAITING trials for any worker to take, wait for
    them, and queue again a candidate whose worker died (its process is gone, or its heartbeat went
    stale), up to MAX_RETRIES times."""

    def __init__(self, run: Run, workers: LocalWorkers, log: Callable[[str], None] = print):
        self.run, self.study, self.workers, self.log = run, run.study, workers, log

    def enqueue(self, attrs: dict, params: dict | None = None) -> int:
        """Queue one node (Optuna's enqueue_trial); its move is fixed by `params`, its KD settings
        are sampled by the worker's trial."""
        self.study.enqueue_trial(params or {}, user_attrs=attrs)
        # Its number: the newest trial of this candidate, in any state. Looking among the WAITING
        # ones only failed (max() of nothing) whenever a worker claimed it before this line ran.
        trials = self.study.get_trials(deepcopy=False)
        number = max(t.number for t in trials if t.user_attrs.get("key") == attrs["key"])
        self.log(f"gen {attrs['generation']}: queued node {number} {attrs['operator']} for the workers")
        return number

    def in_flight(self, key: str) -> optuna.trial.FrozenTrial | None:
        """A queued or running trial for this candidate, left by an earlier coordinator: wait for it."""
        states = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING)
        return next(
            (
                t
                for t in self.study.get_trials(deepcopy=False, states=states)
                if t.user_attrs.get("key") == key
            ),
            None,
        )

    def wait(self, numbers: list[int]) -> list[Node]:
        """Wait until the workers have finished these trials; a crashed worker's candidate is queued again."""
        pending, done, tries = list(numbers), [], {}
        while pending:
            fail_interrupted_trials(self.study, self.log, remote=True)
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since v2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(self.study)  # workers on other machines: heartbeats
            trials = self.study.get_trials(deepcopy=False)
            for number in [n for n in pending if trials[n].state.is_finished()]:
                pending.remove(number)
                t, node = trials[number], Node.from_trial(trials[number])
                if t.state != optuna.trial.TrialState.FAIL or node.failure == "diverged":
                    done.append(node)
                    continue
                key = t.user_attrs["key"]
                tries[key] = tries.get(key, 0) + 1
                if tries[key] > MAX_RETRIES:
                    raise IterkdError(
                        f"node {number} ({t.user_attrs['operator']}) failed {tries[key]} times on "
                        f"workers; last error: {node.error}"
                    )
                attrs = {k: v for k, v in t.user_attrs.items() if k in NODE_ATTRS}
                pending.append(self.enqueue(attrs, t.system_attrs.get("fixed_params")))
            if pending:
                self.workers.check()
                time.sleep(POLL_S)
        done.sort(key=lambda n: n.node)
        for n in done:
            if n.state == "COMPLETE":
                log_node(self.run, n, self.log)
        return done


class LocalWorkers:
    """`--workers N`: N `iterkd worker` processes on this machine (one per GPU when several are
    visible), their output in RUN/workers/worker-I.log. N = 0 starts none: workers come from elsewhere."""

    def __init__(self, cfg: SearchConfig, n: int):
        self.cfg, self.n = cfg, n
        self.procs: list[subprocess.Popen] = []
        self.logs = [Path(cfg.run_dir) / "workers" / f"worker-{i}.log" for i in range(n)]

    def __enter__(self) -> LocalWorkers:
        if not self.n:
            return self
        storage = self.cfg.storage or default_storage(Path(self.cfg.run_dir))
        gpus = _visible_gpus() if self.cfg.device != "cpu" else 0
        cmd = (
            [
                sys.executable,
                "-m",
                "iterkd",
                "worker",
                "--run",
                self.cfg.name,
                "--run-dir",
                self.cfg.run_dir,
                "--no-progress",
            ]
            + (["--data-dir", self.cfg.data_dir] if self.cfg.data_dir else [])
            + ["--device", self.cfg.device]
        )
        self.logs[0].parent.mkdir(parents=True, exist_ok=True)
        for i, log in enumerate(self.logs):
            env = {**os.environ, STORAGE_ENV: storage}
            if gpus > 1:
                env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
            with log.open("a") as out:
                self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
        return self

    def check(self) -> None:
        """Raise if every local worker has exited while nodes are still queued (nothing would train them)."""
        exited = [
            p.poll() is not None for p in self.procs
        ]  # poll each: it also reaps a dead one, so its pid is gone
        if self.procs and all(exited):
            last = _last_line(self.logs[0])
            raise IterkdError(
                f"all {self.n} local workers exited (worker-0: status {self.procs[0].returncode}, "
                f"{last!r}); see {self.logs[0].parent}"
            )

    def __exit__(self, exc_type, exc, tb) -> None:
        for p in self.procs:
            if exc_type is not None and p.poll() is None:
                p.terminate()  # the search stopped on an error or Ctrl-C: running trials fail, resumable
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""
