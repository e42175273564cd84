"""Studies beyond one machine: sweep grids, the team server (PostgreSQL + Prefect + MLflow with S3
artifacts on moto), a sweep on a process work pool with two workers, crash marking through
Prefect's hooks, the compare flow's methods on Dask, and the Kubernetes GPU job template.
Everything started here binds to 127.0.0.1 and is stopped here."""
from __future__ import annotations

import json
import os
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
    f.write_text("base: configs/quickstart.yaml\nset: [data.n_edits=4]\n"
                 "grid:\n  method.layers: [[2], [3]]\n  data.seed: [0, 1, 2]\n")
    sw = load_sweep(f, ["eval.generation=false", "method.steps=3,5"])
    cells = sw.cells()
    assert len(cells) == 2 * 3 * 2
    assert cells[0].overrides == ("data.n_edits=4", "eval.generation=false", "method.layers=[2]", "data.seed=0",
                                  "method.steps=3")
    assert cells[-1].label == "method.layers=[3],data.seed=2,method.steps=5"
    assert load_sweep(f, ["eval.generation=false", "method.steps=3,5"]).sweep_id() == sw.sweep_id()
    assert load_sweep(f, ["method.steps=3,6"]).sweep_id() != sw.sweep_id()
    # a plain config file: its grid comes from --set only
    plain = load_sweep(ROOT / "configs" / "quickstart.yaml", ["method.name=memoe,lora", "data.seed=0,1,2"])
    assert len(plain.cells()) == 6 and plain.base.endswith("quickstart.yaml")
    for bad, sets, msg in [("grid:\n  data.seed: 3\n", [], "grid.data.seed: a list"),
                           ("grid: {data.seed: [0, 0]}\n", [], "repeats a value"),
                           ("grid: {data.seed: [0]}\nextra: 1\n", [], "unknown key"),
                           ("grid: {data.seed: [0, 1]}\n", ["data.seed=2,3"], "swept twice"),
                           ("grid: {data.seed: [0, 1]}\n", ["method.layers=[2"], "unbalanced")]:
        f.write_text(bad)
        with pytest.raises(ConfigError, match=msg):
            load_sweep(f, sets)


def test_sweep_rejects_a_bad_cell_before_anything_runs(tmp_path):
    from flows.commands_run import preflight
    from flows.sweep import check_cells
    from memoe.grid import load_sweep

    sw = load_sweep(None, ["data.n_edits=4", "protocol.batch_size=2", "protocol.rounds=2", "method.rank=4,0"])
    with pytest.raises(ConfigError, match=r"sweep cell 2 \(method.rank=0\).*rank"):
        check_cells(sw, preflight)
    p = subprocess.run([sys.executable, "-m", "memoe.cli", "sweep", "--set", "data.n_edits=4",
                        "--set", "protocol.batch_size=2", "--set", "protocol.rounds=2",
                        "--set", "data.format=csv,jsonl"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "error: sweep cell 1 (data.format=csv)" in p.stderr, p.stderr[-2000:]


# ------------------------------------------------------------------------- Kubernetes (fast)

def test_kubernetes_job_template_renders_a_gpu_pod_with_the_shared_store():
    from prefect.client.schemas.objects import FlowRun

    from flows.k8s import deployment_job_variables, gpu_job_template, load_template, render_job

    assert load_template() == json.loads(json.dumps(gpu_job_template())), \
        "docker/k8s-gpu-job-template.json is stale: python -m flows.k8s --write"
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
    pod2 = render_job(load_template(), jv | {"gpus": 2, "store_claim": "lab-nfs"}, flow_run=fr)["spec"]["template"]["spec"]
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
    return [f"model.name={model}", "method.layers=[2]", "method.steps=5", "data.n_edits=4", "data.sample=random",
            "protocol.rounds=2", "protocol.batch_size=2", "eval.max_new_tokens=4", "threads=1"]


def _env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
    return env | {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_UI_ENABLED": "false",
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_ENABLE_TELEMETRY": "false",
                  "OMP_NUM_THREADS": "1", "PWD": str(ROOT)} | extra


# ------------------------------------------------------------------------- local sweep (slow)

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_sweep_reports_a_failed_cell_and_runs_the_others(tmp_path, tokenizer):
    from mlflow import MlflowClient

    model = _tiny(tmp_path, tokenizer)
    args = [sys.executable, "-m", "memoe.cli", "sweep", "--runs-dir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "sweep.json")]
    for o in _study_overrides(model):
        args += ["--set", o]
    args += ["--set", "method.layers=[9],[2]"]  # the tiny model has 4 layers: cell 0 fails while training
    p = subprocess.run(args, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=500)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((tmp_path / "sweep.json").read_text())
    assert [c["state"] for c in s["cells"]] == ["FAILED", "COMPLETED"]
    assert "layer" in s["cells"][0]["error"].lower() or "index" in s["cells"][0]["error"].lower()
    assert "failed: cell 1 [method.layers=[9]]" in p.stderr
    assert "cell 2/2 [method.layers=[2]] COMPLETED" in p.stdout
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
        "    print('RESULT ' + json.dumps(out))\n")
    ov = [o for o in _study_overrides(model) if not o.startswith("method.")] + [
        "methods=[{name: memoe, layers: [2], steps: 5}, {name: ft-m, layer: 2, steps: 5}]"]
    p = subprocess.run([sys.executable, str(script), json.dumps(ov), str(tmp_path)], cwd=ROOT,
                       env=_env(tmp_path, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=560)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads(p.stdout.split("RESULT ", 1)[1])
    workers = {k: m["worker"] for k, m in out["dask"].items()}
    assert sorted(workers) == ["ft-m", "memoe"]
    assert all(w.startswith("dask:") for w in workers.values()) and len(set(workers.values())) == 2, workers
    for k in workers:
        for metric in ("reliability", "generality", "locality"):
            assert out["dask"][k]["final"][metric] == pytest.approx(out["serial"][k]["final"][metric], abs=1e-6)
