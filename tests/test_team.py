"""Studies beyond one machine: sweep grids, the team server (PostgreSQL + Prefect + MLflow with S3
artifacts on moto), a sweep on a process work pool with two workers, crash marking through
Prefect's hooks, the compare flow's methods on Dask, and the Kubernetes GPU job template.
Everything started here binds to 127.0.0.1 and is stopped here."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from memoe.config import ConfigError

from .conftest import ROOT, tiny_model

PREFECT = [sys.executable, "-m", "prefect"]


# ----------------------------------------------------------------------------------- grids (fast)


def test_grid_file_and_comma_lists_expand_into_cells(tmp_path):
    from memoe.grid import load_sweep, split_values

    assert split_values("memoe,lora") == ["memoe", "lora"]
    assert split_values("[2,3]") == ["[2,3]"]
    assert split_values("[2],[3, 4]") == ["[2]", "[3, 4]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    f = tmp_path / "grid.yaml"
    f.write_text(
        "base: configs/quickstart.yaml\nset: [data.n_edits=4]\n"
        "grid:\n  method.layers: [[2], [3]]\n  data.seed: [0, 1, 2]\n"
    )
    sw = load_sweep(f, ["eval.generation=false", "method.steps=3,5"])
    cells = sw.cells()
    assert len(cells) == 2 * 3 * 2
    assert cells[0].overrides == (
        "data.n_edits=4",
        "eval.generation=false",
        "method.layers=[2]",
        "data.seed=0",
        "method.steps=3",
    )
    assert cells[-1].label == "method.layers=[3],data.seed=2,method.steps=5"
    assert load_sweep(f, ["eval.generation=false", "method.steps=3,5"]).sweep_id() == sw.sweep_id()
    assert load_sweep(f, ["method.steps=3,6"]).sweep_id() != sw.sweep_id()
    # a plain config file: its grid comes from --set only
    plain = load_sweep(ROOT / "configs" / "quickstart.yaml", ["method.name=memoe,lora", "data.seed=0,1,2"])
    assert len(plain.cells()) == 6 and plain.base.endswith("quickstart.yaml")
    for bad, sets, msg in [
        ("grid:\n  data.seed: 3\n", [], "grid.data.seed: a list"),
        ("grid: {data.seed: [0, 0]}\n", [], "repeats a value"),
        ("grid: {data.seed: [0]}\nextra: 1\n", [], "unknown key"),
        ("grid: {data.seed: [0, 1]}\n", ["data.seed=2,3"], "swept twice"),
        ("grid: {data.seed: [0, 1]}\n", ["method.layers=[2"], "unbalanced"),
    ]:
        f.write_text(bad)
        with pytest.raises(ConfigError, match=msg):
            load_sweep(f, sets)


def test_sweep_rejects_a_bad_cell_before_anything_runs(tmp_path):
    from flows.commands_run import preflight
    from flows.sweep import check_cells
    from memoe.grid import load_sweep

    sw = load_sweep(None, ["data.n_edits=4", "protocol.batch_size=2", "protocol.rounds=2", "method.rank=4,0"])
    with pytest.raises(ConfigError, match=r"(?s)sweep cell 2 \(method.rank=0\).*rank"):
        check_cells(sw, preflight)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "sweep",
            "--set",
            "data.n_edits=4",
            "--set",
            "protocol.batch_size=2",
            "--set",
            "protocol.rounds=2",
            "--set",
            "data.format=csv,jsonl",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "error: sweep cell 1 (data.format=csv)" in p.stderr, p.stderr[-2000:]


# ------------------------------------------------------------------------- Kubernetes (fast)


def test_kubernetes_job_template_renders_a_gpu_pod_with_the_shared_store():
    from prefect.client.schemas.objects import FlowRun

    from flows.k8s import deployment_job_variables, gpu_job_template, load_template, render_job

    assert load_template() == json.loads(json.dumps(gpu_job_template())), (
        "docker/k8s-gpu-job-template.json is stale: python -m flows.k8s --write"
    )
    jv = deployment_job_variables("gpu")
    assert jv["image"] == "{{ $MEMOE_IMAGE }}"  # filled by `prefect deploy` from the environment
    jv["image"] = "registry.example/memoe-gpu:1"
    jv["env"] = dict(jv["env"], MLFLOW_TRACKING_URI="http://mlflow.team:5000")
    fr = FlowRun(id=uuid.uuid4(), name="cell-0", flow_id=uuid.uuid4())
    job = render_job(load_template(), jv, flow_run=fr)
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "registry.example/memoe-gpu:1"
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert c["resources"]["requests"]["cpu"] == "4" and c["resources"]["limits"]["memory"] == "32Gi"
    assert c["volumeMounts"] == [{"name": "memoe-store", "mountPath": "/mnt/memoe"}]
    assert pod["volumes"] == [{"name": "memoe-store", "persistentVolumeClaim": {"claimName": "memoe-store"}}]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MEMOE_RUNS"] == "/mnt/memoe/runs" and env["MLFLOW_TRACKING_URI"] == "http://mlflow.team:5000"
    assert env["PREFECT__FLOW_RUN_ID"] == str(fr.id)
    assert c["args"][:3] == ["prefect", "flow-run", "execute"]
    # two GPUs and another claim through the job variables
    pod2 = render_job(load_template(), jv | {"gpus": 2, "store_claim": "lab-nfs"}, flow_run=fr)["spec"]["template"][
        "spec"
    ]
    assert int(pod2["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 2
    assert pod2["volumes"][0]["persistentVolumeClaim"]["claimName"] == "lab-nfs"
    with pytest.raises(ValueError, match="gpu_count"):
        render_job(load_template(), {"gpu_count": 1})
    assert (ROOT / "docker" / "Dockerfile").read_text().count("torch==2.13.0") == 1


# ------------------------------------------------------------------------ helpers of the slow tests


def _tiny(tmp_path, tokenizer) -> Path:
    model = tmp_path / "tiny-llama"
    tiny_model("llama", len(tokenizer)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    return model


def _study_overrides(model: Path) -> list[str]:
    return [
        f"model.name={model}",
        "method.layers=[2]",
        "method.steps=5",
        "data.n_edits=4",
        "data.sample=random",
        "protocol.mode=sequential",
        "protocol.rounds=2",
        "protocol.batch_size=2",
        "eval.max_new_tokens=4",
        "threads=1",
    ]


def _env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    return (
        env
        | {
            "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "MLFLOW_ENABLE_TELEMETRY": "false",
            "OMP_NUM_THREADS": "1",
            "PWD": str(ROOT),
        }
        | extra
    )


# ------------------------------------------------------------------------- local sweep (slow)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_sweep_reports_a_failed_cell_and_runs_the_others(tmp_path, tokenizer):
    from mlflow import MlflowClient

    model = _tiny(tmp_path, tokenizer)
    args = [
        sys.executable,
        "-m",
        "flows.cli",
        "sweep",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path / "sweep.json"),
    ]
    for o in _study_overrides(model):
        args += ["--set", o]
    # a model folder whose config and tokenizer pass every check made before the run, but whose weights are
    # damaged: cell 1 fails when its study loads them, cell 2 (the intact model) runs
    broken = tmp_path / "broken-llama"
    shutil.copytree(model, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    args += ["--set", f"model.name={broken},{model}"]
    p = subprocess.run(args, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=500)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((tmp_path / "sweep.json").read_text())
    assert [c["state"] for c in s["cells"]] == ["FAILED", "COMPLETED"]
    assert s["cells"][0]["error"]
    assert f"failed: cell 1 [model.name={broken}]" in p.stderr
    assert f"cell 2/2 [model.name={model}] COMPLETED" in p.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("memoe")
    sweep_run = client.get_run(s["mlflow"]["run_id"])
    assert sweep_run.info.status == "FAILED" and sweep_run.data.tags["memoe.sweep"] == s["sweep"]
    cells = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{sweep_run.info.run_id}'")
    assert sorted(r.info.status for r in cells) == ["FAILED", "FINISHED"]
    ok = next(r for r in cells if r.info.status == "FINISHED")
    assert ok.info.run_id == s["cells"][1]["mlflow_run_id"] and "final.reliability" in ok.data.metrics
    # MEMoE's step losses reached MLflow: 5 steps a round, round 2 at steps 6-10
    steps = [m.step for m in client.get_metric_history(ok.info.run_id, "train.step_loss")]
    assert len(steps) >= 2 and max(steps) > 5


# -------------------------------------------------------------------------- Dask (slow)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compare_methods_run_side_by_side_on_a_two_worker_dask_cluster(tmp_path, tokenizer):
    """Each method of the comparison is one task on its own Dask worker process; the figures are
    those of the same comparison run one method after the other."""
    model = _tiny(tmp_path, tokenizer)
    script = tmp_path / "dask_compare.py"
    script.write_text(
        "import json, sys\n"
        "from flows.commands_run import start_local_prefect\n"
        "from flows.study import flow_for\n"
        "from memoe.config import load_config\n"
        "if __name__ == '__main__':\n"
        "    cfg = load_config(None, json.loads(sys.argv[1]))\n"
        "    start_local_prefect()\n"
        "    out = {}\n"
        "    for name, dask in (('serial', None), ('dask', '2')):\n"
        "        r = flow_for(cfg, dask)(cfg.to_dict(), sys.argv[2] + '/' + name, sys.argv[2] + '/runs-' + name)\n"
        "        out[name] = {k: {'worker': m['worker'], 'final': m['final']} for k, m in r['methods'].items()}\n"
        "    print('RESULT ' + json.dumps(out))\n"
    )
    ov = [o for o in _study_overrides(model) if not o.startswith("method.")] + [
        "methods=[{name: memoe, layers: [2], steps: 5}, {name: ft-m, layer: 2, steps: 5}]"
    ]
    p = subprocess.run(
        [sys.executable, str(script), json.dumps(ov), str(tmp_path)],
        cwd=ROOT,
        env=_env(tmp_path, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=560,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads(p.stdout.split("RESULT ", 1)[1])
    workers = {k: m["worker"] for k, m in out["dask"].items()}
    assert sorted(workers) == ["ft-m", "memoe"]
    assert all(w.startswith("dask:") for w in workers.values()) and len(set(workers.values())) == 2, workers
    for k in workers:
        for metric in ("reliability", "generality", "locality"):
            assert out["dask"][k]["final"][metric] == pytest.approx(out["serial"][k]["final"][metric], abs=1e-6)


# ------------------------------------------------------------- team server + work pool (slow)


def _wait(cond, what: str, timeout: float, every: float = 1.0, logs: list[Path] = ()):
    deadline = time.time() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.time() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in logs if p.exists())
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(every)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sweep_on_the_team_server_with_two_workers_and_s3_artifacts(tmp_path, tokenizer):
    """PostgreSQL, Prefect and MLflow (artifacts on moto's S3) from ``flows.team``; a process pool
    with two workers sharing one store; a 2 x 2 sweep through them, then again from cache; a cell
    killed with SIGKILL is marked KILLED in MLflow by the flow's on_crashed hook."""
    import urllib.request

    import boto3
    from mlflow import MlflowClient

    from flows.team import TeamServer, free_port, stop_process

    model = _tiny(tmp_path, tokenizer)
    shared = tmp_path / "shared-store"  # the MEMOE_RUNS every worker mounts
    logs = tmp_path / "logs"
    logs.mkdir()
    # PostgreSQL runs as the postgres user: its folder must not be under pytest's root-only tmp
    team_dir = Path(tempfile.mkdtemp(prefix="memoe-team-", dir="/tmp"))
    team_dir.chmod(0o755)
    s3 = f"http://127.0.0.1:{free_port()}"
    creds = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": s3,
    }
    srv = TeamServer(
        team_dir,
        prefect_port=free_port(),
        mlflow_port=free_port(),
        artifacts="s3://memoe-artifacts/mlflow",
        artifacts_env=creds,
        prefect_ui=False,
    )
    started: list[subprocess.Popen] = []

    def spawn(name, cmd, env):
        p = subprocess.Popen(
            cmd,
            env=env,
            cwd=ROOT,
            start_new_session=True,
            stdout=open(logs / f"{name}.log", "w"),
            stderr=subprocess.STDOUT,
        )
        started.append(p)
        return p

    try:
        spawn(
            "moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", s3.rsplit(":", 1)[1]], _env(tmp_path)
        )
        s3c = boto3.client(
            "s3", endpoint_url=s3, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        )

        def moto_up():
            try:
                return s3c.create_bucket(Bucket="memoe-artifacts") is not None
            except Exception:  # noqa: BLE001 - not up yet
                return False

        _wait(moto_up, "moto's S3", 120, 0.5, [logs / "moto.log"])
        srv.start(timeout=300)
        assert srv.host == "127.0.0.1" and srv.pg.host == "127.0.0.1"
        env = _env(tmp_path, **srv.client_env(), MEMOE_RUNS=str(shared))

        def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
            p = subprocess.run(list(args), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            assert p.returncode == 0, f"{args}\n{p.stdout[-3000:]}{p.stderr[-3000:]}"
            return p

        cli(*PREFECT, "work-pool", "create", "memoe-process", "--type", "process")
        cli(*PREFECT, "--no-prompt", "deploy", "--name", "quickstart")
        for i in range(2):
            spawn(
                f"worker{i}",
                PREFECT + ["worker", "start", "--pool", "memoe-process", "--limit", "1", "--name", f"worker-{i}"],
                env,
            )
        sweep = [sys.executable, "-m", "flows.cli", "sweep", "--pool", "memoe-process"]
        for o in _study_overrides(model):
            sweep += ["--set", o]
        sweep += ["--set", "method.rank=4,8", "--set", "data.seed=0,1"]
        t0 = time.perf_counter()
        first = cli(*sweep, "--out", str(tmp_path / "sweep1.json"), timeout=700)
        first_s = time.perf_counter() - t0
        s1 = json.loads((tmp_path / "sweep1.json").read_text())
        assert [c["state"] for c in s1["cells"]] == ["COMPLETED"] * 4, first.stdout[-3000:]
        assert "prefect: http://127.0.0.1:" in first.stdout and "/runs/flow-run/" in first.stdout
        assert f"mlflow:  {srv.mlflow_uri}/#/experiments/" in first.stdout

        client = MlflowClient(tracking_uri=srv.mlflow_uri)
        exp = client.get_experiment_by_name("memoe")
        sweep_run = client.get_run(s1["mlflow"]["run_id"])
        assert sweep_run.info.status == "FINISHED" and sweep_run.data.tags["memoe.sweep"] == s1["sweep"]
        assert "sweep.json" in [a.path for a in client.list_artifacts(sweep_run.info.run_id)]
        cells = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{sweep_run.info.run_id}'")
        assert len(cells) == 4 and {r.info.status for r in cells} == {"FINISHED"}
        assert sorted(r.info.run_id for r in cells) == sorted(c["mlflow_run_id"] for c in s1["cells"])
        assert {r.data.tags["memoe.sweep"] for r in cells} == {s1["sweep"]}
        assert sorted(r.data.params["method.rank"] + "/" + r.data.params["data.seed"] for r in cells) == [
            "4/0",
            "4/1",
            "8/0",
            "8/1",
        ]
        for r in cells:
            assert 0.0 <= r.data.metrics["final.reliability"] <= 1.0
            assert {"results.json", "config.yaml", "per_edit.parquet"} <= {
                a.path for a in client.list_artifacts(r.info.run_id)
            }
            assert len(client.get_metric_history(r.info.run_id, "train.step_loss")) >= 2
        # the artifacts went through MLflow's proxy into the S3 bucket
        keys = [o["Key"] for o in s3c.list_objects_v2(Bucket="memoe-artifacts", Prefix="mlflow/").get("Contents", [])]
        assert sum(k.endswith("/results.json") for k in keys) >= 4, keys[:20]
        # two workers: at least two cells ran at the same time
        spans = sorted((r.info.start_time, r.info.end_time) for r in cells)
        assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans
        # progress artifacts of the worker runs reached Prefect
        req = urllib.request.Request(
            f"{srv.prefect_api}/artifacts/filter",
            method="POST",
            data=json.dumps({"artifacts": {"type": {"any_": ["progress"]}}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            arts = json.loads(resp.read())
        assert any(a["data"] == 100.0 for a in arts), arts[:3]

        # a rerun of the sweep computes nothing: every task of every cell is a cache hit
        t0 = time.perf_counter()
        cli(*sweep, "--out", str(tmp_path / "sweep2.json"), timeout=600)
        rerun_s = time.perf_counter() - t0
        s2 = json.loads((tmp_path / "sweep2.json").read_text())
        assert s2["sweep"] == s1["sweep"] and s2["mlflow"]["run_id"] != s1["mlflow"]["run_id"]
        assert [c["state"] for c in s2["cells"]] == ["COMPLETED"] * 4
        assert all(c["tasks"] and c["cached_tasks"] == c["tasks"] for c in s2["cells"]), s2["cells"]
        for a, b in zip(s1["cells"], s2["cells"]):
            assert a["final"]["reliability"] == b["final"]["reliability"]
        print(f"sweep 2x2 on 2 workers: {first_s:.1f}s, rerun from cache {rerun_s:.1f}s")

        # crash detection through Prefect: SIGKILL a running cell's process; the worker marks the flow
        # run CRASHED and runs its on_crashed hook, which marks the MLflow run KILLED
        params = {"overrides": _study_overrides(model) + ["method.steps=100000", "method.early_stop_loss=0"]}
        text = cli(*PREFECT, "deployment", "run", "memoe-study/quickstart", "--params", json.dumps(params)).stdout
        fr_id = re.search(r"UUID: ([0-9a-f-]{36})", text).group(1)

        def training_run():
            rs = client.search_runs([exp.experiment_id], f"tags.`prefect.root_flow_run_id` = '{fr_id}'")
            return rs[0] if rs and client.get_metric_history(rs[0].info.run_id, "train.step_loss") else None

        run = _wait(training_run, "the long cell to train", 300, 1, [logs / "worker0.log", logs / "worker1.log"])
        os.kill(int(run.data.tags["memoe.pid"]), signal.SIGKILL)

        def flow_state():
            with urllib.request.urlopen(f"{srv.prefect_api}/flow_runs/{fr_id}", timeout=30) as resp:
                st = json.loads(resp.read())["state"]["type"]
            return st if st in ("CRASHED", "FAILED", "COMPLETED", "CANCELLED") else None

        assert _wait(flow_state, "the flow run to end", 120) == "CRASHED"
        _wait(
            lambda: client.get_run(run.info.run_id).info.status == "KILLED",
            "the MLflow run marked KILLED",
            60,
            logs=[logs / "worker0.log", logs / "worker1.log"],
        )
    finally:
        team_procs = list(srv.procs)
        for p in reversed(started):  # the workers (SIGINT, as Prefect expects), then moto
            stop_process(p)
        srv.stop()
    assert all(p.poll() is not None for p in started + team_procs) and len(team_procs) == 2
    assert not (team_dir / "postgres" / "postmaster.pid").exists()
    import shutil

    shutil.rmtree(team_dir, ignore_errors=True)
