"""Scale-out through Optuna's storage: a coordinator queues candidates, `iterkd worker` processes
train them. Checked against a real PostgreSQL server (.ci/run starts one; ITERKD_TEST_POSTGRES
names it) and against SQLite, which needs no server."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import replace

import optuna
import pytest

from iterkd import run_search
from iterkd.cli import main
from iterkd.errors import IterkdError
from iterkd.storage import open_study
from iterkd.worker import WorkQueue, claim
from tests.conftest import lineage_shape, smoke_config

POSTGRES = os.environ.get("ITERKD_TEST_POSTGRES", "postgresql://iterkd:iterkd@127.0.0.1:5432/iterkd")
# Two siblings per generation, so two workers train at once. The smallest child within the budget
# is kept: a choice that does not hang on accuracies agreeing to the last image across processes.
SEARCH = dict(variant="parent-children", children=2, select="smallest-within-budget")


def _postgres_or_skip() -> str:
    try:
        open_study(POSTGRES, f"probe-{uuid.uuid4().hex[:8]}")
    except IterkdError as e:
        pytest.skip(
            f"no PostgreSQL server at {POSTGRES} ({e}); .ci/run starts one, or set ITERKD_TEST_POSTGRES"
        )
    return POSTGRES


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    return None if request.param == "sqlite" else _postgres_or_skip()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same search in one process."""
    run_dir = tmp_path_factory.mktemp("reference")
    cfg = smoke_config(run_dir, name="reference", **SEARCH)
    run_search(cfg, progress=False)
    return lineage_shape(open_study(f"sqlite:///{run_dir}/study.db", "reference"))


def _config(tmp_path, storage, workers):
    name = f"d{uuid.uuid4().hex[:10]}"  # a fresh study in a shared database
    return smoke_config(tmp_path / "run", name=name, storage=storage, workers=workers, **SEARCH)


def _study(cfg):
    return open_study(cfg.storage or f"sqlite:///{cfg.run_dir}/study.db", cfg.name, create=False)


def test_two_workers_train_every_candidate_once_and_grow_the_same_lineage(tmp_path, storage, reference):
    cfg = _config(tmp_path, storage, workers=2)
    out = run_search(cfg, progress=False)
    study = _study(cfg)
    assert lineage_shape(study) == reference
    trials = study.get_trials(deepcopy=False)
    assert Counter(t.state.name for t in trials) == Counter(COMPLETE=len(reference))  # none lost, none failed
    keys = Counter(t.user_attrs["key"] for t in trials)
    assert set(keys.values()) == {1}  # every candidate trained exactly once
    pids = {t.user_attrs["pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids  # both workers trained; the coordinator did not
    assert study.user_attrs["coordinator"] == "done"
    assert out.final.node in study.user_attrs["selections"]["2"]


def test_a_killed_worker_costs_one_retry_and_the_run_completes(tmp_path, reference):
    cfg = _config(tmp_path, _postgres_or_skip(), workers=2)
    result: dict = {}
    coordinator = threading.Thread(target=lambda: result.setdefault("out", run_search(cfg, progress=False)))
    coordinator.start()
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and coordinator.is_alive():
        try:
            running = _study(cfg).get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        except IterkdError:  # the coordinator has not created the study yet
            running = []
        for t in running:
            started = t.datetime_start.timestamp() if t.datetime_start else time.time()
            if t.user_attrs.get("generation") == 1 and "pid" in t.user_attrs and time.time() - started > 1.0:
                os.kill(t.user_attrs["pid"], signal.SIGKILL)  # a worker dies mid-trial
                killed = t.number
                break
        time.sleep(0.1)
    coordinator.join(timeout=600)
    assert killed is not None, "no worker was ever seen training a child"
    assert not coordinator.is_alive() and "out" in result  # the run completed with one worker left
    study = _study(cfg)
    assert lineage_shape(study) == reference
    states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
    assert states[killed] == "FAIL"
    key = study.get_trials(deepcopy=False)[killed].user_attrs["key"]
    retried = [
        t for t in study.get_trials(deepcopy=False) if t.user_attrs["key"] == key and t.number != killed
    ]
    assert [t.state.name for t in retried] == ["COMPLETE"]  # its candidate trained again, once


def test_a_worker_takes_each_queued_trial_once(tmp_path):
    study = open_study(f"sqlite:///{tmp_path}/s.db", "q")
    for i in range(3):
        study.enqueue_trial({}, user_attrs={"key": f"k{i}"})
    taken = [claim(study) for _ in range(4)]
    assert [t.user_attrs["key"] for t in taken[:3]] == ["k0", "k1", "k2"] and taken[3] is None
    assert len(study.trials) == 3  # claiming never creates a trial of its own, unlike Study.ask


def test_worker_errors_are_one_line(tmp_path, capsys):
    assert main(["worker", "--run-dir", str(tmp_path / "none")]) == 2
    assert "needs --run NAME" in capsys.readouterr().err
    assert main(["worker", "--run", "x", "--storage", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "no run named 'x'" in capsys.readouterr().err
    assert (
        main(
            [
                "search",
                "--preset",
                "smoke",
                "--run-dir",
                str(tmp_path / "r"),
                "--workers",
                "2",
                "--sampler",
                "tpe",
            ]
        )
        == 2
    )
    assert "--workers needs --sampler greedy" in capsys.readouterr().err


def test_queued_trials_are_trained_in_process_when_resumed_without_workers(tmp_path, reference):
    from iterkd.search import Search

    cfg = _config(tmp_path, None, workers=0)  # a coordinator with no workers queues the root, then is stopped
    search = Search(cfg, progress=False)
    WorkQueue(search.opened, workers=None, log=lambda _: None).enqueue(
        search.trainer.root_attrs()
    )  # a coordinator's first step
    assert [t.state.name for t in search.study.get_trials()] == ["WAITING"]
    out = run_search(replace(cfg, workers=None), progress=False)
    assert lineage_shape(_study(cfg)) == reference and out.root.node == 1
    assert _study(cfg).get_trials()[0].state.name == "FAIL"


def test_a_worker_on_another_machine_that_stops_beating_is_failed_and_its_node_retried(tmp_path, monkeypatch):
    """No pid to check across machines: the coordinator relies on the trial's heartbeat."""
    from iterkd import storage
    from iterkd.search import Search
    from iterkd.worker import run_worker

    monkeypatch.setattr(storage, "GRACE_S", 2)  # seconds without a heartbeat before a trial is stale
    monkeypatch.setattr(storage, "HEARTBEAT_S", 0.2)  # healthy workers beat well within it
    cfg = _config(tmp_path, None, workers=0)
    coordinator = Search(cfg, progress=False)

    class NoLocalWorkers:
        def check(self):
            pass

    queue = WorkQueue(coordinator.opened, NoLocalWorkers(), log=lambda _: None)
    number = queue.enqueue(coordinator.trainer.root_attrs())
    remote = open_study(f"sqlite:///{cfg.run_dir}/study.db", cfg.name, create=False)
    lost = claim(remote)  # a worker elsewhere takes the root ...
    lost.set_user_attr("pid", 1)
    lost.set_user_attr("host", "another-machine")
    storage.record_heartbeat(remote, lost)  # ... beats once, and its machine goes down
    result = {}

    def coordinate():
        try:
            result["root"] = queue.wait([number])[0]
        finally:  # whatever happens, the worker below stops
            coordinator.study.set_user_attr("coordinator", "done")

    thread = threading.Thread(target=coordinate)
    thread.start()
    trained = run_worker(
        f"sqlite:///{cfg.run_dir}/study.db", cfg.name, progress=False, log=lambda _: None, poll_s=0.2
    )  # a healthy worker, here; it trains the queued retry
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert trained == 1 and result["root"].ok and result["root"].node != number
    assert _study(cfg).get_trials(deepcopy=False)[number].state.name == "FAIL"


def test_two_coordinators_of_one_postgresql_run_on_different_machines_exclude_each_other(tmp_path):
    """Different run directories (as two machines would have), one study: the database lock decides."""
    from iterkd.run import WriterLock

    url, name = _postgres_or_skip(), f"lock-{uuid.uuid4().hex[:8]}"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with WriterLock(tmp_path / "a", url, name).acquire():
        with pytest.raises(IterkdError, match="is already being driven by another iterkd process"):
            WriterLock(tmp_path / "b", url, name).acquire()
        WriterLock(tmp_path / "b", url, f"{name}-other").acquire().release()  # another run is not blocked
    WriterLock(tmp_path / "b", url, name).acquire().release()  # freed with its holder's connection
