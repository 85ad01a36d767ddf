"""A run: its directory, its saved settings and its Optuna study. `open_run` is the one way every
command (resume, report, export, compare, select, dashboard, worker) opens an existing run;
`start_run` creates one for `iterkd search`. Crash recovery (trials left RUNNING by a dead process,
checkpoints damaged while the run was stopped) happens here, before a search writes anything."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import optuna

from .checkpoints import load_model, read_checkpoint
from .config import SearchConfig, config_path, validate
from .errors import IterkdError
from .files import write_atomic
from .lineage import Node, accepted, drop_selections, node_status, nodes, root_node, selections
from .models import VGG
from .storage import default_storage, fail_waiting, open_study, redact_url


@dataclass
class Run:
    """An open run. `storage` is the full URL (a saved one never holds a password); `settings_from`
    says where `cfg` came from: 'config.json', 'study' (the copy every run keeps in its study) or
    'defaults' (neither survived)."""

    run_dir: Path
    cfg: SearchConfig
    study: optuna.Study
    storage: str
    settings_from: str = "config.json"

    @property
    def nodes(self) -> dict[int, Node]:
        return {n.node: n for n in nodes(self.study)}

    @property
    def accepted(self) -> set[int]:
        return accepted(self.study)

    @property
    def root(self) -> Node:
        root = root_node(list(self.nodes.values()))
        if root is None:
            raise IterkdError(f"run {self.run_dir} has no trained root yet")
        return root

    def load_data(self, device=None, data_dir: str | None = None, progress: bool = True, log=print):
        """The run's splits; its images must be the ones it was made with (`agree_data`). `data_dir`
        points at them elsewhere (moved or copied)."""
        cfg = replace(self.cfg, data_dir=data_dir) if data_dir else self.cfg
        store = cfg.data_store(progress=progress, log=log)
        agree_data(self.study, store, cfg.data_dir)
        return cfg.load_data(device, store)

    def status(self, n: Node) -> str:
        return node_status(n, self.accepted)

    def final_node(self) -> Node | None:
        """The search's final model; while it runs (or after a crash), the best node of the last
        accepted generation; the root when none was accepted; None before the root exists."""
        by_id = self.nodes
        number = self.study.user_attrs.get("final_node")
        if number in by_id:
            return by_id[number]
        sel = selections(self.study)
        last = [by_id[i] for i in sel[max(sel)] if i in by_id and by_id[i].ok] if sel else []
        if last:
            return max(last, key=lambda n: (n.val_acc, -n.spec.params(), -n.node))
        return root_node(list(by_id.values()))

    def node(self, number: int | None = None) -> Node:
        """The trained node `number`, or the run's recorded final model when None."""
        by_id = self.nodes
        trained = ", ".join(str(i) for i, n in by_id.items() if n.ok and n.checkpoint) or "none"
        if number is None:
            number = self.study.user_attrs.get("final_node")
            if number is None:
                raise IterkdError(
                    f"run {self.run_dir} has no final model yet (its search has not finished); "
                    f"pass --node N to choose a trained node ({trained})"
                )
        if number not in by_id:
            raise IterkdError(f"run {self.run_dir} has no node {number}; its trained nodes are {trained}")
        n = by_id[number]
        if not (n.ok and n.checkpoint):
            raise IterkdError(
                f"node {number} of run {self.run_dir} is {self.status(n)} and has no checkpoint; "
                f"choose a trained node instead ({trained})"
            )
        return n

    def model(self, n: Node) -> VGG:
        return load_model(self.run_dir / n.checkpoint)


def read_config(run_dir: Path) -> SearchConfig | None:
    """RUN/config.json as a SearchConfig whose paths point into `run_dir` (where the user says the run
    is, even if it was moved), None when absent; a file that is not an iterkd config is an error."""
    path = config_path(run_dir)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IterkdError(f"{path} is not readable JSON ({e}); restore it or move the run away") from None
    known = {f.name for f in fields(SearchConfig)}
    if not isinstance(data, dict) or "name" not in data or set(data) - known:
        extra = sorted(set(data) - known)[:5] if isinstance(data, dict) else []
        raise IterkdError(
            f"{path} is not an iterkd config"
            + (f" (unknown keys: {', '.join(extra)})" if extra else "")
            + "; point at a directory that `iterkd search` wrote"
        )
    try:
        return validate(replace(SearchConfig(**data), run_dir=str(run_dir)))
    except (TypeError, ValueError, IterkdError) as e:  # a value of the wrong type or out of its range
        raise IterkdError(f"{path} is not a valid iterkd config ({e})") from None


def open_run(run_dir: str | Path | None, storage: str | None = None, *, name: str | None = None) -> Run:
    """Open an existing run without ever creating anything. `run_dir`: read its config.json and its
    study (RUN/study.db unless the run used another storage: then `storage` must give the full URL,
    since passwords are never saved). Without `run_dir` (a worker on another machine), `storage`
    and `name` find the study and its saved config names the run directory."""
    if run_dir is None:
        if not storage or not name:
            raise IterkdError("a run is found by its directory, or by --storage URL and --run NAME")
        study = open_study(storage, name, create=False)
        saved = study.user_attrs.get("config")
        if not saved:
            raise IterkdError(f"study {name!r} in {redact_url(storage)} is not an iterkd run (no config)")
        cfg = SearchConfig(**{k: v for k, v in saved.items() if k in {f.name for f in fields(SearchConfig)}})
        return Run(Path(cfg.run_dir), cfg, study, storage, "study")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise IterkdError(f"no run at {run_dir}: the directory does not exist (runs are in runs/NAME)")
    cfg = read_config(run_dir)
    url = storage or (cfg.storage if cfg else None)
    if url and "***" in url:
        raise IterkdError(
            f"run {run_dir} uses storage {url}; passwords are never saved, so pass --storage "
            "with the full URL"
        )
    if not url:
        if not (run_dir / "study.db").is_file():  # opening a missing SQLite file would create an empty one
            what = "no study.db: was its search started?" if cfg else "no config.json and no study.db"
            raise IterkdError(
                f"{run_dir} has {what} (not an iterkd run directory, or its search never started)"
            )
        url = default_storage(run_dir)
    if cfg is None:
        study_name = name or _only_study_name(url, run_dir)
        study = open_study(url, study_name, create=False)
        saved = study.user_attrs.get("config")
        cfg = SearchConfig(**saved) if saved else SearchConfig(name=study_name)
        return Run(run_dir, replace(cfg, run_dir=str(run_dir)), study, url, "study" if saved else "defaults")
    return Run(run_dir, cfg, open_study(url, cfg.name, create=False), url)


def _only_study_name(url: str, run_dir: Path) -> str:
    try:
        names = optuna.study.get_all_study_names(storage=url)
    except Exception:
        names = []
    if len(names) != 1:
        raise IterkdError(
            f"{run_dir} has no config.json naming its study, and its storage holds "
            f"{len(names)} studies; restore config.json or pass the run directory of a single run"
        )
    return names[0]


def start_run(cfg: SearchConfig, *, directions: tuple[str, ...], sampler, pruner, heartbeat: bool) -> Run:
    """Create (or reopen, for a resumed search) the run directory and study. Called once every input
    has been checked, so a refused command leaves nothing behind; config.json is written once."""
    run_dir = Path(cfg.run_dir)
    if cfg.storage:  # a database elsewhere: reachable before anything is created here
        open_study(
            cfg.storage, cfg.name, directions=directions, sampler=sampler, pruner=pruner, heartbeat=heartbeat
        )
    try:
        for sub in ("checkpoints", "artifacts"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise IterkdError(
            f"run directory {run_dir} is not writable ({e.strerror}); choose another with --run-dir"
        ) from None
    url = cfg.storage or default_storage(run_dir)
    study = open_study(
        url, cfg.name, directions=directions, sampler=sampler, pruner=pruner, heartbeat=heartbeat
    )
    if not config_path(run_dir).exists():
        # Passwords never reach disk or the study: a resumed run asks for --storage again.
        saved = replace(cfg, storage=redact_url(cfg.storage) if cfg.storage else None)
        write_atomic(config_path(run_dir), saved.to_json())
        study.set_user_attr(
            "config", json.loads(saved.to_json())
        )  # workers and reports read it from the study
    return Run(run_dir, cfg, study, url)


def agree_data(study: optuna.Study, store, data_dir: str | None) -> None:
    """A run records what its images are (study attribute `data`: the store's content hash, classes
    and count) when it starts; a resume, a worker, export or compare reading other images is refused.
    Folders may move: only the content counts, not where it lies or its files' times."""
    have, saved = store.identity(), study.user_attrs.get("data")
    if saved is None:  # a new run, or one made before runs recorded their data
        study.set_user_attr("data", have)
        return
    if saved["content_hash"] != have["content_hash"]:
        classes = (
            ""
            if saved["classes"] == have["classes"]
            else f", classes {have['classes'][:4]} vs {saved['classes'][:4]}"
        )
        raise IterkdError(
            f"the images {'under ' + str(data_dir) if data_dir else 'of ' + store.meta['name']} are not the ones "
            f"this run was made with ({have['images']:,} vs {saved['images']:,} images, content "
            f"{have['content_hash'][:12]} vs {saved['content_hash'][:12]}{classes}); point --data-dir at the run's images"
        )


# -- crash recovery ---------------------------------------------------------------------------------


def fail_interrupted_trials(study: optuna.Study, log: Callable[[str], None], *, remote: bool) -> None:
    """RUNNING trials left by a process of this machine that no longer exists are marked failed
    ('interrupted'), so their candidates are trained again. Without workers, queued (WAITING)
    trials left by an earlier coordinator would never be taken: they fail too."""
    if not remote:
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            fail_waiting(study, t)
            log(f"node {t.number} was queued for workers; it will be trained here instead")
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if (
            t.user_attrs.get("host") == host
            and isinstance(pid, int)
            and pid != os.getpid()
            and not alive(pid)
        ):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            log(f"node {t.number} was interrupted by a crash; its candidate will be trained again")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def verify_checkpoints(run: Run, log: Callable[[str], None]) -> None:
    """Verify the checkpoints a resumed run will load: the root's and every accepted node's. A
    damaged one is reported with its path, its node then reads as failed (lineage.nodes) and is
    trained again, and the generations selected from it onwards are decided again."""
    all_nodes = nodes(run.study)
    root = root_node(all_nodes)
    needed = run.accepted | ({root.node} if root else set())
    damaged: dict[int, str] = {}
    for n in all_nodes:
        if n.node not in needed or not n.ok:
            continue
        for path in filter(None, [n.checkpoint] + [m["checkpoint"] for m in n.members]):
            try:
                read_checkpoint(run.run_dir / path)
            except IterkdError as e:
                damaged[n.node] = str(e)
    if not damaged:
        return
    for i, why in damaged.items():
        log(f"node {i}: {why}. It will be trained again.")
    run.study.set_user_attr("damaged", sorted(set(run.study.user_attrs.get("damaged", ())) | set(damaged)))
    drop_selections(run.study, from_generation=min(n.generation for n in all_nodes if n.node in damaged))


# -- one writer per run -----------------------------------------------------------------------------


class WriterLock:
    """One `iterkd search`/`resume` drives a run at a time. A lock file in the run directory (an OS
    lock, freed by the kernel when its holder dies) and, for PostgreSQL, an advisory lock in the
    database (freed when the holder's connection drops) make a second process refuse with one line
    naming the holder. Workers only claim queued trials: they take no lock."""

    def __init__(self, run_dir: Path, storage: str, name: str):
        self.path, self.storage, self.name = Path(run_dir) / ".writer.lock", storage, name
        self._file = None
        self._conn = None

    def acquire(self, log: Callable[[str], None] = print) -> WriterLock:
        import fcntl
        import time

        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            self._file.close()
            raise IterkdError(
                f"run {self.path.parent} is already being driven by {holder}; wait for it to end "
                "or stop it (then `iterkd resume` continues)"
            ) from None
        previous = self._holder()
        if previous != "another iterkd process":
            log(f"iterkd: taking over run {self.path.parent} from {previous}, which is no longer running")
        if self.storage.startswith("postgresql"):
            from .storage import hold_advisory_lock

            self._conn = hold_advisory_lock(self.storage, self.name)
            if self._conn is None:
                self.release()
                raise IterkdError(
                    f"run {self.name!r} in {redact_url(self.storage)} is already being driven by "
                    "another iterkd process (on another machine?); wait for it to end or stop it"
                )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps(me))
        self._file.flush()
        return self

    def _holder(self) -> str:
        self._file.seek(0)
        try:
            h = json.loads(self._file.read() or "null")
            return f"pid {h['pid']} on {h['host']} (since {h['since']})"
        except (ValueError, TypeError, KeyError):
            return "another iterkd process"

    def release(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()  # an empty file: nobody to take over from
            self._file.close()  # closing frees the OS lock
            self._file = None

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
