"""Where studies live.

The default is Optuna's journal file inside ``mlruns/optuna/``: it needs no server, and several
workers on one machine can append to it at once (a file lock, no "database is locked"). Any Optuna
storage URL (``sqlite:///...``, ``postgresql+psycopg://...``, ``mysql+pymysql://...``) or a
``.log`` journal path works too; only relational storages support heartbeats.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import DBAPIError

from train.redact import mask_secrets
from train.tracking import mlruns_dir

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
                return RDBStorage(url, **kwargs)
            except DBAPIError:
                time.sleep(0.5 + attempt)
        try:
            return RDBStorage(url, **kwargs)  # the last attempt: its error is the one reported
        except DBAPIError as e:
            first = (str(e.orig or e).splitlines() or [type(e).__name__])[0]
            raise StorageError(f"storage {describe(url)} is unreachable ({first})") from None


class StorageError(ValueError):
    """The study storage cannot be used (a one-line error in the CLI)."""


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

