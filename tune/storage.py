"""Where studies live.

The default is Optuna's journal file inside ``mlruns/optuna/``: it needs no server, and several
workers on one machine can append to it at once (a file lock, no "database is locked"). Any Optuna
storage URL (``sqlite:///...``, ``postgresql+psycopg://...``, ``mysql+pymysql://...``) or a
``.log`` journal path works too; only relational storages support heartbeats.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
import warnings
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, OperationalError

from train.redact import mask_secrets
from train.tracking import first_line, mlruns_dir

STALE_REASON = "its worker died (no heartbeat, or its process is gone)"


def default_journal() -> Path:
    return mlruns_dir() / "optuna" / "journal.log"


def describe(url: str | None) -> str:
    """The storage as logged and printed: passwords masked."""
    return mask_secrets(url) if url else f"journal:{default_journal()}"


class EndStaleTrialRun:
    """Heartbeat callback: a trial whose worker died is failed by Optuna; end its MLflow child run
    as KILLED (not left RUNNING), then let Optuna re-queue its parameters."""

    def __init__(self, max_retry: int = 1) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            client = MlflowClient()
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, "state", "failed")
                client.set_tag(run_id, "fail_reason", STALE_REASON)
                client.set_terminated(run_id, status="KILLED")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            self.retry(study, trial)


def open_storage(url: str | None = None, heartbeat: int | None = None) -> optuna.storages.BaseStorage:
    """A journal file (default or a ``.log`` path) or any RDB URL, with heartbeats if asked."""
    if url is None or url.endswith(".log") or url.startswith("journal:"):
        if heartbeat:
            raise ValueError("--heartbeat needs a relational --storage (sqlite:///..., postgresql+psycopg://...)")
        path = Path(url.removeprefix("journal:")) if url else default_journal()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise ValueError(f"--storage {url!r}: expected an Optuna storage URL (sqlite:///study.db, "
                         "postgresql+psycopg://user@host/db) or a journal file path ending in .log")
    kwargs: dict = {"engine_kwargs": {"pool_pre_ping": True}} if not url.startswith("sqlite") else {}
    if heartbeat:
        kwargs.update(heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                      heartbeat_stale_trial_callback=EndStaleTrialRun())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        for attempt in range(4):  # workers starting together on a fresh database race to create its tables
            try:
                return RetryingRDBStorage(url, **kwargs)
            except DBAPIError:
                time.sleep(0.5 + attempt)
            except (ArgumentError, ImportError) as e:  # a scheme SQLAlchemy does not know, a driver not installed
                raise StorageError(f"--storage {describe(url)} cannot be opened ({first_line(e)})") from None
        try:
            return RetryingRDBStorage(url, **kwargs)  # the last attempt: its error is the one reported
        except DBAPIError as e:
            first = (str(e.orig or e).splitlines() or [type(e).__name__])[0]
            raise StorageError(f"storage {describe(url)} is unreachable ({first})") from None


class StorageError(ValueError):
    """The study storage cannot be used (a one-line error in the CLI)."""


# --------------------------------------------------------------------------- outages (issue 16)


def retry_seconds() -> float:
    """How long a storage call retries a lost database before the worker gives up (default 60 s)."""
    return float(os.environ.get("RESLAB_STORE_RETRY_SECONDS", "60"))


def is_outage(e: BaseException) -> bool:
    """The database cannot be reached (refused, dropped, restarting): Optuna wraps SQLAlchemy's error in
    StorageInternalError; a bad statement or a constraint is not an outage."""
    if isinstance(e, StorageUnreachable):
        return True
    if isinstance(e, optuna.exceptions.StorageInternalError):
        e = e.__cause__ or e
    return isinstance(e, (OperationalError, InterfaceError))


class StorageUnreachable(StorageError):
    """The storage stayed unreachable for the whole retry window."""


_gave_up: list[StorageUnreachable] = []  # the first time the storage stayed unreachable, until a call succeeds


def _first(e: StorageUnreachable) -> StorageUnreachable:
    if not _gave_up:
        _gave_up.append(e)
    return e


def storage_gone() -> StorageUnreachable | None:
    """The error of the call that first gave up on the storage (later calls fail on top of it), if it is still gone."""
    return _gave_up[0] if _gave_up else None


_retrying = threading.local()  # .active: this thread is inside a retried call


def _with_retries(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if getattr(_retrying, "active", False):  # a call inside a retried call: the outer one retries
            return method(self, *args, **kwargs)
        _retrying.active = True
        try:  # once a call gave up, the next ones try once: cleanup after the error does not wait again
            deadline, wait, warned = time.monotonic() + (0 if _gave_up else retry_seconds()), 0.5, False
            while True:
                try:
                    out = method(self, *args, **kwargs)
                    _gave_up.clear()
                    return out
                except Exception as e:
                    if not is_outage(e):
                        raise
                    cause = e.__cause__ if isinstance(e, optuna.exceptions.StorageInternalError) else e
                    first = (str(getattr(cause, "orig", None) or cause).strip().splitlines() or [type(cause).__name__])[0]
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise _first(StorageUnreachable(f"study storage {describe(self.url)} unreachable for "
                                                        f"{retry_seconds():.0f} s ({first})")) from e
                    if not warned:
                        print(f"study storage unreachable ({first}); retrying for up to {retry_seconds():.0f} s",
                              flush=True)  # stdout, with the trial lines: stderr keeps the one error line
                        warned = True
                    time.sleep(min(wait, left))
                    wait = min(2 * wait, 10.0)
        finally:
            _retrying.active = False
    return call


class RetryingRDBStorage(RDBStorage):
    """An RDB storage whose calls ride out a database restart: a connection error is retried with backoff
    (0.5 s doubling to 10 s) for ``RESLAB_STORE_RETRY_SECONDS``, then raised as one StorageUnreachable.
    Only connection errors are retried, and a call that fails to connect never reached the database."""


for _name in ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
              "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
              "get_all_studies", "create_new_trial", "_create_new_trial", "set_trial_param", "_set_trial_param",
              "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id", "get_trial_param",
              "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
              "get_trial", "get_all_trials", "_get_trials", "get_n_trials", "get_best_trial", "_get_best_trial_id",
              "record_heartbeat", "_get_stale_trial_ids"):
    setattr(RetryingRDBStorage, _name, _with_retries(getattr(RDBStorage, _name)))


def reap_dead_local_trials(study: optuna.Study) -> int:
    """Without heartbeats (journal storage) a ``kill -9``'d worker leaves its trial RUNNING forever.
    Trials whose worker ran on this host and whose process is gone are failed here, their MLflow
    run ended KILLED and their parameters queued again, as a heartbeat would."""
    host, reaped = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        who = t.user_attrs.get("worker", "")
        if not who.startswith(f"{host}:") or worker_alive(who):
            continue
        try:
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker reaped it first
        EndStaleTrialRun()(study, study._storage.get_trial(t._trial_id))
        reaped += 1
    return reaped


def worker_id() -> str:
    """host:pid:start of this process. The start time (kernel clock ticks since boot) tells this process
    from a later one that reuses its pid, e.g. a worker restarted in a fresh container where pids start
    again from 1: host and pid alone would call a dead worker's trial alive forever."""
    pid = os.getpid()
    start = process_start(pid)
    return f"{socket.gethostname()}:{pid}" + (f":{start}" if start else "")


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (field 22 of /proc/<pid>/stat), or None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # after the command name, which may hold spaces and ')'


def worker_alive(who: str) -> bool:
    """Whether the worker ``host:pid[:start]`` (of this host) still runs: its pid exists and, when its start
    time was recorded, the process with that pid started then (not a newcomer that reuses the pid)."""
    parts = who.split(":")
    pid = int(parts[1])
    if not _alive(pid):
        return False
    if len(parts) < 3 or process_start(pid) is None:  # recorded by an older reslab, or no /proc
        return True
    return process_start(pid) == parts[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only (PermissionError still means it exists)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True

