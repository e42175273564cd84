"""The team server: PostgreSQL, a Prefect server on it and an MLflow tracking server on it with a
proxied artifact store (a folder, or S3), started together and stopped together.

``TeamServer(folder).start()`` (also ``memoe server``) keeps everything under ``folder``:
``postgres/`` (the database cluster, kept between starts; its password in ``postgres.pw``),
``prefect-home/``, ``mlartifacts/`` (when the artifacts go to a folder) and ``logs/``. Every server
binds to ``host`` (127.0.0.1 unless told otherwise). PostgreSQL refuses to run as root, so as
root it runs as the ``postgres`` user (``runuser``); when its binaries are missing and this is a
Debian machine run as root, ``ensure_postgres`` installs Debian's ``postgresql`` package.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


class ServerError(RuntimeError):
    """A service could not be started; the message names it and ends with its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pg_bin() -> Path | None:
    """The folder of PostgreSQL's server binaries (Debian keeps them out of PATH)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True):
        if Path(d, "pg_ctl").exists():
            return Path(d)
    return None


def ensure_postgres() -> Path:
    """PostgreSQL's binaries, installing Debian's ``postgresql`` package when they are missing
    (as root, with apt-get); anything else that lacks them is an error saying what to install."""
    b = pg_bin()
    if b:
        return b
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"],
        ):
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                raise ServerError(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        b = pg_bin()
        if b:
            return b
    raise ServerError(
        "PostgreSQL is not installed (no pg_ctl): install Debian's 'postgresql' package "
        "(apt-get install postgresql) or put pg_ctl on PATH"
    )


def _wait_http(url: str, proc: subprocess.Popen, log: Path, name: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise ServerError(f"{name} exited with code {proc.returncode}:\n{_tail(log)}")
        if time.time() > deadline:
            raise ServerError(f"{name} did not answer {url} within {timeout:.0f} s:\n{_tail(log)}")
        time.sleep(0.5)


def _tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGINT, wait: float = 30) -> None:
    """Stop a process started in its own session (and its children): ``sig``, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


@dataclass
class Postgres:
    """One PostgreSQL cluster in ``data`` on ``host:port``; user ``memoe`` with a password."""

    data: Path
    port: int
    host: str = "127.0.0.1"
    user: str = "memoe"
    password: str = ""
    started: bool = False

    def _as_owner(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, args: list[str], what: str) -> subprocess.CompletedProcess:
        p = subprocess.run(self._as_owner() + args, capture_output=True, text=True, cwd="/")
        if p.returncode != 0:
            raise ServerError(f"PostgreSQL {what} failed ({' '.join(args[:2])}):\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        return p

    def start(self) -> "Postgres":
        b = ensure_postgres()
        self.data.parent.mkdir(parents=True, exist_ok=True)
        pw = self.data.parent / "postgres.pw"
        if not pw.exists():
            pw.write_text(secrets.token_hex(16))
        pw.chmod(0o600)
        self.password = pw.read_text().strip()
        if not (self.data / "PG_VERSION").exists():
            self.data.mkdir(parents=True, exist_ok=True)
            self.data.chmod(0o700)
            pwfile = self.data.parent / ".pw-init"
            pwfile.write_text(self.password)
            if os.geteuid() == 0:
                import pwd

                owner = pwd.getpwnam("postgres")
                os.chown(self.data, owner.pw_uid, owner.pw_gid)
                os.chown(pwfile, owner.pw_uid, owner.pw_gid)
            pwfile.chmod(0o600)
            try:
                self._run(
                    [
                        str(b / "initdb"),
                        "-D",
                        str(self.data),
                        "-U",
                        self.user,
                        "--pwfile",
                        str(pwfile),
                        "--auth-local=scram-sha-256",
                        "--auth-host=scram-sha-256",
                        "-E",
                        "UTF8",
                    ],
                    "initdb",
                )
            finally:
                pwfile.unlink(missing_ok=True)
        log = self.data.parent / "postgres.log"
        if os.geteuid() == 0:
            import pwd

            owner = pwd.getpwnam("postgres")
            log.touch()
            os.chown(log, owner.pw_uid, owner.pw_gid)
        # sockets in the data folder (not /var/run/postgresql, which may not exist); TCP on host only
        opts = f"-p {self.port} -h {self.host} -k {self.data}"
        self._run(
            [str(b / "pg_ctl"), "-D", str(self.data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start"],
            f"start (log {log}: {_tail(log, 1500)})",
        )
        self.started = True
        for db in ("prefect", "mlflow"):
            self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{db}'", create=db)
        return self

    def _psql(self, query: str, create: str | None = None) -> None:
        env = dict(os.environ, PGPASSWORD=self.password)
        b = pg_bin()
        args = [
            str(b / "psql"),
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-U",
            self.user,
            "-d",
            "postgres",
            "-tAc",
            query,
        ]
        p = subprocess.run(args, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise ServerError(f"PostgreSQL query failed: {p.stderr[-2000:]}")
        if create and p.stdout.strip() != "1":
            p = subprocess.run(args[:-1] + [f'CREATE DATABASE "{create}"'], env=env, capture_output=True, text=True)
            if p.returncode != 0:
                raise ServerError(f"PostgreSQL: could not create database {create}: {p.stderr[-2000:]}")

    def url(self, db: str, driver: str = "") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}:{self.password}@{self.host}:{self.port}/{db}"

    def stop(self) -> None:
        if self.started:
            b = pg_bin()
            subprocess.run(
                self._as_owner() + [str(b / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                capture_output=True,
                cwd="/",
            )
            self.started = False


@dataclass
class TeamServer:
    """PostgreSQL + Prefect server + MLflow server under ``folder``, bound to ``host``.

    ``artifacts``: where MLflow keeps artifacts, proxied by its server (clients only need the
    tracking URI): a folder (default ``folder/mlartifacts``) or ``s3://bucket/prefix`` (credentials
    and ``MLFLOW_S3_ENDPOINT_URL`` from the environment or ``artifacts_env``)."""

    folder: Path
    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    pg_port: int = 0
    artifacts: str | None = None
    artifacts_env: dict[str, str] = field(default_factory=dict)
    prefect_ui: bool = True
    procs: list[subprocess.Popen] = field(default_factory=list)
    pg: Postgres | None = None

    @property
    def prefect_api(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    def client_env(self) -> dict[str, str]:
        """What a worker or a ``memoe sweep`` needs to use this server."""
        return {"PREFECT_API_URL": self.prefect_api, "MLFLOW_TRACKING_URI": self.mlflow_uri}

    def start(self, timeout: float = 180) -> "TeamServer":
        self.folder = Path(self.folder).resolve()
        logs = self.folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        try:
            self.pg = Postgres(self.folder / "postgres", self.pg_port or free_port("127.0.0.1"), "127.0.0.1").start()
            base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
            base |= {
                "DO_NOT_TRACK": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "MLFLOW_ENABLE_TELEMETRY": "false",
            }
            penv = base | {
                "PREFECT_HOME": str(self.folder / "prefect-home"),
                "PREFECT_API_DATABASE_CONNECTION_URL": self.pg.url("prefect", "asyncpg"),
                "PREFECT_UI_ENABLED": "true" if self.prefect_ui else "false",
                "PREFECT_UI_API_URL": self.prefect_api,
            }
            prefect = self._spawn(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "server",
                    "start",
                    "--host",
                    self.host,
                    "--port",
                    str(self.prefect_port),
                ],
                penv,
                logs / "prefect.log",
            )
            dest = self.artifacts or str(self.folder / "mlartifacts")
            if "://" not in dest:
                Path(dest).mkdir(parents=True, exist_ok=True)
            menv = base | self.artifacts_env
            mlflow = self._spawn(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "server",
                    "--host",
                    self.host,
                    "--port",
                    str(self.mlflow_port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    self.pg.url("mlflow", "psycopg2"),
                    "--artifacts-destination",
                    dest,
                    "--serve-artifacts",
                ],
                menv,
                logs / "mlflow.log",
            )
            _wait_http(f"{self.prefect_api}/health", prefect, logs / "prefect.log", "the Prefect server", timeout)
            _wait_http(f"{self.mlflow_uri}/health", mlflow, logs / "mlflow.log", "the MLflow server", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        p = subprocess.Popen(
            cmd, env=env, cwd=self.folder, start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT
        )
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop_process(p, signal.SIGTERM)
        self.procs.clear()
        if self.pg:
            self.pg.stop()

    def __enter__(self) -> "TeamServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
