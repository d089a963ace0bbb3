"""Issue 16: PostgreSQL (the Optuna storage) or the MLflow server going away in the middle of a study, with
the real servers stopped and started again.

- back within the retry window: the worker waits (storage calls retry with backoff for
  RESLAB_STORE_RETRY_SECONDS, MLflow's client for about RESLAB_TRACKING_RETRY_SECONDS) and the study finishes;
- gone for good: the worker stops within a bounded time with one ``reslab: error:`` line naming the outage,
  and once the server is back nothing it left is RUNNING, or the next invocation closes it.

One PostgreSQL cluster (database ``optuna``) and one ``mlflow server`` (SQLite backend, so stopping PostgreSQL
leaves MLflow up) for the module, each stopped and restarted on its own port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from conftest import free_port, missing, wait_for_server
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from pgcluster import _as_owner, pg_bin, postgres_cluster

from train.tracking import server_environment

# Minutes of servers, processes or budgets: run by CI (CI=true make test) and `make test-all`, not by a plain `make test`.
pytestmark = pytest.mark.slow


RESLAB = [str(Path(sys.executable).parent / "reslab")]
TRIAL = ["--dataset", "cifar10", "--subset", "300", "--epochs", "1", "--batch-size", "32", "--no-progress"]


class Tracking:
    """``mlflow server`` on a fixed port that the test stops (SIGKILL: the server is gone) and starts again."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self.proc = folder, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.folder / "mlflow-server.log"
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
               "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=server_environment())
        wait_for_server(self.uri + "/health", self.proc, 120, log.read_text)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class Database:
    """The PostgreSQL cluster of tests/pgcluster.py, stopped (``-m fast``: clients are disconnected) and
    started again with the same options."""

    def __init__(self, pg) -> None:
        self.pg, self.data = pg, pg.folder / "data"
        self.pg_ctl = str(pg_bin() / "pg_ctl")

    def stop(self) -> None:
        subprocess.run(_as_owner([self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"]), check=True,
                       capture_output=True, timeout=60)

    def start(self) -> None:
        options = (f"-p {self.pg.port} -k {self.pg.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=100")
        subprocess.run(_as_owner([self.pg_ctl, "-D", str(self.data), "-o", options, "-l",
                                  str(self.pg.folder / "server.log"), "-w", "-t", "60", "start"]),
                       check=True, capture_output=True, timeout=90)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, data_dir):
    if pg_bin() is None:
        missing("PostgreSQL server binaries not installed (make test installs the postgresql package)")
    folder = tmp_path_factory.mktemp("outages")
    with postgres_cluster() as pg:
        storage = pg.create_database("optuna")
        tracking = Tracking(folder)
        tracking.start()
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RESLAB_", "RANK", "WORLD_SIZE"))}
            env.update(MLFLOW_TRACKING_URI=tracking.uri, RESLAB_MLRUNS=str(folder / "mlruns"), OMP_NUM_THREADS="1",
                       RESLAB_DATA=str(data_dir))
            watcher = optuna.storages.RDBStorage(storage, engine_kwargs={"pool_pre_ping": True})  # survives restarts
            yield SimpleNamespace(storage=storage, tracking=tracking, db=Database(pg), folder=folder, env=env,
                                  client=MlflowClient(tracking.uri), optuna=watcher)
            watcher.remove_session()
        finally:
            tracking.stop()


def start_worker(servers, study: str, trials: int, **env: str) -> subprocess.Popen:
    args = ["tune", *TRIAL, "--storage", servers.storage, "--study", study, "--trials", str(trials),
            "--experiment", study, "--no-register"]
    return subprocess.Popen([*RESLAB, *args], cwd=servers.folder, env={**servers.env, **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_trial(servers, study: str, worker: subprocess.Popen) -> optuna.trial.FrozenTrial:
    """The worker's first trial once it is inside the objective (its MLflow run exists)."""
    deadline = time.monotonic() + 120
    while True:
        assert worker.poll() is None, worker.communicate()
        assert time.monotonic() < deadline, "the worker never started a trial"
        try:
            running = optuna.load_study(study_name=study, storage=servers.optuna).get_trials(states=(TrialState.RUNNING,))
        except KeyError:
            running = []
        found = next((t for t in running if "mlflow_run_id" in t.user_attrs), None)
        if found:
            return found
        time.sleep(0.2)


def runs(servers, study: str) -> list:
    exp = servers.client.get_experiment_by_name(study)
    return servers.client.search_runs([exp.experiment_id]) if exp else []


def one_error_line(err: str) -> str:
    """The worker's stderr holds exactly one line, the ``reslab: error:`` line; returns it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("reslab: error: "), err[-3000:]
    return lines[0]


def assert_nothing_running(servers, study: str) -> None:
    trials = optuna.load_study(study_name=study, storage=servers.optuna).get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], [(t.number, t.state) for t in trials]
    left = [(r.data.tags.get("kind"), r.data.tags.get("optuna.trial")) for r in runs(servers, study) if r.info.status == "RUNNING"]
    assert not left, left


# --------------------------------------------------------------------------- the MLflow server


def test_tracking_server_lost_mid_study(servers):
    """Two workers on two studies, both inside a trial when the MLflow server is killed. "gone" (window 4 s:
    MLflow's client waits 0, 2 and 4 s) stops with one error line after about that window, not after MLflow's
    default ~4 minutes per call; its trial is FAIL in Optuna and the invocation is marked ended in the study,
    so the next invocation ends the runs MLflow never heard the end of. The server is then started again
    (about 25 s here) within the window of "back" (120 s), which goes on and finishes its study."""
    back = start_worker(servers, "mlflow-back", 3, RESLAB_TRACKING_RETRY_SECONDS="120")
    gone = start_worker(servers, "mlflow-gone", 3, RESLAB_TRACKING_RETRY_SECONDS="4")
    lost = wait_for_trial(servers, "mlflow-gone", gone)
    survived = wait_for_trial(servers, "mlflow-back", back)
    servers.tracking.stop()
    t0 = time.monotonic()
    try:
        out, err = gone.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        servers.tracking.start()
    restarted = time.time()
    assert gone.returncode != 0
    line = one_error_line(err)
    assert "Connection refused" in line or "Max retries exceeded" in line, line
    print(f"MLflow gone: the worker stopped {took:.1f} s after the kill: {line}")
    assert took < 25, took  # one window (6-9 s with jitter), not one per cleanup call
    assert optuna.load_study(study_name="mlflow-gone", storage=servers.optuna).trials[lost.number].state == TrialState.FAIL
    left = {r.data.tags.get("kind") for r in runs(servers, "mlflow-gone") if r.info.status == "RUNNING"}
    assert left == {"study", "trial"}, left  # MLflow never heard the end ...
    import mlflow

    from tune import parent

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(servers.tracking.uri)
    try:  # ... the next invocation's first step ends both
        study = optuna.load_study(study_name="mlflow-gone", storage=servers.optuna)
        experiment = servers.client.get_experiment_by_name("mlflow-gone").experiment_id
        inv, created = parent.join_or_start(study, experiment, 1, {}, {})
        assert created
        parent.end(inv)
    finally:
        mlflow.set_tracking_uri(previous)
    assert_nothing_running(servers, "mlflow-gone")
    run = servers.client.get_run(lost.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "unreachable" in run.data.tags["end_reason"]
    parents = [r for r in runs(servers, "mlflow-gone") if r.data.tags.get("kind") == "study"]
    assert sorted(r.info.status for r in parents) == ["FAILED", "FINISHED"]

    out, err = back.communicate(timeout=300)
    assert back.returncode == 0, out[-2000:] + err[-3000:]
    run = servers.client.get_run(survived.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.end_time / 1000 > restarted  # the outage hit this trial
    states = [t.state for t in optuna.load_study(study_name="mlflow-back", storage=servers.optuna).trials]
    assert len(states) == 3 and all(s.is_finished() for s in states), states
    assert_nothing_running(servers, "mlflow-back")
    (parent_run,) = [r for r in runs(servers, "mlflow-back") if r.data.tags.get("kind") == "study"]
    assert parent_run.info.status == "FINISHED"


# --------------------------------------------------------------------------- PostgreSQL


def test_storage_lost_mid_study(servers, monkeypatch):
    """Two workers on two studies, both inside a trial when PostgreSQL is stopped (its connections cut).
    "gone" (RESLAB_STORE_RETRY_SECONDS=4) stops with one error line naming the storage after about one
    window (Optuna's own tell and cleanup then fail on top of it: the first error is the one shown); its
    trial's MLflow run and the parent run end FAILED at once (MLflow is up); its Optuna trial stays RUNNING
    only until the next invocation on this host reaps it (its worker is dead). PostgreSQL is then started
    again within the window of "back" (60 s), which goes on and finishes its study."""
    back = start_worker(servers, "pg-back", 3, RESLAB_STORE_RETRY_SECONDS="60")
    gone = start_worker(servers, "pg-gone", 3, RESLAB_STORE_RETRY_SECONDS="4")
    lost = wait_for_trial(servers, "pg-gone", gone)
    wait_for_trial(servers, "pg-back", back)
    servers.db.stop()
    t0 = time.monotonic()
    try:
        out, err = gone.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        servers.db.start()
    assert gone.returncode != 0
    line = one_error_line(err)
    assert "study storage postgresql+psycopg://reslab@127.0.0.1" in line and "unreachable for 4 s" in line, line
    print(f"PostgreSQL gone: the worker stopped {took:.1f} s after the stop: {line}")
    assert took < 20, took
    run = servers.client.get_run(lost.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "unreachable" in run.data.tags["fail_reason"]
    (parent_run,) = [r for r in runs(servers, "pg-gone") if r.data.tags.get("kind") == "study"]
    assert parent_run.info.status == "FAILED" and "storage is unreachable" in parent_run.data.tags["end_reason"]
    import mlflow

    from tune.storage import reap_dead_local_trials

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(servers.tracking.uri)
    try:  # what the next invocation does first (fail_stale): this host's dead worker's trial is failed
        assert reap_dead_local_trials(optuna.load_study(study_name="pg-gone", storage=servers.optuna)) == 1
    finally:
        mlflow.set_tracking_uri(previous)
    assert_nothing_running(servers, "pg-gone")

    out, err = back.communicate(timeout=300)
    assert back.returncode == 0, out[-2000:] + err[-3000:]
    assert "study storage unreachable" in out  # the outage was met, and ridden out: no trial failed for it
    states = [t.state for t in optuna.load_study(study_name="pg-back", storage=servers.optuna).trials]
    assert len(states) == 3 and all(s.is_finished() for s in states) and optuna.trial.TrialState.FAIL not in states, states
    assert_nothing_running(servers, "pg-back")


# --------------------------------------------------------------------------- cleanup and URLs (no servers)


def test_cleanup_failure_never_hides_the_error(monkeypatch):
    """After an error the study ends its parent run; when that cleanup fails too (the storage broke in
    another way, the tracking store refuses), it is a warning and the original error is the one raised."""
    import mlflow

    from train.errors import ReslabWarning
    from tune import study as study_mod
    from tune.objective import end_trial_run
    from tune.parent import Invocation

    class BrokenStudy:
        def get_trials(self, *args, **kwargs):
            raise RuntimeError("the cleanup broke")

    inv = Invocation("0" * 32, 1, 0, 2, time.time())
    with pytest.warns(ReslabWarning, match="could not end the study's parent run .*the cleanup broke"):
        study_mod.end_after_error(BrokenStudy(), inv, ValueError("the original error"), "FAILED")

    def refused(*args, **kwargs):
        raise RuntimeError("the tracking store refused")

    def original():
        try:
            raise ValueError("the original error")
        finally:
            end_trial_run("failed", 1.0, failing=True)

    monkeypatch.setattr(mlflow, "log_metric", refused)
    with pytest.warns(ReslabWarning, match="could not close the trial's MLflow run .*refused"), \
            pytest.raises(ValueError, match="the original error"):
        original()


def test_reachability_check_takes_userinfo_urls(monkeypatch):
    """``http://user:pass@host:port``: urllib takes ``user:pass@host`` for a host name ("Name or service not
    known" for a server that is up); the check strips it and sends it as Basic auth, as MLflow's client does."""
    import base64
    import http.server
    import threading

    from train.tracking import setup_tracking

    seen: list[tuple[str, str | None]] = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            """Quiet: the test reads ``seen``, not the server's log."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    import mlflow

    previous = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RESLAB_TRACKING_RETRY_SECONDS", "60")
    try:
        setup_tracking(f"http://alice:s%40cret@127.0.0.1:{server.server_port}")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
        setup_tracking(f"http://127.0.0.1:{server.server_port}/")
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
        server.shutdown()
    assert seen == [("/health", "Basic " + base64.b64encode(b"alice:s@cret").decode()),
                    ("/health", "Basic " + base64.b64encode(b"bob:pw").decode())]
    # MLflow's client retries a lost server for about a minute in reslab processes (waits 0, 2, ..., 32 s)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "6" and os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
