"""Long runs under faults and hostile settings (issue 16): a dead worker's pid reused by a newcomer,
passwords in storage and tracking URLs kept out of everything printed or logged, no network call at import."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from conftest import free_port

SECRET = "s3cr3t-PaSS"


# --------------------------------------------------------------------------- a dead worker, its pid reused


def test_a_dead_workers_trial_is_reaped_even_when_its_pid_is_reused(tmp_path):
    """Journal storage has no heartbeat: a RUNNING trial whose worker is gone is failed by pid. A new
    process (here: this one) reusing the dead worker's host and pid must not keep it alive forever."""
    from tune.storage import open_storage, process_start, reap_dead_local_trials, worker_id

    storage = open_storage(str(tmp_path / "journal.log"))
    study = optuna.create_study(study_name="s", storage=storage)
    host, pid, start = socket.gethostname(), os.getpid(), process_start(os.getpid())
    assert start and worker_id() == f"{host}:{pid}:{start}"
    workers = {
        "reused pid": f"{host}:{pid}:{int(start) - 100}",  # this pid, but a process that started earlier: dead
        "alive": worker_id(),  # this very process
        "older reslab": f"{host}:{pid}",  # recorded without a start time: the pid alone decides
        "gone": f"{host}:{2 ** 22 + 7}:123",  # no such pid
        "other host": f"not-{host}:1:1",  # not ours to judge
    }
    numbers = {}
    for name, who in workers.items():
        t = study.ask()
        t.set_user_attr("worker", who)
        numbers[name] = t.number
    assert reap_dead_local_trials(study) == 2
    state = {name: study.trials[n].state for name, n in numbers.items()}
    assert state == {"reused pid": TrialState.FAIL, "alive": TrialState.RUNNING, "older reslab": TrialState.RUNNING,
                     "gone": TrialState.FAIL, "other host": TrialState.RUNNING}


# --------------------------------------------------------------------------- passwords


def test_mask_secrets():
    from train.redact import mask_secrets
    from tune.storage import describe

    for url in (f"postgresql+psycopg://reslab:{SECRET}@db:5432/optuna", f"http://me:{SECRET}@mlflow:5000",
                f"mysql+pymysql://:{SECRET}@h/db", f"postgresql://u:p/{SECRET}@h/db", f"https://h/x?token={SECRET}&a=1"):
        line = f"reslab tune --storage {url} --trials 3"
        assert SECRET not in mask_secrets(line) and "***" in mask_secrets(line) and SECRET not in describe(url)
        assert mask_secrets(line).endswith(" --trials 3")
    for harmless in ("sqlite:////tmp/a.db", "http://127.0.0.1:5000", "postgresql+psycopg://reslab@h:5432/db"):
        assert mask_secrets(harmless) == harmless


@pytest.fixture
def cli(in_process, tmp_path):
    """``reslab`` in this process (conftest.in_process); returns (exit code, stdout + stderr)."""

    def run(args: list[str]) -> tuple[int, str]:
        done = in_process(args, tmp_path / "mlruns")
        return done.returncode, done.stdout + done.stderr

    return run


def test_passwords_are_masked_in_errors_and_the_torchrun_line(cli, monkeypatch):
    """The tracking server's one-line error, the storage's, and the torchrun command ``--nproc`` prints."""
    port = free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://reslab:{SECRET}@127.0.0.1:{port}")
    code, out = cli(["train", "--subset", "100", "--epochs", "1", "--no-progress"])
    assert code == 2 and "unreachable" in out and f"http://reslab:***@127.0.0.1:{port}" in out
    assert SECRET not in out

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setattr("tune.storage.time.sleep", lambda s: None)  # the start-up race retries
    storage = f"postgresql+psycopg://reslab:{SECRET}@127.0.0.1:{port}/optuna"
    code, out = cli(["tune", "--storage", storage, "--subset", "100", "--trials", "1", "--no-progress"])
    assert code == 2 and "reslab: error:" in out and SECRET not in out

    execs = []
    monkeypatch.setattr(os, "execv", lambda path, argv: execs.append(argv))
    code, out = cli(["tune", "--nproc", "2", "--storage", storage, "--study", "s", "--trials", "1", "--no-progress"])
    assert code == 0 and len(execs) == 1 and storage in execs[0]  # the workers get the real URL ...
    assert "torchrun --standalone --nproc-per-node=2 -m tune" in out and "reslab:***@127.0.0.1" in out
    assert SECRET not in out  # ... the console does not

    # `reslab ui` over a database store printed its URL, password and all (the server itself is not started here)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", storage)
    started = []
    monkeypatch.setattr("train.cli.subprocess.call", lambda cmd, env: started.append(cmd) or 0)
    code, out = cli(["ui", "--port", str(port)])
    assert code == 0 and started and storage in started[0] and "(store: postgresql+psycopg://reslab:***@" in out, out
    assert SECRET not in out


# --------------------------------------------------------------------------- no network calls at import


def test_importing_the_cli_makes_no_network_request():
    """albumentations checks PyPI for updates at import; reslab turns that off (offline machines warned,
    every CLI start and worker process paid for a request). An audit hook sees any urllib request, from the
    CLI's import through albumentations' own (made where its pipeline is built)."""
    code = (
        "import sys\n"
        "seen = []\n"
        "sys.addaudithook(lambda event, args: seen.append(args[0]) if event == 'urllib.Request' else None)\n"
        "import train.cli, train.augment\n"
        "train.augment.album_pipeline(1)\n"  # where albumentations loads (FER-2013's augmentation), not at import
        "assert 'albumentations' in sys.modules\n"
        "print(len(seen), seen)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("0 "), f"urllib requests at import: {out.stdout}"
