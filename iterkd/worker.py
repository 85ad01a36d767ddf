"""Workers: processes that train the nodes a coordinator queued. With `iterkd search --workers N`
the coordinator only enqueues each generation's candidates as WAITING trials of the run's Optuna
study, waits, selects and enqueues the next; `iterkd worker` processes — any number, on any machine
that reaches the storage and sees the run directory — each take one waiting trial at a time, train
it and tell the result. A worker records an Optuna heartbeat while it trains, so the coordinator
fails (and queues again) the trial of a worker that died anywhere."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import optuna

from .config import SearchConfig, config_path
from .errors import IterkdError
from .lineage import HEARTBEAT_S, default_storage, open_study, redact_url

STORAGE_ENV = "ITERKD_STORAGE"  # how local workers get the storage URL: never on a command line (ps shows those)


def claim(study: optuna.Study) -> optuna.Trial | None:
    """Take one WAITING trial for this process, or None. The WAITING → RUNNING change is atomic in
    the database (a row lock), so two workers never take the same trial; this is what Optuna's own
    `Study.ask` does with enqueued trials, without its fallback of creating a fresh trial."""
    storage = study._storage  # noqa: SLF001 - the storage API is public; Study does not expose it otherwise
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.RUNNING):  # noqa: SLF001
                return optuna.Trial(study, t._trial_id)  # noqa: SLF001
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


class Heartbeat:
    """Record the trial's heartbeat in the storage every HEARTBEAT_S seconds while training."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial):
        self._storage, self._trial_id = study._storage, trial._trial_id  # noqa: SLF001
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception:  # a database hiccup: the next beat tries again; the grace period covers it
                pass
            if self._stop.wait(HEARTBEAT_S):
                return

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def worker_config(study: optuna.Study, storage: str, *, run_dir: str | None = None, device: str | None = None,
                  data_dir: str | None = None) -> SearchConfig:
    """The run's settings as the coordinator saved them in the study, with this machine's paths."""
    saved = study.user_attrs.get("config")
    if not saved:
        raise IterkdError(f"study {study.study_name!r} in {redact_url(storage)} is not an iterkd run (no config)")
    cfg = SearchConfig.from_json(json.dumps(saved))
    here = {k: v for k, v in dict(run_dir=run_dir, device=device, data_dir=data_dir).items() if v is not None}
    return replace(cfg, storage=storage, workers=None, **here)  # a worker trains in its own process


def run_worker(storage: str, name: str, *, run_dir: str | None = None, device: str | None = None,
               data_dir: str | None = None, progress: bool = True, log: Callable[[str], None] = print,
               poll_s: float = 1.0) -> int:
    """Train queued nodes until the coordinator says the search is over and nothing is queued.
    Returns how many nodes this worker trained."""
    from .search import Search

    cfg = worker_config(open_study(storage, name, create=False), storage, run_dir=run_dir, device=device,
                        data_dir=data_dir)
    if not config_path(cfg.run_dir).exists():
        raise IterkdError(f"run directory {cfg.run_dir} has no config.json: a worker needs the run directory the "
                          "coordinator writes (a shared filesystem path); give it with --run-dir")
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # SIGTERM fails the trial cleanly
    try:
        return _work(Search(cfg, progress=progress, log=log), name, storage, log, poll_s)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _work(search, name: str, storage: str, log: Callable[[str], None], poll_s: float) -> int:
    """The worker loop: claim, train with a heartbeat, tell; until the coordinator is done."""
    trained = 0
    log(f"worker {os.getpid()}: waiting for nodes of run {name!r} in {redact_url(storage)}")
    while True:
        trial = claim(search.study)
        if trial is None:
            if search.study.user_attrs.get("coordinator") == "done":
                log(f"worker {os.getpid()}: the search is over; trained {trained} node(s)")
                return trained
            time.sleep(poll_s)
            continue
        log(f"worker {os.getpid()}: training node {trial.number} ({trial.user_attrs.get('operator')})")
        with Heartbeat(search.study, trial):
            try:
                search.work(trial)
            except optuna.exceptions.UpdateFinishedTrialError:
                # The coordinator gave this trial up (its heartbeat went stale, e.g. the database was
                # out of reach) and has queued the candidate again: drop this result, take more work.
                log(f"worker {os.getpid()}: node {trial.number} was failed by the coordinator meanwhile "
                    "(heartbeat missed); its result is dropped")
                continue
            except BaseException as e:
                _fail(search.study, trial, e)
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


class LocalWorkers:
    """`--workers N`: N `iterkd worker` processes on this machine (one per GPU when several are
    visible), their output in RUN/workers/worker-I.log. N = 0 starts none: workers come from elsewhere."""

    def __init__(self, cfg: SearchConfig, n: int):
        self.cfg, self.n = cfg, n
        self.procs: list[subprocess.Popen] = []
        self.logs = [Path(cfg.run_dir) / "workers" / f"worker-{i}.log" for i in range(n)]

    def __enter__(self) -> "LocalWorkers":
        if not self.n:
            return self
        storage = self.cfg.storage or default_storage(Path(self.cfg.run_dir))
        gpus = _visible_gpus() if self.cfg.device != "cpu" else 0
        cmd = [sys.executable, "-m", "iterkd", "worker", "--run", self.cfg.name, "--run-dir", self.cfg.run_dir,
               "--no-progress"] + (["--data-dir", self.cfg.data_dir] if self.cfg.data_dir else []) \
            + ["--device", self.cfg.device]
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
        exited = [p.poll() is not None for p in self.procs]  # poll each: it also reaps a dead one, so its pid is gone
        if self.procs and all(exited):
            last = _last_line(self.logs[0])
            raise IterkdError(f"all {self.n} local workers exited (worker-0: status {self.procs[0].returncode}, "
                              f"{last!r}); see {self.logs[0].parent}")

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
