"""Throw-away servers for the scale-out tests: a PostgreSQL cluster and an MLflow tracking server.

The cluster is created with Debian's ``initdb``/``pg_ctl`` on a free loopback port in a fresh
folder and removed afterwards. PostgreSQL refuses to run as root, so under root the binaries run
as the ``postgres`` user (``runuser``) on a folder that user owns.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from conftest import free_port, wait_for_server

from train.tracking import server_environment

PG_USER = "postgres"  # the unix account the server runs as when the tests run as root


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class Postgres:
    port: int
    folder: Path

    def url(self, database: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver), as Optuna and MLflow take it."""
        return f"postgresql+psycopg://reslab@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=reslab dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def postgres_cluster() -> Iterator[Postgres]:
    """initdb + pg_ctl start on 127.0.0.1:<free port>; stop and delete everything on exit."""
    bindir = pg_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql")
    folder = Path(tempfile.mkdtemp(prefix="reslab-pg-"))  # under /tmp: the postgres user must reach it
    data, log = folder / "data", folder / "server.log"
    if os.geteuid() == 0:
        shutil.chown(folder, PG_USER, PG_USER)
    port = free_port()
    run = lambda *cmd: subprocess.run(_as_owner(list(cmd)), check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "reslab", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "60", "start")
        yield Postgres(port, folder)
    except subprocess.CalledProcessError as e:
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"{e.cmd[-1] if e.cmd else 'postgres'} failed: {e.stderr}\n{tail}") from e
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                           capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class MlflowServer:
    uri: str
    artifacts: Path
    process: subprocess.Popen


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, log: Path) -> Iterator[MlflowServer]:
    """``mlflow server`` on a free loopback port, backed by ``backend_uri``, serving artifacts
    from the local folder ``artifacts`` (clients upload through the server)."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
           "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=server_environment())
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(uri + "/health", proc, 120, log.read_text)
        yield MlflowServer(uri, artifacts, proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=3)  # a throw-away server: no need for uvicorn's graceful drain
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
