"""The Prefect + MLflow pipeline end to end on a tiny model: cache hits on a rerun, resume after
kill -9 with identical metrics, a bad config stopped before any work, two concurrent studies.

Every study runs as a ``memoe run`` subprocess (its own temporary Prefect server), with the real
registered MEMoE editor on a tiny random LLaMA saved with the embedded tokenizer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, ZSRE, tiny_model

pytestmark = pytest.mark.timeout(600)
MEMOE = [sys.executable, "-m", "flows.cli"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def study_config(folder: Path, model: Path, steps: int = 10, rounds: int = 3, batch: int = 2, **extra) -> Path:
    from memoe.config import METHODS

    assert "memoe" in METHODS, "the MEMoE editor must be registered"
    cfg = {
        "model": {"name": str(model), "device": "cpu", "dtype": "float32"},
        "data": {"path": str(ZSRE), "format": "zsre", "n_edits": rounds * batch},
        "method": {"name": "memoe", "layers": [2], "steps": steps, "early_stop_loss": 0.0},
        "protocol": {"mode": "sequential", "rounds": rounds, "batch_size": batch},
        "eval": {"batch_size": 8, "generation": True, "max_new_tokens": 4},
        "threads": 1,
    }
    for k, v in extra.items():
        cfg.setdefault(k.split("__")[0], {})[k.split("__")[1]] = v
    if cfg["protocol"]["mode"] == "batch":  # rounds and batch_size are sequential settings
        cfg["protocol"] = {"mode": "batch"}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env_for(runs: Path, prefect_home: Path) -> dict[str, str]:
    env = dict(
        os.environ,
        MEMOE_RUNS=str(runs),
        PREFECT_HOME=str(prefect_home),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("PREFECT_API_URL", None)
    return env


def memoe_run(config: Path, out: Path, env: dict, *extra: str, timeout: int = 300):
    p = subprocess.run(
        MEMOE + ["run", str(config), "--out", str(out), *extra],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), p


def test_rerun_is_all_cache_hits_and_kill_resume_gives_identical_metrics(tmp_path, tiny_dir):
    cfg = study_config(tmp_path, tiny_dir, steps=60, rounds=3)
    home = tmp_path / "prefect"

    # 1. uninterrupted reference run, then the same study again: every task is a cache hit
    env_a = env_for(tmp_path / "runs-a", home)
    ref, p = memoe_run(cfg, tmp_path / "out-a", env_a)
    assert not any(s == "Cached" for s in ref["tasks"].values()), ref["tasks"]
    assert set(ref["final"]) >= {"reliability", "generality", "locality", "portability", "generation_reliability"}
    assert [r["edits_so_far"] for r in ref["rounds"]] == [2, 4, 6]
    # round 1 computes its prompts' states below the edit; the later rounds reuse them (memoe/frozen.py)
    ev = [r["evaluation"] for r in ref["rounds"]]
    assert ev[0]["states_reused"] == 0 and ev[0]["states_computed"] > 0
    assert ev[1]["states_reused"] > 0 and ev[2]["states_reused"] > ev[1]["states_reused"]
    assert "results.json" in p.stdout
    again, _ = memoe_run(cfg, tmp_path / "out-a2", env_a)
    trained = {k: v for k, v in again["tasks"].items() if k.startswith(("train_round", "evaluate_round"))}
    assert len(trained) == 6 and set(trained.values()) == {"Cached"}, again["tasks"]
    assert again["final"] == ref["final"]

    # 2. a fresh store: kill -9 the study once round 1's evaluation is stored, then restart it
    runs_b = tmp_path / "runs-b"
    env_b = env_for(runs_b, home)
    out_b = tmp_path / "out-b"
    proc = subprocess.Popen(
        MEMOE + ["run", str(cfg), "--out", str(out_b)],
        env=env_b,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    results_dir = runs_b / "store" / "results"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if results_dir.is_dir() and any(f.name.startswith("eval-") for f in results_dir.iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the study finished (or failed) before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the study and its temporary Prefect server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out_b / "results.json").exists()
    done = sorted(f.name.split("-")[0] for f in results_dir.iterdir())
    assert done.count("eval") < 3, done

    resumed, _ = memoe_run(cfg, out_b, env_b)
    assert resumed["tasks"]["train_round_0"] == "Cached" and resumed["tasks"]["evaluate_round_0"] == "Cached"
    assert resumed["tasks"]["train_round_2"] != "Cached"
    assert resumed["final"] == ref["final"]
    assert [r["reliability"] for r in resumed["rounds"]] == [r["reliability"] for r in ref["rounds"]]

    # the killed study's MLflow run is marked KILLED, the resumed one FINISHED
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs_b / 'mlflow.db'}")
    exp = client.get_experiment_by_name("memoe")
    parents = client.search_runs([exp.experiment_id], f"tags.`memoe.config_hash` = '{resumed['config_hash']}'")
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--set", "protocol.rounds=0"], "protocol.rounds"),
        (["--set", "method.bogus=1"], "unknown key 'method.bogus'"),
        (["--set", "data.path=/nonexistent/edits.json"], "/nonexistent/edits.json"),
        (
            ["--set", "data.n_edits=4", "--set", "protocol.rounds=3", "--set", "protocol.batch_size=2"],
            "data.n_edits=4 but protocol.rounds x protocol.batch_size = 3 x 2 = 6",
        ),
        (
            ["--set", "data.n_edits=3000", "--set", "protocol.rounds=3", "--set", "protocol.batch_size=1000"],
            "only 1037 are available",
        ),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, tiny_dir, overrides, message):
    cfg = study_config(tmp_path, tiny_dir)
    runs = tmp_path / "runs"
    p = subprocess.run(
        MEMOE + ["run", str(cfg), "--out", str(tmp_path / "out"), *overrides],
        env=env_for(runs, tmp_path / "prefect"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.startswith("error: ") and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert not runs.exists() and not (tmp_path / "out").exists()  # no store, no database, no output


def test_bad_data_file_is_a_clear_error(tmp_path, tiny_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"subject": "Paris", "prompt": "Paris is in", "target_new": "Italy"}\n{"subject": "X"\n')
    cfg = study_config(tmp_path, tiny_dir)
    p = subprocess.run(
        MEMOE + ["run", str(cfg), "--set", f"data.path={bad}", "--set", "data.format=jsonl"],
        env=env_for(tmp_path / "runs", tmp_path / "prefect"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "bad.jsonl" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_two_concurrent_studies_have_separate_correct_mlflow_records(tmp_path, tiny_dir):
    from mlflow import MlflowClient

    runs = tmp_path / "runs"
    env = env_for(runs, tmp_path / "prefect")
    cfgs = {
        "a": study_config(tmp_path / "a", tiny_dir, steps=8, rounds=2, protocol__mode="batch"),
        "b": study_config(
            tmp_path / "b", tiny_dir, steps=12, rounds=3, data__seed=1, data__sample="random", eval__retention_sample=1
        ),
    }
    procs = {
        k: subprocess.Popen(
            MEMOE + ["run", str(c), "--out", str(tmp_path / f"out-{k}")],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for k, c in cfgs.items()
    }
    logs = {k: p.communicate(timeout=400)[0] for k, p in procs.items()}
    for k, p in procs.items():
        assert p.returncode == 0, logs[k][-4000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("memoe")
    seen_ids = set()
    for k, n_rounds, steps in (("a", 1, [4]), ("b", 3, [2, 4, 6])):
        res = json.loads((tmp_path / f"out-{k}" / "results.json").read_text())
        parent = client.get_run(res["mlflow"]["run_id"])
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["memoe.config_hash"] == res["config_hash"]
        assert parent.data.params["protocol.mode"] == {"a": "batch", "b": "sequential"}[k]
        assert parent.data.tags["memoe.flow"] == {"a": "batch", "b": "sequential"}[k]
        assert parent.data.params["method.steps"] == str({"a": 8, "b": 12}[k])
        assert parent.data.metrics["final.reliability"] == pytest.approx(res["final"]["reliability"])
        assert parent.data.tags["memoe.git_commit"] and parent.data.tags["memoe.model"] == str(tiny_dir)
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert len(children) == n_rounds and all(c.info.status == "FINISHED" for c in children)
        hist = client.get_metric_history(parent.info.run_id, "reliability")
        assert sorted(m.step for m in hist) == steps == [r["edits_so_far"] for r in res["rounds"]]
        assert [m.value for m in sorted(hist, key=lambda m: m.step)] == pytest.approx(
            [r["reliability"] for r in res["rounds"]]
        )
        arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {"config.yaml", "results.json", "per_edit.parquet", "adapter", "plots"} <= arts, arts
        assert parent.inputs.dataset_inputs, "the edit records are logged as a dataset input"
        plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
        assert "plots/rounds.png" in plots and "plots/expert_load.png" in plots, plots
        assert any(k.startswith("diag.load_expert_") for k in children[0].data.metrics)
        seen_ids.add(parent.info.run_id)
        if k == "b":  # retention sample: 1 of the 2 earlier edits after round 2, all edits after the last
            assert [r["n_earlier_scored"] for r in res["rounds"]] == [0, 1, 4]
            r2 = next(c for c in children if c.data.tags["memoe.round"] == "2")  # rounds count from 1, as printed
            assert r2.data.metrics["eval.retention_sample_size"] == 1
    assert len(seen_ids) == 2


def test_compare_writes_table_parquet_and_plot(tmp_path, tiny_dir):
    cfg = study_config(tmp_path, tiny_dir, steps=5, rounds=1, batch=3)
    raw = yaml.safe_load(cfg.read_text())
    raw["protocol"] = {"mode": "batch"}
    raw["data"]["n_edits"] = 3
    raw["methods"] = [raw["method"], {"name": "ft-m", "layer": 2, "steps": 5}]
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    res, p = memoe_run(cfg, out, env_for(tmp_path / "runs", tmp_path / "prefect"), "--set", "tracking.enabled=false")
    assert set(res["methods"]) == {"memoe", "ft-m"}
    for m in res["methods"].values():
        assert {"final", "rounds", "timings"} <= set(m) and m["final"]["n_edits"] == 3
        assert m["costs"]["edit_s_per_100"] > 0 and m["costs"]["peak_memory_mb"] > 100  # the process holds a model
    table = (out / "comparison.md").read_text()
    assert table.count("|") > 10 and "edit_s_per_100" in table and "peak_memory_mb" in table
    assert "s/100 edits" in p.stdout and "peak MiB" in p.stdout  # `memoe run` prints the table with the costs
    assert (out / "comparison.parquet").exists() and (out / "comparison.png").stat().st_size > 1000
    assert res["mlflow"]["run_id"] is None and not (tmp_path / "runs" / "mlflow.db").exists()


def test_ui_command_is_local_and_light(tmp_path, monkeypatch):
    import argparse

    from flows import commands_ui

    monkeypatch.setenv("MEMOE_RUNS", str(tmp_path))
    cmd = commands_ui.command(argparse.Namespace(port=5123, runs_dir=None, uri=None))
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--workers") + 1] == "1"
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_run_without_config_uses_the_quickstart(tmp_path):
    p = subprocess.run(
        MEMOE + ["run", "--set", "protocol.rounds=100"],
        env=env_for(tmp_path / "runs", tmp_path / "p"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    quick = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    b, n = quick["protocol"]["batch_size"], quick["data"]["n_edits"]
    assert p.returncode == 2 and f"data.n_edits={n} but protocol.rounds x protocol.batch_size = 100 x {b}" in p.stderr


def test_a_re_edit_study_scores_the_latest_target_and_the_overwritten_one(tmp_path, tiny_dir):
    """Grown adapter through the pipeline: round 3 re-edits round 1's edits with new targets."""
    cfg = study_config(
        tmp_path, tiny_dir, steps=200, rounds=3, method__growth="round", protocol__re_edit={"round": 3, "of_round": 1}
    )
    res, _ = memoe_run(cfg, tmp_path / "out", env_for(tmp_path / "runs", tmp_path / "prefect"))
    assert [r["train"]["n_blocks"] for r in res["rounds"]] == [1, 2, 3]
    assert [r["train"]["n_superseded"] for r in res["rounds"]] == [0, 0, 2]
    assert "reedit_reliability" not in res["rounds"][1]
    last = res["rounds"][-1]
    assert last["n_edits"] == 4  # in force: round 2's edits and the two re-edits
    assert last["reedit_reliability"] == 1.0 and last["overwritten_reliability"] < 0.5
    assert last["overwritten_preferred"] == 0.0  # the earlier target less likely than the latest, on both
    assert res["final"]["reedit_reliability"] == 1.0 and res["final"]["reliability"] == 1.0


def test_a_grown_study_reuses_the_scores_that_still_hold_and_they_are_the_scores(tmp_path, tiny_dir):
    """growth 'round': the earlier rounds' edits sit in frozen blocks, so a later round takes their kept
    results (memoe/memo.py) instead of scoring them again, and the study's metrics are those of a study
    that scores everything again (eval.reuse_scores off)."""
    cfg = study_config(tmp_path / "a", tiny_dir, steps=30, rounds=3, method__growth="round")
    kept, _ = memoe_run(cfg, tmp_path / "out-a", env_for(tmp_path / "runs-a", tmp_path / "prefect"))
    ev = [r["evaluation"] for r in kept["rounds"]]
    assert ev[0]["scores_reused"] == 0 and ev[0]["scores_computed"] > 0
    assert ev[1]["scores_reused"] > 0 and ev[2]["scores_reused"] > ev[1]["scores_reused"]
    off = study_config(tmp_path / "b", tiny_dir, steps=30, rounds=3, method__growth="round", eval__reuse_scores=False)
    plain, _ = memoe_run(off, tmp_path / "out-b", env_for(tmp_path / "runs-b", tmp_path / "prefect"))
    assert all(r["evaluation"]["scores_reused"] == 0 for r in plain["rounds"])
    for m, v in plain["final"].items():
        assert kept["final"][m] == pytest.approx(v, abs=1e-6), m
