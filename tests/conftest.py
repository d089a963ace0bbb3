"""Shared fixtures: the real datasets from ../shared/datasets and throw-away MLflow stores."""

from __future__ import annotations

import contextlib
import os
import socket
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import mlflow
import pytest

# Under pytest-xdist (`make test` runs two workers on a 2-core machine) each worker and the processes its
# tests start train on one thread: two workers of two OpenMP threads each would spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["demo_fixtures"]  # the demo's store and server, one definition for every module

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("RESLAB_DATA", ROOT.parent / "shared" / "datasets"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The longest modules first, so that with `pytest -n 2 --dist loadfile --no-loadscope-reorder` (`make test`)
# neither worker is left with one of them at the end while the other idles (pytest-xdist's default order is by
# number of tests, which ignores this). Seconds of one worker in the parallel pass on the AVX2-only 2-core CPU,
# 2026-12-06 (test_demo.py with test_demo_security.py, which runs beside it: SAME_WORKER below; test_compiled.py
# with a cold Inductor cache, as in CI).
LONGEST_FIRST = {"test_demo.py": 220, "test_scaleout.py": 180, "test_train.py": 160, "test_compiled.py": 150,
                 "test_outages.py": 108, "test_faults.py": 66, "test_tune_paths.py": 65}
# Modules that use the same expensive session fixture run on one worker, so what it builds (the demo's
# store, tests/demo_fixtures.py: two models trained and registered) is built once, not once per worker.
SAME_WORKER = {"test_demo_security.py": "test_demo.py"}


def _unit(path: Path) -> str:
    """The module whose worker runs the tests of ``path``."""
    return SAME_WORKER.get(path.name, path.name)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: -LONGEST_FIRST.get(_unit(item.path), 0))  # stable: order within a module kept


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: absent under `-p no:xdist` (the serial pass)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadfile`, with the modules of SAME_WORKER handed out together with their host module."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModulesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = Path(super()._split_scope(nodeid))
            return str(path.with_name(_unit(path)))

    return ModulesTogether(config, log)


def missing(what: str) -> NoReturn:
    """Skip a test whose real component is missing here, but fail it under CI, which has ../shared (data,
    published weights) beside the clone and installs PostgreSQL (make system-deps): there a missing piece
    is a broken run, not a reason to pass with the test unrun."""
    if os.environ.get("CI", "").lower() in ("true", "1"):  # as the Makefile reads it
        pytest.fail(f"{what} (CI=true)")
    pytest.skip(what)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "cifar10.zip").exists():
        missing(f"real datasets not found in {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="session")
def cifar(data_dir):
    from train.data import load_dataset

    return load_dataset("cifar10", data_dir, progress=False)


@pytest.fixture(scope="session")
def fer(data_dir):
    from train.data import load_dataset

    return load_dataset("fer2013", data_dir, progress=False)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A fresh embedded MLflow store (SQLite + artifacts) in a temp folder, used as the default."""
    from train.tracking import setup_tracking

    mlruns = tmp_path / "mlruns"
    uri = f"sqlite:///{mlruns / 'mlflow.db'}"
    monkeypatch.setenv("RESLAB_MLRUNS", str(mlruns))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    setup_tracking(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@contextlib.contextmanager
def module_store(folder: Path, **env: str) -> Iterator[Path]:
    """A throw-away embedded MLflow store in ``folder`` (also the working directory) for a whole test
    module, which ``monkeypatch`` (function-scoped) cannot provide; ``env`` sets more variables."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RESLAB_MLRUNS", str(folder / "mlruns"))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    for key, value in env.items():
        mp.setenv(key, value)
    mp.chdir(folder)
    try:
        yield folder
    finally:
        while mlflow.active_run():
            mlflow.end_run()
        mp.undo()


@pytest.fixture
def in_process(tmp_path, monkeypatch, capsys):
    """Run ``reslab`` in this process (imports already paid for); returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = mlflow.get_tracking_uri()

    def run(args: list[str], mlruns: Path) -> subprocess.CompletedProcess:
        from train.cli import main

        monkeypatch.setenv("RESLAB_MLRUNS", str(mlruns))
        capsys.readouterr()
        try:
            main(args)
            code = 0
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}  # reslab installs its own
    yield run
    mlflow.set_tracking_uri(previous)
    for s, h in handlers.items():
        signal.signal(s, h)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop a server the test started: SIGTERM, then SIGKILL if it does not exit in ``timeout`` s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def process_tree(pid: int) -> list[str]:
    """The command lines of ``pid`` and all its descendants (from /proc), to see what a server started."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            out.append((Path("/proc") / str(p) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
        todo.extend(children.get(p, []))
    return out


def wait_for_server(url: str, proc: subprocess.Popen, timeout: float, output: Callable[[], str]) -> None:
    """Poll ``url`` until it answers 2xx; if ``proc`` exits or ``timeout`` seconds pass first, raise
    with the end of the server's ``output``."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2):  # HTTPError is an OSError
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {proc.returncode}" if proc.poll() is not None else f"no answer in {timeout:.0f} s"
            raise RuntimeError(f"{url} did not come up ({state}):\n{output()[-3000:]}")
        time.sleep(0.3)
