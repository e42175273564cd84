"""Shutdown and stale records (issue 18, item 7): SIGTERM ends ``memoe run`` promptly with its MLflow
runs KILLED and its temporary Prefect server stopped; a restart after ``kill -9`` marks the nested
runs too; ``memoe ui`` stops its MLflow server on SIGTERM; an interrupted model conversion leaves no
temporary folder."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT
from .test_pipeline import MEMOE, env_for, study_config, tiny_dir  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(900)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait(cond, timeout: float, step: float = 0.05) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


def test_sigterm_ends_a_study_promptly_marks_its_runs_killed_and_stops_the_prefect_server(tmp_path, tiny_dir):
    from mlflow import MlflowClient

    cfg = study_config(tmp_path, tiny_dir, steps=3000, rounds=2, batch=2)
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        MEMOE + ["run", str(cfg), "--out", str(tmp_path / "out")],
        env=env_for(runs, tmp_path / "p"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    results = runs / "store" / "results"
    try:
        # round 0 is training (its inputs are stored, its state is not)
        assert _wait(
            lambda: results.is_dir() and any(f.name.startswith("locality-") for f in results.iterdir()), 600
        ), "the study did not reach training"
        time.sleep(1.0)
        assert proc.poll() is None
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)  # to the main process only, as a worker or Kubernetes does
        out = proc.communicate(timeout=60)[0]
        took = time.time() - t0
        assert _wait(lambda: not _group_alive(proc.pid), 15), (
            "a child (the temporary Prefect server) outlived memoe run"
        )
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert took < 30, f"memoe run took {took:.0f}s to stop after SIGTERM"
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out and "Traceback" not in out, out[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("memoe")
    all_runs = client.search_runs([exp.experiment_id])
    assert all_runs and {r.info.status for r in all_runs} == {"KILLED"}, [
        (r.info.run_name, r.info.status) for r in all_runs
    ]


def test_restart_after_kill_9_marks_the_nested_runs_killed_too(tmp_path):
    from flows.study import _mark_stale_runs
    from tasks.tracking import Tracker, default_uri

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tr = Tracker(default_uri(tmp_path), "memoe", tmp_path)
    parent = tr.start(
        "sequential-x", {"memoe.config_hash": "abc", "memoe.host": socket.gethostname(), "memoe.pid": str(dead.pid)}
    )
    method = tr.start("memoe", {}, parent=parent)
    round_run = tr.start("round-0", {"memoe.round": "0"}, parent=method)
    other = tr.start(
        "sequential-y", {"memoe.config_hash": "other", "memoe.host": socket.gethostname(), "memoe.pid": str(dead.pid)}
    )
    _mark_stale_runs(None, tr, "abc")
    status = {r: tr.client.get_run(r).info.status for r in (parent, method, round_run, other)}
    assert status == {parent: "KILLED", method: "KILLED", round_run: "KILLED", other: "RUNNING"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(d.name))
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_ui_stops_its_mlflow_server_on_sigterm(tmp_path):
    port = _free_port()
    env = env_for(tmp_path / "runs", tmp_path / "p")
    proc = subprocess.Popen(
        MEMOE + ["ui", "--port", str(port), "--runs-dir", str(tmp_path / "runs")],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    servers: list[int] = []
    try:
        assert _wait(listening, 120, 0.2), "the MLflow server did not start"
        servers = _children(proc.pid)
        assert servers
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert _wait(lambda: not listening(), 15), "the MLflow server still listens after memoe ui ended"
        assert _wait(lambda: not any(_pid_alive(p) for p in servers), 15)
    finally:
        for p in servers:
            if _pid_alive(p):
                os.killpg(p, signal.SIGKILL) if os.getpgid(p) == p else os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
