"""prefect.yaml end to end: a local Prefect server on 127.0.0.1 (free port, isolated PREFECT_HOME),
the process work pool, ``prefect deploy --all``, a worker, and a run of the quickstart deployment
on a tiny model with few edits; the flow run must be COMPLETED and its metrics in MLflow.
Everything started here is stopped here (the worker with SIGINT, as Prefect workers expect).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from .conftest import ROOT, tiny_model

pytestmark = pytest.mark.timeout(600)
PREFECT = [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _stop(proc: subprocess.Popen, sig=signal.SIGINT, wait: float = 30) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_quickstart_deployment_runs_on_a_process_worker(tmp_path, tokenizer):
    from mlflow import MlflowClient

    model = tmp_path / "tiny-llama"
    tiny_model("llama", len(tokenizer)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(
        os.environ,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=api,
        PWD=str(ROOT),
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        MLFLOW_ENABLE_TELEMETRY="false",
        OMP_NUM_THREADS="1",
        MEMOE_RUNS=str(tmp_path / "runs"),
    )
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    logs = tmp_path / "logs"
    logs.mkdir()
    started: list[subprocess.Popen] = []
    try:
        server = subprocess.Popen(
            PREFECT + ["server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env,
            cwd=tmp_path,
            start_new_session=True,
            stdout=open(logs / "server.log", "w"),
            stderr=subprocess.STDOUT,
        )
        started.append(server)
        deadline = time.time() + 120
        while True:
            try:
                _get(f"{api}/health")
                break
            except OSError:
                assert server.poll() is None, (logs / "server.log").read_text()[-3000:]
                assert time.time() < deadline, "the Prefect server did not come up"
                time.sleep(0.5)

        def cli(*args: str) -> str:
            p = subprocess.run(PREFECT + list(args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
            return p.stdout

        cli("work-pool", "create", "memoe-process", "--type", "process")
        cli("--no-prompt", "deploy", "--name", "quickstart", "--name", "nightly")  # gpu: a Kubernetes pool
        nightly = _get(f"{api}/deployments/name/memoe-study/nightly")
        assert [s["schedule"].get("cron") for s in nightly["schedules"]] == ["0 2 * * *"]
        assert [s["active"] for s in nightly["schedules"]] == [False]  # deploying arms nothing
        # the README's way to turn it on
        cli("deployment", "schedule", "resume", "memoe-study/nightly", nightly["schedules"][0]["id"])
        assert [s["active"] for s in _get(f"{api}/deployments/name/memoe-study/nightly")["schedules"]] == [True]
        assert nightly["work_pool_name"] == "memoe-process"

        out = tmp_path / "out"
        params = {
            "overrides": [
                f"model.name={model}",
                "method.layers=[2]",
                "method.steps=5",
                "data.n_edits=4",
                "protocol.rounds=2",
                "protocol.batch_size=2",
                "eval.max_new_tokens=4",
                "threads=1",
            ],
            "out": str(out),
            "runs_dir": str(tmp_path / "runs"),
        }
        text = cli("deployment", "run", "memoe-study/quickstart", "--params", json.dumps(params))
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", text).group(1)

        worker = subprocess.Popen(
            PREFECT + ["worker", "start", "--pool", "memoe-process", "--limit", "1"],
            env=env,
            cwd=ROOT,
            start_new_session=True,
            stdout=open(logs / "worker.log", "w"),
            stderr=subprocess.STDOUT,
        )
        started.append(worker)
        deadline = time.time() + 300
        while True:
            state = _get(f"{api}/flow_runs/{run_id}")["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert time.time() < deadline and worker.poll() is None, (logs / "worker.log").read_text()[-4000:]
            time.sleep(1)
        assert state == "COMPLETED", (logs / "worker.log").read_text()[-4000:]
    finally:
        for p in reversed(started):  # the worker first (SIGINT), then the server
            _stop(p)
    assert all(p.poll() is not None for p in started)

    results = json.loads((out / "results.json").read_text())
    assert [r["edits_so_far"] for r in results["rounds"]] == [2, 4]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("memoe")
    runs = client.search_runs([exp.experiment_id], f"tags.`prefect.root_flow_run_id` = '{run_id}'")
    assert len(runs) == 1 and runs[0].info.run_id == results["mlflow"]["run_id"]
    parent = runs[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["final.reliability"] == pytest.approx(results["final"]["reliability"])
    assert parent.data.params["protocol.mode"] == "sequential" and parent.data.params["data.n_edits"] == "4"
    rounds = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(rounds) == 2
