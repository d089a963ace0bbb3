"""Faults during training, through the real ``reslab train`` command: a SIGKILL mid-run and a
resume, an unreachable tracking server, an unwritable ``mlruns/`` and a full disk."""

from __future__ import annotations

import contextlib
import os
import signal
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import free_port, missing

RESLAB = [str(Path(sys.executable).parent / "reslab")]  # the installed console script
TINY = ["--subset", "300", "--batch-size", "32", "--no-progress"]


@pytest.fixture
def no_test_split(tmp_path) -> list[str]:
    """``--config`` that skips the 10,000-image test evaluation (minutes on one busy core)."""
    (tmp_path / "no-test.yaml").write_text("evaluate_test: false\n")
    return ["--config", str(tmp_path / "no-test.yaml")]


def reslab_env(tmp: Path, **extra: str) -> dict[str, str]:
    """One thread per process: oneDNN's results then do not depend on the load, and 2 cores suffice."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "OMP_NUM_THREADS": "1", "RESLAB_MLRUNS": str(tmp / "mlruns"), **extra}


def run_reslab(args: list[str], tmp: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RESLAB, *args], cwd=tmp, env=reslab_env(tmp, **env), capture_output=True, text=True, timeout=timeout)


LOG_LINE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO ")  # MLflow creating a fresh store


def error_lines(stderr: str) -> list[str]:
    """stderr without INFO logging and warnings about optional commands that are not installed."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("reslab: warning:") and not LOG_LINE.match(ln)]


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("reslab: error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


# --------------------------------------------------------------------------- SIGKILL + --resume


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, cifar, no_test_split):
    """Kill ``reslab train`` with SIGKILL during epoch 2 of 2, resume it from its checkpoint folder,
    and compare every logged number with an uninterrupted run of the same configuration."""
    ck = tmp_path / "ck"
    args = ["train", *TINY, *no_test_split, "--epochs", "2", "--checkpoint-dir", str(ck), "--run-name", "killed"]
    proc = subprocess.Popen([*RESLAB, *args], cwd=tmp_path, env=reslab_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def kill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 240
        while not (ck / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # epoch 1 is checkpointed: epoch 2 is under way

    killer = threading.Thread(target=kill_after_first_checkpoint)
    killer.start()
    # Meanwhile, the uninterrupted reference in this process (same resolved configuration, one thread).
    from train.config import TrainConfig
    from train.engine import fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = fit(TrainConfig(subset=300, batch_size=32, epochs=2, evaluate_test=False, progress=False), cifar)
    finally:
        torch.set_num_threads(threads)
    killer.join()
    assert proc.wait(30) == -signal.SIGKILL, proc.stderr.read()[-3000:]
    ckpt = torch.load(ck / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1, "the run ended before it was killed; the test did not interrupt anything"
    assert {**ckpt["config"], "checkpoint_dir": None} == ref.config.to_dict()  # the CLI ran the same config

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    client = MlflowClient()
    run_id = ckpt["meta"]["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "RUNNING"  # a SIGKILL leaves the run open

    resumed = run_reslab(["train", "--resume", str(ck)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at epoch 1" in resumed.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the same run continued, no second one
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        logged = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert logged == {h["epoch"]: h[key] for h in ref.history}, key  # exact: same batches, same float ops
    assert run.data.metrics["final_val_acc"] == ref.val.accuracy
    assert len(ref.history) == 2


# --------------------------------------------------------------------------- the store


def test_unreachable_tracking_server_fails_before_training(tmp_path):
    """The store is checked before the dataset is decoded: the run's own, empty data cache stays empty
    (a decode writes the dataset's uint8 arrays there first) and nothing trains. No wall-clock cap: the
    subprocess timeout only guards against a hang (MLflow's default retries would take minutes)."""
    port = free_port()  # bound and released: nothing listens there
    cache = tmp_path / "cache"
    proc = run_reslab(["train", *TINY, "--epochs", "1"], tmp_path, timeout=300,
                      MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}", RESLAB_CACHE=str(cache))
    assert_one_line_error(proc, f"127.0.0.1:{port}", "unreachable")
    assert "epoch" not in proc.stdout and not (tmp_path / "checkpoints").exists()  # nothing was trained
    assert not cache.exists() or not any(cache.rglob("*.npz")), sorted(cache.rglob("*"))  # nothing was decoded


def test_mlruns_under_a_file_is_a_clear_error(tmp_path, in_process):
    (tmp_path / "not-a-folder").write_text("x")
    proc = in_process(["train", *TINY, "--epochs", "1"], tmp_path / "not-a-folder" / "mlruns")
    assert_one_line_error(proc, "not writable", "not-a-folder")
    assert "epoch" not in proc.stdout


@contextmanager
def tmpfs(path: Path, options: str):
    """A small RAM file system at ``path`` (needs root and mount rights; skips otherwise, fails under CI)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        missing("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        missing(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_mlruns_is_a_clear_error(tmp_path, in_process):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        proc = in_process(["train", *TINY, "--epochs", "1"], ro / "mlruns")
    assert_one_line_error(proc, "not writable", "Read-only file system")


def test_full_disk_is_a_clear_error(tmp_path, in_process):
    """The checkpoint folder on a 256 KB file system: the first checkpoint (~2 MB) does not fit."""
    with tmpfs(tmp_path / "small", "size=256k") as small:
        proc = in_process(["train", "--subset", "100", "--batch-size", "50", "--epochs", "2", "--no-progress",
                           "--checkpoint-dir", str(small / "ck")], tmp_path / "mlruns")
        leftovers = sorted(p.name for p in (small / "ck").iterdir())
    assert_one_line_error(proc, "No space left on device", str(small / "ck" / "last.pt"))
    assert leftovers == []  # the partial file was removed, not left to be mistaken for a checkpoint
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").search_runs(["1"])
    assert [r.info.status for r in run] == ["FAILED"]  # the MLflow run is closed as failed, not left RUNNING


# --------------------------------------------------------------------------- checkpoints (issue 16)


def tiny_state(epoch: int) -> dict:
    return {"model": {"w": torch.full((1000,), float(epoch))}, "epoch": epoch, "step": 10 * epoch, "history": [], "config": {}}


def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(tmp_path):
    from train.engine import CheckpointError, CheckpointFallback, load_checkpoint, save_checkpoint

    ck = tmp_path / "ck"
    for epoch in (1, 2, 3):
        save_checkpoint(ck / "last.pt", tiny_state(epoch))
    assert sorted(p.name for p in ck.iterdir()) == ["last.pt", "previous.pt"]  # two kept, no temp files
    assert load_checkpoint(ck)["epoch"] == 3
    raw = (ck / "last.pt").read_bytes()
    (ck / "last.pt").write_bytes(raw[: len(raw) // 2])  # torn: a crash mid-copy, a full disk
    with pytest.warns(CheckpointFallback, match=r"last.pt: not a readable checkpoint \(.*\); resuming from .*previous.pt "
                                                r"\(epoch 2\) instead"):
        assert load_checkpoint(ck)["epoch"] == 2
    (ck / "previous.pt").write_bytes(b"\0" * 4096)  # zeros, as a power cut can leave
    with pytest.raises(CheckpointError, match=r"last.pt: not a readable checkpoint") as err:
        load_checkpoint(ck)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["torn", "zeros"])
def test_the_save_after_a_fallback_keeps_the_good_previous_checkpoint(tmp_path, damage):
    """A run resumed from previous.pt (its last.pt unreadable) saves its next epoch: the unreadable last.pt
    used to be rotated into previous.pt, so for that epoch the only good fallback was gone."""
    from train.engine import CheckpointFallback, load_checkpoint, save_checkpoint

    for epoch in (1, 2):
        save_checkpoint(tmp_path / "last.pt", tiny_state(epoch))
    raw = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(raw[: len(raw) // 2] if damage == "torn" else b"\0" * len(raw))
    with pytest.warns(CheckpointFallback):
        assert load_checkpoint(tmp_path)["epoch"] == 1
    save_checkpoint(tmp_path / "last.pt", tiny_state(2))  # the resumed run's epoch 2
    assert load_checkpoint(tmp_path / "previous.pt")["epoch"] == 1 and load_checkpoint(tmp_path)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]


def test_corrupt_checkpoint_resume_is_a_one_line_error(tmp_path, in_process):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "last.pt").write_bytes(b"PK\x03\x04 torn")
    proc = in_process(["train", "--resume", str(ck)], tmp_path / "mlruns")
    assert_one_line_error(proc, "last.pt: not a readable checkpoint")


def test_resume_refuses_flags_it_would_drop(tmp_path, in_process):
    """--resume trains what its checkpoint holds: --epochs, --lr, --run-name and the like were accepted and
    silently dropped (a user asking for 60 epochs got the old length). They are one line now, before anything
    is read; where it runs may change (--device, --data, --no-progress, also given here)."""
    proc = in_process(["train", "--resume", str(tmp_path / "ck"), "--epochs", "60", "--lr", "0.1", "--run-name", "x",
                       "--device", "cpu", "--no-progress"], tmp_path / "mlruns")
    assert_one_line_error(proc, "--resume continues the run exactly as its checkpoint holds it: leave out --epochs, --lr, "
                                "--run-name (only --device, --data, --download and --no-progress may change")


def test_checkpoints_are_fsynced_and_concurrent_writers_do_not_share_a_temp_file(tmp_path, monkeypatch):
    """Two writers of one checkpoint meet between writing and renaming their temp files (a barrier in
    fsync): with a shared temp name the second truncates the first's file and one rename fails."""
    from train.engine import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "last.pt", tiny_state(0))  # an earlier epoch: both writers keep a previous.pt
    barrier, synced = threading.Barrier(2, timeout=20), []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        import stat

        is_file = stat.S_ISREG(os.fstat(fd).st_mode)
        synced.append("file" if is_file else "folder")
        if is_file and len(synced) <= 2:
            barrier.wait()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    errors: list[BaseException] = []

    def write(epoch: int) -> None:
        try:
            save_checkpoint(tmp_path / "last.pt", tiny_state(epoch))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write, args=(e,)) for e in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(synced) == ["file", "file", "folder", "folder"]
    assert load_checkpoint(tmp_path)["epoch"] in (1, 2) and load_checkpoint(tmp_path / "previous.pt")["epoch"] in (0, 1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]


# --------------------------------------------------------------------------- SIGTERM (issue 16)


def test_a_sigterm_whose_exception_python_drops_is_raised_at_the_next_step(monkeypatch, capsys):
    """A signal handler's exception raised inside a __del__ (garbage collection runs them at any moment)
    is printed as "Exception ignored" and dropped: once in six SIGTERMs here, a run then trained on to
    the end. The signal is remembered and the training loop raises it at its next step, silently."""
    from train.interrupt import Terminated, raise_if_terminated, terminate_like_ctrl_c

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # restored afterwards
    previous = signal.getsignal(signal.SIGTERM)
    try:
        terminate_like_ctrl_c()

        class SignalledDuringCollection:
            def __del__(self) -> None:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)  # the handler runs here, inside __del__ (a signal interrupts the sleep)

        SignalledDuringCollection()  # collected at once: Terminated raised in __del__, dropped
        with pytest.raises(Terminated):
            raise_if_terminated()
        raise_if_terminated()  # raised once only
        assert "Exception ignored" not in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_inside_a_deferred_block_is_raised_when_it_ends(signum):
    """A tracking write (signals_deferred) runs to its end; the signal's exception comes right after it.
    A second Ctrl-C inside the block does not wait."""
    from train.interrupt import Terminated, handled, signals_deferred, terminate_like_ctrl_c

    expected = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    finished = []
    try:
        terminate_like_ctrl_c()
        with pytest.raises(expected):
            with signals_deferred():
                os.kill(os.getpid(), signum)
                time.sleep(0.01)  # the handler runs here
                finished.append("write")
        assert finished == ["write"]
        terminate_like_ctrl_c()
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
                finished.append("first Ctrl-C deferred")
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
                finished.append("second Ctrl-C deferred")
        assert finished == ["write", "first Ctrl-C deferred"]
    finally:
        handled()  # as the CLI does: no signal is left pending for the tests that follow
        for s, h in previous.items():
            signal.signal(s, h)


def test_a_sigterm_inside_an_mlflow_write_ends_the_run_killed_not_locked(tmp_path, no_test_split, in_process):
    """SIGTERM while the epoch's metrics are being written to the SQLite store (CI saw it once): the
    exception raised inside SQLAlchemy kept the half-done write's lock, and the cleanup's set_tag waited
    20 s and failed with "database is locked". The write now finishes first; the run ends KILLED."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    fired: list[str] = []

    def sigterm_inside_the_metrics_insert(conn, cursor, statement, *args) -> None:  # noqa: ANN001
        if not fired and statement.startswith("INSERT INTO metrics"):
            fired.append(statement)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler runs here, inside SQLAlchemy's execute

    event.listen(Engine, "after_cursor_execute", sigterm_inside_the_metrics_insert)
    try:
        ended = in_process(["train", *TINY, *no_test_split, "--epochs", "2", "--run-name", "termed-in-write"],
                           tmp_path / "mlruns")
    finally:
        event.remove(Engine, "after_cursor_execute", sigterm_inside_the_metrics_insert)
    assert fired, "no metric was written: the test interrupted nothing"
    assert ended.returncode == 143, ended.stderr[-3000:]
    assert "locked" not in ended.stderr and "terminated (SIGTERM)" in ended.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cifar10").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["end_reason"] == "SIGTERM"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1]  # epoch 1, whole


def test_sigterm_ends_train_like_ctrl_c_and_a_resume_continues_past_a_corrupt_last_pt(tmp_path, no_test_split,
                                                                                       in_process):
    """SIGTERM (docker stop, systemd, a scheduler) during epoch 3 of 3: the MLflow run ends KILLED with
    end_reason SIGTERM, not RUNNING. Then last.pt is torn: the resume (in this process: its imports are
    paid for) warns in one line, goes on from previous.pt (epoch 1) and finishes the same run."""
    ck = tmp_path / "ck"
    args = ["train", *TINY, *no_test_split, "--epochs", "3", "--checkpoint-dir", str(ck), "--run-name", "termed"]
    proc = subprocess.Popen([*RESLAB, *args], cwd=tmp_path, env=reslab_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (ck / "previous.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # epoch 2 is checkpointed (epoch 1 kept as previous.pt): epoch 3 is under way
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert f"resume with: reslab train --resume {ck}" in out
    ckpt = torch.load(ck / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2, "the run ended before the signal; the test did not interrupt anything"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run_id = ckpt["meta"]["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["end_reason"] == "SIGTERM"

    raw = (ck / "last.pt").read_bytes()
    (ck / "last.pt").write_bytes(raw[:1000])
    resumed = in_process(["train", "--resume", str(ck), "--device", "cpu", "--no-progress"], tmp_path / "mlruns")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warned = [ln for ln in resumed.stderr.splitlines() if "previous.pt" in ln]
    assert len(warned) == 1 and warned[0].startswith("reslab: warning: ") and "(epoch 1) instead" in warned[0], resumed.stderr
    assert "at epoch 1" in resumed.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1
    assert {m.step for m in client.get_metric_history(run_id, "val_acc")} == {1, 2, 3}


def test_sigterm_ends_a_tune_worker_with_its_trial_and_parent_killed_and_the_study_resumes(tmp_path, in_process):
    """SIGTERM during a trial's training: the Optuna trial is FAIL (not RUNNING), its MLflow run and the
    invocation's parent run are KILLED with end_reason SIGTERM; the next invocation of the study runs."""
    import sqlite3

    db = tmp_path / "study.db"
    args = ["tune", "--subset", "300", "--epochs", "4", "--no-progress", "--study", "s", "--storage", f"sqlite:///{db}",
            "--no-register", "--space", str(tmp_path / "space.yaml")]
    (tmp_path / "space.yaml").write_text("batch_size: 32\n")  # a fixed, small batch: a quick trial
    proc = subprocess.Popen([*RESLAB, *args, "--trials", "2"], cwd=tmp_path, env=reslab_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def started_trials() -> int:  # trials whose MLflow run exists: their training is under way
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as c:
                return c.execute("SELECT COUNT(*) FROM trial_user_attributes WHERE key = 'mlflow_run_id'").fetchone()[0]
        except sqlite3.Error:  # not created yet
            return 0

    def epochs_logged() -> int:  # the trial's epochs whose validation MLflow holds
        try:
            with contextlib.closing(sqlite3.connect(f"file:{tmp_path / 'mlruns' / 'mlflow.db'}?mode=ro", uri=True, timeout=1)) as c:
                return c.execute("SELECT COUNT(*) FROM metrics WHERE key = 'val_acc'").fetchone()[0]
        except sqlite3.Error:  # not created yet
            return 0

    # after the first epoch of 4: inside the trial's training whatever the machine's speed (a fixed 1 s sleep
    # could outlast a whole short trial on a fast one)
    deadline = time.monotonic() + 240
    while not (started_trials() and epochs_logged()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (out[-2000:], err[-3000:])
    assert "terminated (SIGTERM)" in err and "Traceback" not in err and "resume with: reslab tune --study s" in out

    with contextlib.closing(sqlite3.connect(db)) as c:
        states = [s for (s,) in c.execute("SELECT state FROM trials ORDER BY number")]
    assert states[0] == "FAIL" and "RUNNING" not in states and "COMPLETE" not in states, states
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = {r.data.tags["kind"]: r for r in client.search_runs(["1"])}
    assert set(runs) == {"study", "trial"}
    for kind in ("study", "trial"):
        assert runs[kind].info.status == "KILLED" and runs[kind].data.tags["end_reason"] == "SIGTERM", kind

    resumed = in_process([*args, "--trials", "1"], tmp_path / "mlruns")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with contextlib.closing(sqlite3.connect(db)) as c:
        states = [s for (s,) in c.execute("SELECT state FROM trials ORDER BY number")]
    assert states[0] == "FAIL" and "COMPLETE" in states and "RUNNING" not in states, states
    statuses = sorted((r.data.tags["kind"], r.info.status) for r in client.search_runs(["1"]))
    assert statuses == [("study", "FINISHED"), ("study", "KILLED"), ("trial", "FINISHED"), ("trial", "KILLED")]
