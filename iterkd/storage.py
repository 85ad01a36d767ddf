"""Where a run's study lives: opening Optuna storages (SQLite or PostgreSQL) with one-line errors,
URL redaction, heartbeat settings, and the few writes Optuna's public API does not offer. Every use of
Optuna's private attributes (`Study._storage`, `FrozenTrial._trial_id`, its RDB models) is in this
module, so an Optuna upgrade that moves them breaks one file."""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import optuna

from .errors import IterkdError


def redact_url(url: str) -> str:
    """The storage URL with any password replaced by '***', for logs, reports and the lineage."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc[-1]}"))


def default_storage(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / 'study.db').resolve()}"


HEARTBEAT_S = 10  # a worker's heartbeat interval (seconds)
GRACE_S = 60  # a RUNNING trial without a heartbeat for this long belongs to a dead worker


def open_study(
    storage: str,
    name: str,
    *,
    create: bool = True,
    directions: tuple[str, ...] = ("maximize",),
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    heartbeat: bool = False,
) -> optuna.Study:
    """Open (or create) the run's study; bad or unreachable storage URLs become one-line errors.
    Samplers and pruners are not stored by Optuna: every process passes its own. `heartbeat`: a
    coordinator's view, which fails RUNNING trials whose worker stopped beating (docs/distributed.md)."""
    if "://" not in storage:
        raise IterkdError(
            f"--storage {redact_url(storage)!r} is not a database URL; expected e.g. "
            "sqlite:///runs/NAME/study.db or postgresql://USER@HOST/DB"
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        # Workers record a heartbeat while they train; a trial whose heartbeat is older than the
        # grace period is failed by the coordinator (optuna.storages.fail_stale_trials) and retried.
        beat = dict(heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S) if heartbeat else {}
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since v2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(storage, engine_kwargs=_engine_kwargs(storage), **beat)
        if create:
            return optuna.create_study(
                storage=rdb,
                study_name=name,
                directions=list(directions),
                sampler=sampler,
                pruner=pruner,
                load_if_exists=True,
            )
        return optuna.load_study(storage=rdb, study_name=name, sampler=sampler, pruner=pruner)
    except KeyError:
        raise IterkdError(f"no run named {name!r} in storage {redact_url(storage)}") from None
    except ImportError as e:
        raise IterkdError(
            f"storage {redact_url(storage)} needs a database driver that is not installed ({e.name or e}); "
            "for PostgreSQL: pip install 'iterkd[postgres]'"
        ) from None
    except Exception as e:  # SQLAlchemy's errors: bad URL, refused connection, auth failure, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise IterkdError(f"cannot open storage {redact_url(storage)}: {redact_url(first)[:300]}") from None


def _engine_kwargs(storage: str) -> dict:
    if storage.startswith("postgresql"):
        return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    if storage.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}  # several local processes may write
    return {}


def claim_waiting(study: optuna.Study, owner: dict) -> optuna.Trial | None:
    """Take one WAITING trial for this process, or None. The WAITING -> RUNNING change is one
    conditional update in the database, so two workers never take the same trial; this is what
    Optuna's own `Study.ask` does with enqueued trials, without its fallback of creating a fresh trial.

    The same transaction records `owner` (pid, host) as user attributes and the trial's first
    heartbeat. Written one after another, a worker killed between the state change and those writes
    left a RUNNING trial that names no process and has no heartbeat: neither the coordinator's pid
    check nor `fail_stale_trials` (which skips trials that never beat) would ever fail it, and the
    search waited for it forever. Now a trial is either still WAITING or RUNNING with both."""
    from datetime import datetime

    from optuna.storages._rdb import models

    values = {
        k: json.dumps(v) for k, v in owner.items()
    }  # before the transaction: a bad value claims nothing
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        trial_id = t._trial_id  # noqa: SLF001
        with _session(study) as session:
            # One conditional UPDATE: the database evaluates "still WAITING" under the row's write lock
            # (PostgreSQL re-checks it after a concurrent claimer commits; SQLite locks the file).
            still_waiting = session.query(models.TrialModel).filter(
                models.TrialModel.trial_id == trial_id,
                models.TrialModel.state == optuna.trial.TrialState.WAITING,
            )
            # datetime_start: what Optuna's own claim records.
            running = {"state": optuna.trial.TrialState.RUNNING, "datetime_start": datetime.now()}
            if still_waiting.update(running, synchronize_session=False) != 1:
                continue  # another worker took it first, or the coordinator failed it (nothing written)
            for key, value in values.items():
                _put_user_attr(session, trial_id, key, value)
            if models.TrialHeartbeatModel.where_trial_id(trial_id, session) is None:
                session.add(models.TrialHeartbeatModel(trial_id=trial_id))  # the server's clock, as Optuna's
        return optuna.Trial(study, trial_id)
    return None


@contextmanager
def _session(study: optuna.Study):
    """A session of the study's RDB storage, committed on success and rolled back on any error."""
    backend = getattr(study._storage, "_backend", study._storage)  # noqa: SLF001 - under the trial cache
    session = backend.scoped_session()
    try:
        yield session
        session.commit()
    except Exception:
        session.rollback()
        raise
    finally:
        session.close()


def _put_user_attr(session, trial_id: int, key: str, value_json: str) -> None:
    """Insert or update one user attribute row of a trial, whatever the trial's state."""
    from optuna.storages._rdb import models

    row = session.query(models.TrialUserAttributeModel).filter_by(trial_id=trial_id, key=key).one_or_none()
    if row is None:
        session.add(models.TrialUserAttributeModel(trial_id=trial_id, key=key, value_json=value_json))
    else:
        row.value_json = value_json


def fail_waiting(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Fail a WAITING (queued) trial. Study.tell takes RUNNING trials only; this is the storage call
    it makes underneath."""
    study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)  # noqa: SLF001


def record_heartbeat(study: optuna.Study, trial: optuna.Trial) -> None:
    """One heartbeat of a RUNNING trial (what Optuna's own optimize loop records in a thread)."""
    study._storage.record_heartbeat(trial._trial_id)  # noqa: SLF001


def trial_handle(study: optuna.Study, number: int) -> optuna.Trial:
    """A handle on trial `number` for writes that Optuna allows after it ended (dashboard notes)."""
    return optuna.trial.Trial(study, study.get_trials(deepcopy=False)[number]._trial_id)  # noqa: SLF001


def set_status(study: optuna.Study, number: int, status: str) -> bool:
    """Record a node's status (root/accepted/rejected/failed/pruned) as its trial's `status` user
    attribute, for the dashboard. Acceptance is decided after the trial has ended, and Optuna's API
    refuses to change a finished trial, so this writes the attribute row through Optuna's RDB models
    (the storage iterkd always uses). Reports and lineage.csv compute the status from the study's
    selections, so if this fails (another storage, a schema change) only the dashboard column is
    missing: returns False then."""
    try:
        trial_id = study.get_trials(deepcopy=False)[number]._trial_id  # noqa: SLF001
        with _session(study) as session:
            _put_user_attr(session, trial_id, "status", json.dumps(status))
    except Exception:
        return False
    return True


def hold_advisory_lock(storage: str, name: str):
    """For a PostgreSQL storage: take a session-level advisory lock named `name` and return the open
    connection that holds it (the server frees the lock when the connection or this process dies, so
    it never goes stale), or None when another session holds it."""
    import zlib

    import sqlalchemy

    engine = sqlalchemy.create_engine(storage, poolclass=sqlalchemy.pool.NullPool, **_engine_kwargs(storage))
    conn = engine.connect()
    key = zlib.crc32(f"iterkd-writer:{name}".encode())
    if conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
        return conn
    conn.close()
    return None


def rewrite_result(
    study: optuna.Study,
    number: int,
    *,
    values: list[float] | None = None,
    constraints: dict[str, float] | None = None,
) -> None:
    """Rewrite a finished trial's objective values and/or constraint values (iterkd.objective: what
    Optuna counts as the best trial follows selections made after the trial ended). Optuna's API
    refuses to change a finished trial, so the rows are written through its RDB models in one
    transaction, and this process's cached copy of the trial is updated to match."""
    from optuna.storages._rdb import models
    from optuna.study._constrained_optimization import _CONSTRAINTS_KEY

    frozen = study.get_trials(deepcopy=False)[number]
    trial_id = frozen._trial_id  # noqa: SLF001
    attrs = {f"{_CONSTRAINTS_KEY}:{k}": float(v) for k, v in (constraints or {}).items()}
    with _session(study) as session:
        for objective, value in enumerate(values or ()):
            row = (
                session.query(models.TrialValueModel)
                .filter_by(trial_id=trial_id, objective=objective)
                .one_or_none()
            )
            stored, kind = models.TrialValueModel.value_to_stored_repr(float(value))
            if row is None:
                session.add(
                    models.TrialValueModel(
                        trial_id=trial_id, objective=objective, value=stored, value_type=kind
                    )
                )
            else:
                row.value, row.value_type = stored, kind
        for key, value in attrs.items():
            row = (
                session.query(models.TrialSystemAttributeModel)
                .filter_by(trial_id=trial_id, key=key)
                .one_or_none()
            )
            if row is None:
                session.add(
                    models.TrialSystemAttributeModel(trial_id=trial_id, key=key, value_json=json.dumps(value))
                )
            else:
                row.value_json = json.dumps(value)
    # Optuna's cached storage never re-reads a finished trial: keep this process's copy current.
    if values:
        frozen._values = [float(v) for v in values]  # noqa: SLF001
    frozen.system_attrs.update(attrs)
