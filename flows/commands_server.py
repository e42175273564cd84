"""``memoe server [--dir DIR] [--host 127.0.0.1] ...``: the team server in the foreground.

PostgreSQL (kept in DIR/postgres), a Prefect server and an MLflow tracking server on it, MLflow's
artifacts proxied by its server into DIR/mlartifacts or ``--artifacts s3://bucket/prefix``. Prints
the environment a worker or a ``memoe sweep`` needs, then waits; Ctrl-C stops all three.
"""

from __future__ import annotations

import signal
import time


def add_arguments(p):
    p.add_argument("--dir", default="runs/team", help="folder of the databases, artifacts and logs (default runs/team)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the Prefect and MLflow servers bind to (default 127.0.0.1: this machine only; "
        "0.0.0.0 or the host's address to serve a team)",
    )
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--pg-port", type=int, default=0, help="PostgreSQL port on 127.0.0.1 (default: a free one)")
    p.add_argument(
        "--artifacts",
        default=None,
        help="MLflow artifact store: a folder or s3://bucket/prefix (AWS_* and MLFLOW_S3_ENDPOINT_URL "
        "from the environment; default DIR/mlartifacts)",
    )


def run(args) -> int:
    from flows.team import TeamServer

    srv = TeamServer(
        args.dir,
        host=args.host,
        prefect_port=args.prefect_port,
        mlflow_port=args.mlflow_port,
        pg_port=args.pg_port,
        artifacts=args.artifacts,
    )
    print(f"memoe server: starting PostgreSQL, Prefect and MLflow under {srv.folder} ...", flush=True)
    stop = {"now": False}

    def _stop(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    with srv:
        env = srv.client_env()
        print(
            f"Prefect UI/API: {srv.prefect_api.removesuffix('/api')}   MLflow: {srv.mlflow_uri}   "
            f"PostgreSQL: 127.0.0.1:{srv.pg.port}\n\nOn every worker and for memoe sweep:"
        )
        for k, v in env.items():
            print(f"  export {k}={v}")
        print(
            "  export MEMOE_RUNS=/path/every/worker/mounts   # the shared store (task cache, editor states)\n"
            "\nCtrl-C stops the servers.",
            flush=True,
        )
        try:
            while not stop["now"]:
                time.sleep(1)
                for p in srv.procs:
                    if p.poll() is not None:
                        print(f"error: a server exited (code {p.returncode}); logs in {srv.folder / 'logs'}")
                        return 1
        except KeyboardInterrupt:
            pass
    print("memoe server: stopped")
    return 0
