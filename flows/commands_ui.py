"""``memoe ui``: the MLflow UI on 127.0.0.1 against the default database (runs/mlflow.db)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def add_arguments(p):
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--runs-dir", default=None, help="folder holding mlflow.db (default: $MEMOE_RUNS or runs/)")
    p.add_argument("--uri", default=None, help="backend store URI (default: sqlite database in the runs folder)")


def command(args) -> list[str]:
    from flows.study import default_runs_dir
    from tasks.tracking import default_uri

    rd = Path(args.runs_dir).resolve() if args.runs_dir else default_runs_dir()
    rd.mkdir(parents=True, exist_ok=True)
    uri = args.uri or default_uri(rd)
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        (rd / "mlartifacts").resolve().as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
        "--workers",
        "1",
    ]


def run(args) -> int:
    """The MLflow server in its own process group, stopped (with its workers) when this command ends:
    Ctrl-C, SIGTERM or an error."""
    import signal

    cmd = command(args)
    env = dict(
        os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true"
    )
    print(
        f"MLflow UI on http://127.0.0.1:{args.port}  ({cmd[cmd.index('--backend-store-uri') + 1]}); Ctrl-C stops it",
        flush=True,
    )
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (flows/cli.py turns it into the same)
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
