"""Soak: three `iterkd worker` processes on a real PostgreSQL server work a 21-candidate search while a
chaos loop SIGKILLs a random worker every few seconds and starts it again. Whatever the kills hit,
every candidate must complete exactly once, nothing may be left running or queued, and the lineage
must be the one a single process grows. ITERKD_SOAK_SECONDS=600 repeats the round (a fresh study,
other kill times) until that many seconds have passed; unset, one round (the CI form).

Below the soak: tests for the faults found while building it, each made to happen on purpose."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path

import optuna
import pytest

from iterkd import run_search, worker
from iterkd.search import Search
from iterkd.storage import open_study
from iterkd.worker import STORAGE_ENV, WorkQueue, claim
from tests.conftest import lineage_shape, smoke_config
from tests.test_distributed import _postgres_or_skip

SOAK_SECONDS = float(os.environ.get("ITERKD_SOAK_SECONDS", "0"))  # 0: one round
SEED = int(os.environ.get("ITERKD_SOAK_SEED", "15"))  # the chaos loop's; round r uses SEED + r
WORKERS = 3
KILLS = 6  # per round at most ...
KILL_WINDOW_S = 40.0  # ... and only in a round's first seconds: the loop then lets the round finish
KILL_EVERY_S = (1.5, 4.0)  # seconds between two kills, drawn uniformly
ROUND_LIMIT_S = 300.0  # a round that has not finished by then has hung: the test fails, naming it
# 21 candidates: the root, then 4 children of the smallest child for 6 generations, until the space
# runs out of moves (4, 4, 4, 4, 3, 1). At --width 1/8 the smallest child of every generation is the
# only one of its size, so with a drop budget of 100 points (it never binds) the lineage hangs on the
# space's moves and sizes alone: not on accuracies, which a retry changes (a candidate's key, and so
# its seed, names its parent's trial number, and a killed parent's retry gets a new number). One
# parent per generation also keeps lineage_shape's order (generation, then key) the same whatever
# number a retried parent got. One epoch on a small subset keeps a node near a second.
SEARCH = dict(
    variant="parent-children",
    children=4,
    beam=1,
    max_generations=6,
    width=1 / 8,
    select="smallest-within-budget",
    max_drop=100.0,
    pruner="none",
    epochs=1,
    root_epochs=1,
    train_subset=512,
    val_size=128,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same search in one process, on SQLite."""
    import torch

    run_dir = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # nodes this small train 5x slower on two threads of a shared machine than on one
    try:
        run_search(smoke_config(run_dir, name="reference", **SEARCH), progress=False)
    finally:
        torch.set_num_threads(threads)
    shape = lineage_shape(open_study(f"sqlite:///{run_dir}/study.db", "reference"))
    assert len(shape) >= 20, "the soak needs at least 20 candidates"
    return shape


class Workers:
    """WORKERS `iterkd worker` processes that this test starts, kills and starts again itself (not
    --workers N, whose processes the coordinator owns)."""

    def __init__(self, storage: str, name: str, run_dir: Path):
        self.cmd = [
            sys.executable,
            "-m",
            "iterkd",
            "worker",
            "--run",
            name,
            "--run-dir",
            str(run_dir),
            "--no-progress",
            "--device",
            "cpu",
        ]
        # One thread each: three workers share the machine's cores with the coordinator.
        self.env = {**os.environ, STORAGE_ENV: storage, "OMP_NUM_THREADS": "1"}
        self.logs = run_dir / "soak-workers"
        self.logs.mkdir()
        self.procs: list[subprocess.Popen] = []
        self.started = 0
        for _ in range(WORKERS):
            self.procs.append(self._start())

    def _start(self) -> subprocess.Popen:
        self.started += 1
        with (self.logs / f"worker-{self.started}.log").open("w") as out:
            return subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env)

    def kill_and_restart(self, i: int) -> None:
        self.procs[i].kill()
        # Reap it at once: an unreaped child is a zombie whose pid still answers kill(pid, 0), so the
        # coordinator's same-host check would think it alive and wait for the heartbeat's grace period.
        self.procs[i].wait()
        self.procs[i] = self._start()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def tail(self) -> str:
        """The last lines of every worker's log, for a failure message."""
        out = []
        for log in sorted(self.logs.iterdir()):
            lines = log.read_text(errors="replace").splitlines()[-3:]
            out.append(f"{log.name}: " + " | ".join(lines))
        return "\n".join(out)


def _soak_round(tmp: Path, storage: str, rng: random.Random) -> tuple[optuna.Study, int]:
    """One search worked by WORKERS workers under the chaos loop; returns its study and the kills."""
    cfg = smoke_config(tmp / "run", name=f"soak{uuid.uuid4().hex[:10]}", storage=storage, workers=0, **SEARCH)
    search = Search(
        cfg, progress=False, log=lambda _: None
    )  # creates the run: workers can open it from now on
    study = open_study(storage, cfg.name, create=False)  # the chaos loop's own view
    result: dict = {}

    def coordinate():
        try:
            result["out"] = search.run()
        except BaseException as e:  # reported by the test thread
            result["error"] = e

    workers = Workers(storage, cfg.name, Path(cfg.run_dir))
    coordinator = threading.Thread(target=coordinate, daemon=True)
    coordinator.start()
    start = time.monotonic()
    kills, next_kill = 0, start + rng.uniform(*KILL_EVERY_S)
    try:
        while coordinator.is_alive() and time.monotonic() - start < ROUND_LIMIT_S:
            now = time.monotonic()
            if kills < KILLS and now - start < KILL_WINDOW_S and now >= next_kill:
                victim = _victim(study, workers, rng)
                if victim is not None:
                    workers.kill_and_restart(victim)
                    kills += 1
                    next_kill = now + rng.uniform(*KILL_EVERY_S)
            for p in workers.procs:  # a worker that died by itself (not by the loop) is a failure
                if p.poll() not in (None, 0):
                    raise AssertionError(f"a worker exited with status {p.returncode}:\n{workers.tail()}")
            time.sleep(0.05)
        assert not coordinator.is_alive(), (
            f"the round did not finish in {ROUND_LIMIT_S:.0f} s:\n{workers.tail()}"
        )
        assert "error" not in result, f"the coordinator stopped: {result.get('error')!r}\n{workers.tail()}"
        for p in workers.procs:  # idle workers exit by themselves once the coordinator is done
            assert p.wait(timeout=60) == 0, workers.tail()
    finally:
        if coordinator.is_alive():
            study.set_user_attr("coordinator", "done")  # so the workers that are left stop
        workers.stop()
    return study, kills


def _victim(study: optuna.Study, workers: Workers, rng: random.Random) -> int | None:
    """Which worker to kill. Until a kill has failed a trial, one that is training (None while no
    worker trains): random times alone could spend every kill on workers that are idle or still
    starting, and the round would prove nothing. Then any worker, whatever it is doing."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        return rng.randrange(len(workers.procs))
    training = [i for i, p in enumerate(workers.procs) if p.pid in {t.user_attrs.get("pid") for t in running}]
    return rng.choice(training) if training else None


def test_three_workers_killed_at_random_complete_every_candidate_once(
    tmp_path, reference, monkeypatch, capsys
):
    storage = _postgres_or_skip()
    # A candidate fails once per kill that lands on it, and random kills may land on one candidate
    # more often than the search's limit (MAX_RETRIES, which then stops the search on purpose). The
    # soak checks the retries themselves, so the coordinator (in this process) allows as many
    # failures as the loop makes kills: the run must then finish whatever the kills hit.
    monkeypatch.setattr(worker, "MAX_RETRIES", KILLS)
    start = time.monotonic()
    rounds = kills = retries = 0
    while rounds == 0 or time.monotonic() - start < SOAK_SECONDS:
        study, killed = _soak_round(tmp_path / f"round-{rounds}", storage, random.Random(SEED + rounds))
        trials = study.get_trials(deepcopy=False)
        # Every trial (number, state, key, owner, error) in a failure's message: a soak fails rarely.
        seen = f"round {rounds}, {killed} kills: " + "; ".join(
            f"{t.number} {t.state.name} {t.user_attrs.get('key')} pid {t.user_attrs.get('pid')}"
            + (f" error {t.user_attrs['error']!r}" if "error" in t.user_attrs else "")
            for t in trials
        )
        states = Counter(t.state.name for t in trials)
        assert set(states) <= {"COMPLETE", "FAIL"}, seen  # nothing RUNNING or WAITING is left
        complete = Counter(t.user_attrs["key"] for t in trials if t.state.name == "COMPLETE")
        assert len(complete) == len(reference) and set(complete.values()) == {1}, seen  # each candidate once
        failed = [t for t in trials if t.state.name == "FAIL"]
        assert all(t.user_attrs["key"] in complete for t in failed), seen  # killed candidates trained again
        assert all("error" not in t.user_attrs for t in failed), (
            f"a trial failed by an error, not a kill: {seen}"
        )
        assert len(failed) <= killed, seen  # a worker holds one trial: a kill fails at most that one
        assert failed, f"no kill ever hit a training worker: {seen}"
        assert lineage_shape(study) == reference, seen
        rounds, kills, retries = rounds + 1, kills + killed, retries + len(failed)
    with capsys.disabled():
        print(
            f"\nsoak: {rounds} round(s), {WORKERS} workers, {len(reference)} candidates per round, "
            f"{kills} kills, {retries} retries (failed trials), {time.monotonic() - start:.0f} s"
        )


# -- faults found while building the soak, each made to happen on purpose ----------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def queue_storage(request, tmp_path):
    return f"sqlite:///{tmp_path}/q.db" if request.param == "sqlite" else _postgres_or_skip()


def test_a_worker_killed_while_claiming_leaves_the_trial_queued(queue_storage):
    """SIGKILL inside the claim, after the trial turned RUNNING and before the claim ended. When the
    state, the owner (pid, host) and the first heartbeat were separate writes, such a kill left a
    RUNNING trial naming no process and with no heartbeat: no check ever failed it, and the
    coordinator waited for it forever. One transaction: the trial is still queued, for the next worker."""
    name = f"q{uuid.uuid4().hex[:10]}"
    study = open_study(queue_storage, name)
    study.enqueue_trial({}, user_attrs={"key": "k0"})
    dying = textwrap.dedent("""
        import os, signal, sys
        from optuna.storages._rdb import models
        from iterkd.storage import open_study
        from iterkd.worker import claim

        def die(*args, **kwargs):  # the claim's last step before its commit: the state is RUNNING by now
            os.kill(os.getpid(), signal.SIGKILL)

        models.TrialHeartbeatModel.where_trial_id = die
        claim(open_study(sys.argv[1], sys.argv[2], create=False))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", dying, queue_storage, name],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == -signal.SIGKILL, (
        f"the claim did not reach the injected kill: {proc.stderr[-500:]}"
    )
    (t,) = open_study(queue_storage, name, create=False).get_trials()
    assert t.state.name == "WAITING" and "pid" not in t.user_attrs
    taken = claim(study)  # a healthy worker takes it, and owns it from the same write
    assert taken is not None and taken.user_attrs["pid"] == os.getpid() and "host" in taken.user_attrs


def test_a_remote_worker_killed_before_its_first_beat_is_failed_by_the_heartbeat(queue_storage, monkeypatch):
    """A worker on another machine (no pid to check from here) dies right after claiming, before its
    Heartbeat thread ran. Optuna's stale-trial check skips trials that never beat, so the claim
    itself records the first heartbeat: the trial goes stale and is failed after the grace period."""
    from iterkd import storage

    monkeypatch.setattr(storage, "GRACE_S", 1)
    name = f"q{uuid.uuid4().hex[:10]}"
    coordinator = open_study(queue_storage, name, heartbeat=True)
    coordinator.enqueue_trial({}, user_attrs={"key": "k0"})
    lost = claim(open_study(queue_storage, name, create=False))  # ... and its worker dies here
    lost.set_user_attr("host", "another-machine")
    deadline = time.monotonic() + 30
    while coordinator.get_trials()[0].state.name == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(coordinator)  # what the coordinator's wait loop calls
    assert coordinator.get_trials()[0].state.name == "FAIL"


def test_a_trial_claimed_before_the_coordinator_reads_it_back_keeps_its_number(tmp_path, monkeypatch):
    """The coordinator queues a candidate, then looks its trial number up. A worker quick enough to
    claim it in between made the lookup (among WAITING trials only) fail with max() of nothing."""
    study = open_study(f"sqlite:///{tmp_path}/q.db", "q")
    enqueue = study.enqueue_trial

    def enqueue_and_lose_the_race(*args, **kwargs):
        enqueue(*args, **kwargs)
        assert claim(study) is not None  # the quicker worker

    monkeypatch.setattr(study, "enqueue_trial", enqueue_and_lose_the_race)
    queue = WorkQueue(type("Run", (), {"study": study})(), workers=None, log=lambda _: None)
    attrs = {"key": "k0", "generation": 1, "operator": "drop_layer(block=1)"}
    assert queue.enqueue(attrs) == 0
    study.tell(0, state=optuna.trial.TrialState.FAIL)  # its worker died: the candidate is queued again
    assert queue.enqueue(attrs) == 1  # the retry's number, not the failed trial's


def test_a_worker_uses_the_runs_pruner(tmp_path, monkeypatch):
    """Optuna stores no pruner (nor sampler): a worker that opened the study without them pruned
    children with Optuna's default MedianPruner in a run started with --pruner none."""
    cfg = smoke_config(tmp_path / "run", name="p", workers=0, pruner="none")
    Search(cfg, progress=False, log=lambda _: None)  # creates the run, as a coordinator does
    seen = {}
    monkeypatch.setattr(
        worker, "_work", lambda run, trainer, log, poll_s: seen.setdefault("study", run.study) and 0
    )
    worker.run_worker(f"sqlite:///{cfg.run_dir}/study.db", cfg.name, progress=False, log=lambda _: None)
    assert isinstance(seen["study"].pruner, optuna.pruners.NopPruner)
