"""Faults of the worker queue found while building the soak test (issue 15, item 7), each made to
happen on purpose, against SQLite and a real PostgreSQL server (skipped with the reason without one)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
import warnings

import optuna
import pytest

from iterkd import worker
from iterkd.errors import IterkdError
from iterkd.search import Search
from iterkd.storage import open_study
from iterkd.worker import WorkQueue, claim
from tests.conftest import smoke_config

POSTGRES = os.environ.get("ITERKD_TEST_POSTGRES", "postgresql://iterkd:iterkd@127.0.0.1:5432/iterkd")


def _postgres_or_skip() -> str:
    try:
        open_study(POSTGRES, f"probe-{uuid.uuid4().hex[:8]}")
    except IterkdError as e:
        pytest.skip(f"no PostgreSQL server at {POSTGRES} ({e}); .ci/run starts one, or set ITERKD_TEST_POSTGRES")
    return POSTGRES


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
    proc = subprocess.run([sys.executable, "-c", dying, queue_storage, name], capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == -signal.SIGKILL, f"the claim did not reach the injected kill: {proc.stderr[-500:]}"
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
    monkeypatch.setattr(worker, "_work", lambda run, trainer, log, poll_s: seen.setdefault("study", run.study) and 0)
    worker.run_worker(f"sqlite:///{cfg.run_dir}/study.db", cfg.name, progress=False, log=lambda _: None)
    assert isinstance(seen["study"].pruner, optuna.pruners.NopPruner)
