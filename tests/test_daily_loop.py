"""The researcher's daily loop (issue 19): one rule for relative paths, schedules shipped paused,
edit() checks its frame, one-time costs apart from per-edit costs, the compare parent run's
metrics, run names and tags, reruns marked, rounds numbered alike, per-edit tables that show the
edit, Prefect artifacts, ``memoe ls / show / compare / config``, ``--dry-run`` and the Python API."""
from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import polars as pl
import pytest
import yaml

from .conftest import ROOT, ZSRE, tiny_model
from .test_pipeline import MEMOE, env_for, memoe_run, study_config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


# ------------------------------------------------------------------ paths, schedules

def test_config_and_data_paths_resolve_from_any_folder(tmp_path, monkeypatch):
    """The one rule: a relative path is looked up in the current folder, then in the project root;
    so `memoe run configs/compare.yaml` works from outside the checkout."""
    from flows.commands_run import preflight
    from memoe.config import ConfigError, load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/compare.yaml", ["data.n_edits=4"])
    assert [m.name for m in cfg.methods][:2] == ["memoe", "ft-l"]
    assert preflight(cfg)["rounds"] == 1  # its ../shared data path resolves too
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "compare.yaml").write_text("data:\n  n_edits: 3\n")
    assert load_config("configs/compare.yaml").data.n_edits == 3  # the current folder comes first
    with pytest.raises(ConfigError, match="looked in"):
        load_config("configs/nope.yaml")


def test_run_from_another_folder_dry_run(tmp_path):
    env = env_for(tmp_path / "runs", tmp_path / "prefect")
    p = subprocess.run(MEMOE + ["run", "configs/quickstart.yaml", "--dry-run", "--set", "data.n_edits=6",
                                "--set", "protocol.rounds=3", "--set", "protocol.batch_size=2", "--tag", "a=b"],
                       env=env | {"PYTHONPATH": str(ROOT)}, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "dry run" in p.stdout and "sequential_study, 3 round(s) x 2 edits = 6" in p.stdout, p.stdout
    assert "methods:  memoe" in p.stdout and "memoe-sequential-3x2-zsre-smollm2-135m" in p.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "prefect" / "prefect.db").exists()  # nothing ran


def test_schedules_ship_paused():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    schedules = [s for d in spec["deployments"] for s in d.get("schedules") or []]
    assert schedules and all(s.get("active") is False for s in schedules), schedules


# ------------------------------------------------------------------ edit() checks its frame

def _tiny_methods():
    from memoe.api import method_config

    return {"memoe": method_config("memoe", layers=[2], steps=2), "ft-l": method_config("ft-l", layer=2, steps=2),
            "ft-m": method_config("ft-m", layer=2, steps=2), "lora": method_config("lora", steps=2),
            "grace": method_config("grace", layer=2, steps=2),
            "memit": method_config("memit", layers=[1], corpus="pydoc", mom2_tokens=256, mom2_seq_len=32, v_steps=2),
            "wise": method_config("wise", layer=2, steps=2, irr_chunks=4)}


def test_every_editor_checks_its_frame_as_the_loaders_do(tokenizer, tmp_path, monkeypatch):
    from memoe.data import EditDataError
    from memoe.editors import REGISTRY, make_editor

    monkeypatch.setenv("MEMOE_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama", len(tokenizer))
    methods = _tiny_methods()
    assert set(methods) == set(REGISTRY)
    four = pl.DataFrame({"id": ["1"], "prompt": ["Paris is the capital of"], "target_new": ["Italy"],
                         "rephrase_prompts": [["The capital of which country is Paris?"]]})
    wrong = pl.DataFrame({"id": ["1", "2"], "subject": ["Paris", "Rome"], "prompt": ["Paris is in", "Berlin is in"],
                          "target_new": ["Italy", "France"]})
    for name, m in methods.items():
        ed = make_editor(model, tokenizer, m)
        try:
            with pytest.raises(EditDataError, match=r"field 'subject'.*missing column\(s\) 'subject'"):
                ed.edit(four)
            with pytest.raises(EditDataError, match=r"record 2, field 'subject': subject 'Rome' does not occur"):
                ed.edit(wrong)
            assert ed.edits_applied == 0, name
        finally:
            ed.remove()


# ------------------------------------------------------------------ memoe config

def test_config_command_prints_every_key_with_default_and_description(capsys):
    from memoe.cli import main
    from memoe.config import Config

    assert main(["config", "configs/quickstart.yaml", "--set", "method.rank=8"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines()[2:]}
    assert "method.rank" in lines and "8 *" in lines["method.rank"] and "32" in lines["method.rank"]
    assert "40 *" in lines["method.steps"] and "80" in lines["method.steps"] and "optimiser steps" in lines["method.steps"]
    assert "default: sqlite database in runs/" in lines["tracking.mlflow_uri"]
    for section in ("model", "data", "protocol", "eval", "tracking"):
        for key in type(getattr(Config(), section)).model_fields:
            assert f"{section}.{key}" in lines, f"{section}.{key}"


# ------------------------------------------------------------------ the Python API

def test_api_edit_in_the_easyedit_manner(tokenizer):
    from memoe.api import edit
    from memoe.data import EditDataError
    from memoe.editors.memoe import MEMoEEditor

    model = tiny_model("llama", len(tokenizer))
    res = edit(prompts=["The capital of France is", "The mother tongue of Danielle Darrieux is"],
               target_new=["Rome", "English"], subject=["France", "Danielle Darrieux"],
               rephrase_prompts=["France's capital city is", "Danielle Darrieux's first language is"],
               locality_prompts=["The capital of Spain is", "Water is made of"],
               locality_ground_truth=["Madrid", "hydrogen"],
               method="memoe", model=model, tokenizer=tokenizer, layers=[2], steps=60, early_stop_loss=0.0,
               max_new_tokens=4)
    assert res.scores["reliability"] == 1.0 and res.scores["n_edits"] == 2.0
    assert {"generality", "locality", "generation_reliability"} <= set(res.scores)
    assert res.per_edit["prompt"].to_list()[1] == "The mother tongue of Danielle Darrieux is"
    assert {"target_new", "subject", "generation", "reliability", "locality"} <= set(res.per_edit.columns)
    assert isinstance(res.editor, MEMoEEditor) and res.stats
    res.editor.remove()
    with pytest.raises(EditDataError, match="locality_answers"):
        edit(prompts=["The capital of France is"], target_new=["Rome"], subject=["France"],
             locality_prompts=["The capital of Spain is"], model=model, tokenizer=tokenizer, layers=[2])
    with pytest.raises(EditDataError, match="field 'subject'"):
        edit(prompts=["The capital of France is"], target_new=["Rome"], subject=["Spain"], model=model,
             tokenizer=tokenizer, layers=[2])


# ------------------------------------------------------------------ the loop end to end

def _prefect_artifacts(home: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(home / "prefect.db") as db:
        return db.execute("select key, type, data from artifact").fetchall()


def test_study_rerun_compare_ls_show_compare(tmp_path, tiny_dir, capsys):
    from mlflow import MlflowClient

    from memoe.cli import main

    runs, home = tmp_path / "runs", tmp_path / "prefect"
    env = env_for(runs, home) | {"MEMOE_CACHE": str(tmp_path / "cache")}
    cfg = study_config(tmp_path / "a", tiny_dir, steps=5, rounds=2, batch=2)
    res, p = memoe_run(cfg, tmp_path / "out-a", env, "--name", "first-study", "--tag", "owner=ann", "--tag", "k=v=w")
    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    parent = client.get_run(res["mlflow"]["run_id"])
    assert parent.info.run_name == "first-study"
    assert parent.data.tags["owner"] == "ann" and parent.data.tags["k"] == "v=w"
    # rounds numbered alike: 1 and 2 in the terminal, in results.json and in MLflow
    kids = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted((k.info.run_name, k.data.tags["memoe.round"]) for k in kids) == [("round-1", "1"), ("round-2", "2")]
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    assert [ln.split()[0] for ln in p.stdout.splitlines() if ln[:5].strip() in ("1", "2")] == ["1", "2"], p.stdout
    # the per-edit table shows the edit, the generation and every probe's score
    per_edit = pl.read_parquet(tmp_path / "out-a" / "per_edit.parquet")
    assert per_edit.columns[:5] == ["id", "subject", "prompt", "target_new", "target_true"]
    assert {"generation", "reliability", "generality", "locality", "round_of_edit"} <= set(per_edit.columns)
    assert per_edit["prompt"].to_list()[0] in json.loads(ZSRE.read_text())[0]["src"]
    # the flow run's results table and MLflow link as Prefect artifacts
    arts = _prefect_artifacts(home)
    kinds = {k: t for k, t, _ in arts}
    assert kinds == {"memoe-results": "table", "memoe-mlflow": "markdown"}, kinds  # a link artifact is markdown
    table = json.loads(json.loads(next(d for k, _, d in arts if k == "memoe-results")))
    assert [r["round"] for r in table] == [1, 2]
    assert any(parent.info.run_id in d for k, _, d in arts if k == "memoe-mlflow")

    # a cached rerun is marked as a rerun of the first, and `memoe ls` hides it
    again, _ = memoe_run(cfg, tmp_path / "out-a2", env)
    rerun = client.get_run(again["mlflow"]["run_id"])
    assert rerun.data.tags["memoe.rerun_of"] == parent.info.run_id and rerun.data.tags["memoe.cached_rerun"] == "true"
    assert rerun.info.run_name.endswith("(rerun)")

    # a sequential compare with MEMIT: its key statistics are a one-time cost, not a per-edit one
    raw = yaml.safe_load(cfg.read_text())
    raw["methods"] = [raw.pop("method"), {"name": "memit", "layers": [1, 2], "fact_token": "last", "corpus": "pydoc",
                                          "mom2_tokens": 20000, "mom2_seq_len": 64, "v_steps": 5}]
    cmp_cfg = tmp_path / "cmp.yaml"
    cmp_cfg.write_text(yaml.safe_dump(raw))
    cres, cp = memoe_run(cmp_cfg, tmp_path / "out-c", env)
    memit = cres["methods"]["memit"]
    setup, train = memit["costs"]["setup_s"], memit["timings"]["train_compute"]
    assert setup > 0 and memit["rounds"][0]["train"]["setup_s"] > 0
    assert memit["costs"]["edit_s_per_100"] == pytest.approx(100 * (train - setup) / 4, abs=0.02)
    assert cres["methods"]["memoe"]["costs"]["setup_s"] == 0
    assert "setup s" in cp.stdout
    cparent = client.get_run(cres["mlflow"]["run_id"])
    m = cparent.data.metrics
    assert m["memoe.reliability"] == pytest.approx(cres["methods"]["memoe"]["final"]["reliability"])
    assert m["memit.setup_s"] == pytest.approx(setup) and "memit.edit_s_per_100" in m and "memit.avg" in m
    assert not any(k.startswith("method.") for k in cparent.data.params), cparent.data.params
    assert cparent.data.params["methods.memit.layers"] == "[1, 2]"
    assert cparent.info.run_name == "memoe+memit-sequential-2x2-zsre-" + Path(tiny_dir).name
    out_c = tmp_path / "out-c"
    assert (out_c / "retention.png").stat().st_size > 1000 and (out_c / "comparison.png").stat().st_size > 1000

    # memoe ls: both studies (the rerun hidden), the compare's methods below it; CSV
    capsys.readouterr()
    assert main(["ls", "--runs-dir", str(runs), "--csv", str(tmp_path / "ls.csv")]) == 0
    out = capsys.readouterr().out
    assert "first-study" in out and "(rerun)" not in out and "└ memoe" in out and "└ memit" in out, out
    assert parent.info.run_id[:8] in out and "seq 2x2" in out
    listing = pl.read_csv(tmp_path / "ls.csv")
    assert listing.filter(pl.col("name") == "first-study")["reliability"].to_list() == \
        [pytest.approx(res["final"]["reliability"])]
    assert main(["ls", "--runs-dir", str(runs), "--all"]) == 0
    assert "(rerun)" in capsys.readouterr().out

    # memoe show: settings, rounds, failed edits; --csv writes the per-edit table
    assert main(["show", "first-study", "--runs-dir", str(runs), "--csv", str(tmp_path / "edits.csv")]) == 0
    out = capsys.readouterr().out
    assert parent.info.run_id in out and "owner=ann" in out and "method.steps=5" in out
    assert "edits_so_far" in out and "failed edits" in out or "no failed edits" in out
    assert pl.read_csv(tmp_path / "edits.csv")["prompt"].to_list() == per_edit["prompt"].to_list()
    assert main(["show", cparent.info.run_id[:10], "--runs-dir", str(runs)]) == 0
    assert "memit" in capsys.readouterr().out

    # memoe compare: the first study against the compare's MEMoE run; a table, CSV and the retention plot
    memoe_kid = next(k for k in client.search_runs([parent.info.experiment_id],
                                                   f"tags.`mlflow.parentRunId` = '{cparent.info.run_id}'")
                     if k.info.run_name == "memoe")
    plot = tmp_path / "curves.png"
    assert main(["compare", parent.info.run_id[:8], memoe_kid.info.run_id, "--runs-dir", str(runs),
                 "--plot", str(plot), "--csv", str(tmp_path / "cmp.csv")]) == 0
    out = capsys.readouterr().out
    assert "first-study" in out and "memoe" in out and plot.stat().st_size > 1000
    rows = pl.read_csv(tmp_path / "cmp.csv")
    assert rows.height == 2 and rows["reliability"].to_list()[0] == pytest.approx(res["final"]["reliability"])
    assert main(["compare", cparent.info.run_id, "--runs-dir", str(runs), "--plot", str(plot)]) == 0  # its methods
    assert "memit" in capsys.readouterr().out
    assert main(["show", "no-such-run", "--runs-dir", str(runs)]) == 2
