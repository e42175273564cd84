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
from .test_pipeline import MEMOE, env_for, memoe_run, study_config, tiny_dir  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(1800)


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
    p = subprocess.run(
        MEMOE
        + [
            "run",
            "configs/quickstart.yaml",
            "--dry-run",
            "--set",
            "data.n_edits=6",
            "--set",
            "protocol.rounds=3",
            "--set",
            "protocol.batch_size=2",
            "--tag",
            "a=b",
        ],
        env=env | {"PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
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

    return {
        "memoe": method_config("memoe", layers=[2], steps=2),
        "ft-l": method_config("ft-l", layer=2, steps=2),
        "ft-m": method_config("ft-m", layer=2, steps=2),
        "lora": method_config("lora", steps=2),
        "grace": method_config("grace", layer=2, steps=2),
        "memit": method_config("memit", layers=[1], corpus="pydoc", mom2_tokens=256, mom2_seq_len=32, v_steps=2),
        "wise": method_config("wise", layer=2, steps=2, irr_chunks=4),
    }


def test_every_editor_checks_its_frame_as_the_loaders_do(tokenizer, tmp_path, monkeypatch):
    from memoe.config import METHODS
    from memoe.data import EditDataError
    from memoe.editors import make_editor

    monkeypatch.setenv("MEMOE_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama", len(tokenizer))
    methods = _tiny_methods()
    assert set(methods) == set(METHODS)
    four = pl.DataFrame(
        {
            "id": ["1"],
            "prompt": ["Paris is the capital of"],
            "target_new": ["Italy"],
            "rephrase_prompts": [["The capital of which country is Paris?"]],
        }
    )
    wrong = pl.DataFrame(
        {
            "id": ["1", "2"],
            "subject": ["Paris", "Rome"],
            "prompt": ["Paris is in", "Berlin is in"],
            "target_new": ["Italy", "France"],
        }
    )
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
    from flows.cli import main
    from memoe.config import Config

    assert main(["config", "configs/quickstart.yaml", "--set", "method.rank=8"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines()[2:]}
    assert "method.rank" in lines and "8 *" in lines["method.rank"] and "32" in lines["method.rank"]
    assert (
        "40 *" in lines["method.steps"] and "80" in lines["method.steps"] and "optimiser steps" in lines["method.steps"]
    )
    assert "default: sqlite database in runs/" in lines["tracking.mlflow_uri"]
    for section in ("model", "data", "protocol", "eval", "tracking"):
        for key in type(getattr(Config(), section)).model_fields:
            assert f"{section}.{key}" in lines, f"{section}.{key}"


# ------------------------------------------------------------------ the Python API


def test_api_edit_in_the_easyedit_manner(tokenizer):
    from memoe.api import edit
    from memoe.data import EditDataError
    from memoe.editors.memoe.editor import MEMoEEditor

    model = tiny_model("llama", len(tokenizer))
    res = edit(
        prompts=["The capital of France is", "The mother tongue of Danielle Darrieux is"],
        target_new=["Rome", "English"],
        subject=["France", "Danielle Darrieux"],
        rephrase_prompts=["France's capital city is", "Danielle Darrieux's first language is"],
        locality_prompts=["The capital of Spain is", "Water is made of"],
        locality_ground_truth=["Madrid", "hydrogen"],
        method="memoe",
        model=model,
        tokenizer=tokenizer,
        layers=[2],
        steps=60,
        early_stop_loss=0.0,
        max_new_tokens=4,
    )
    assert res.scores["reliability"] == 1.0 and res.scores["n_edits"] == 2.0
    assert {"generality", "locality", "generation_reliability"} <= set(res.scores)
    assert res.per_edit["prompt"].to_list()[1] == "The mother tongue of Danielle Darrieux is"
    assert {"target_new", "subject", "generation", "reliability", "locality"} <= set(res.per_edit.columns)
    assert isinstance(res.editor, MEMoEEditor) and res.stats
    res.editor.remove()
    with pytest.raises(EditDataError, match="locality_answers"):
        edit(
            prompts=["The capital of France is"],
            target_new=["Rome"],
            subject=["France"],
            locality_prompts=["The capital of Spain is"],
            model=model,
            tokenizer=tokenizer,
            layers=[2],
        )
    with pytest.raises(EditDataError, match="field 'subject'"):
        edit(
            prompts=["The capital of France is"],
            target_new=["Rome"],
            subject=["Spain"],
            model=model,
            tokenizer=tokenizer,
            layers=[2],
        )


# ------------------------------------------------------------------ the loop end to end


def _prefect_artifacts(home: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(home / "prefect.db") as db:
        return db.execute("select key, type, data from artifact").fetchall()


def test_compare_rerun_ls_show_compare(tmp_path, tiny_dir, capsys):
    """One sequential compare (MEMoE and MEMIT, 2 rounds x 2 edits on a tiny model) and its cached
    rerun, then the commands that read them back."""
    from mlflow import MlflowClient

    from flows.cli import main

    runs, home = tmp_path / "runs", tmp_path / "prefect"
    env = env_for(runs, home) | {"MEMOE_CACHE": str(tmp_path / "cache")}
    cfg = study_config(tmp_path / "a", tiny_dir, steps=5, rounds=2, batch=2)
    raw = yaml.safe_load(cfg.read_text())
    raw["methods"] = [
        raw.pop("method"),
        {
            "name": "memit",
            "layers": [1, 2],
            "fact_token": "last",
            "corpus": "pydoc",
            "mom2_tokens": 20000,
            "mom2_seq_len": 64,
            "v_steps": 5,
        },
    ]
    cfg.write_text(yaml.safe_dump(raw))
    res, p = memoe_run(
        cfg, tmp_path / "out", env, "--name", "first-study", "--tag", "owner=ann", "--tag", "k=v=w", timeout=900
    )
    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    parent = client.get_run(res["mlflow"]["run_id"])
    eid = parent.info.experiment_id
    assert parent.info.run_name == "first-study"
    assert parent.data.tags["owner"] == "ann" and parent.data.tags["k"] == "v=w"

    # MEMIT's key statistics are a one-time cost, reported apart from the per-edit cost
    memit = res["methods"]["memit"]
    setup, train = memit["costs"]["setup_s"], memit["timings"]["train_compute"]
    assert setup > 0 and memit["rounds"][0]["train"]["setup_s"] > 0
    assert memit["costs"]["edit_s_per_100"] == pytest.approx(100 * (train - setup) / 4, abs=0.16)  # rounding
    assert res["methods"]["memoe"]["costs"]["setup_s"] == 0
    assert "setup s" in p.stdout

    # the parent run: each method's headline metrics and costs, no default `method.*` params
    m = parent.data.metrics
    assert m["memoe.reliability"] == pytest.approx(res["methods"]["memoe"]["final"]["reliability"])
    assert m["memit.setup_s"] == pytest.approx(setup) and "memit.edit_s_per_100" in m and "memit.avg" in m
    assert not any(k.startswith("method.") for k in parent.data.params), parent.data.params
    assert parent.data.params["methods.memit.layers"] == "[1, 2]"

    # rounds numbered alike: 1 and 2 in results.json and in MLflow
    kids = {
        k.info.run_name: k for k in client.search_runs([eid], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    }
    assert set(kids) == {"memoe", "memit"}
    rounds = client.search_runs([eid], f"tags.`mlflow.parentRunId` = '{kids['memoe'].info.run_id}'")
    assert sorted((k.info.run_name, k.data.tags["memoe.round"]) for k in rounds) == [("round-1", "1"), ("round-2", "2")]
    assert [r["round"] for r in res["methods"]["memoe"]["rounds"]] == [1, 2]

    # plots: the comparison and one retention curve per method
    out = tmp_path / "out"
    assert (out / "retention.png").stat().st_size > 1000 and (out / "comparison.png").stat().st_size > 1000

    # the flow run's results table and the MLflow link as Prefect artifacts
    arts = _prefect_artifacts(home)
    kinds = {k: t for k, t, _ in arts}
    assert kinds == {"memoe-results": "table", "memoe-mlflow": "markdown"}, kinds  # a link artifact is markdown
    table = json.loads(json.loads(next(d for k, _, d in arts if k == "memoe-results")))
    assert [r["method"] for r in table] == ["memoe", "memit"] and "setup_s" in table[1]
    assert any(parent.info.run_id in d for k, _, d in arts if k == "memoe-mlflow")

    # a cached rerun is marked as a rerun of the first (and `memoe ls` hides it)
    again, _ = memoe_run(cfg, tmp_path / "out2", env, timeout=900)
    rerun = client.get_run(again["mlflow"]["run_id"])
    assert rerun.data.tags["memoe.rerun_of"] == parent.info.run_id and rerun.data.tags["memoe.cached_rerun"] == "true"
    assert rerun.info.run_name == "memoe+memit-sequential-2x2-zsre-" + Path(tiny_dir).name + " (rerun)"

    # memoe ls: the study (the rerun hidden), its methods below it; CSV
    capsys.readouterr()
    assert main(["ls", "--runs-dir", str(runs), "--csv", str(tmp_path / "ls.csv")]) == 0
    text = capsys.readouterr().out
    assert "first-study" in text and "(rerun)" not in text and "└ memoe" in text and "└ memit" in text, text
    assert parent.info.run_id[:8] in text and "seq 2x2" in text
    listing = pl.read_csv(tmp_path / "ls.csv")
    assert listing.filter(pl.col("name") == "  └ memit")["reliability"].to_list() == [
        pytest.approx(res["methods"]["memit"]["final"]["reliability"])
    ]
    assert main(["ls", "--runs-dir", str(runs), "--all"]) == 0
    assert "(rerun)" in capsys.readouterr().out

    # memoe show: a study; a method's run with its rounds and failed edits, --csv its per-edit table
    assert main(["show", "first-study", "--runs-dir", str(runs)]) == 0
    text = capsys.readouterr().out
    assert parent.info.run_id in text and "owner=ann" in text and "memit" in text and "setup_s" in text
    memoe_run_id = kids["memoe"].info.run_id
    assert main(["show", memoe_run_id[:10], "--runs-dir", str(runs), "--csv", str(tmp_path / "edits.csv")]) == 0
    text = capsys.readouterr().out
    assert "edits_so_far" in text and "method.steps=5" in text and "failed edits" in text, text
    edits = pl.read_csv(tmp_path / "edits.csv")
    assert edits.columns[:5] == ["id", "subject", "prompt", "target_new", "target_true"], edits.columns
    assert {"generation", "reliability", "generality", "locality", "round_of_edit"} <= set(edits.columns)
    zsre = json.loads(ZSRE.read_text())
    assert edits["prompt"].to_list() == [r["src"] for r in zsre[:4]]

    # memoe compare: two runs side by side (table, CSV, retention plot); a compare alone = its methods
    plot = tmp_path / "curves.png"
    assert (
        main(
            [
                "compare",
                memoe_run_id[:8],
                kids["memit"].info.run_id,
                "--runs-dir",
                str(runs),
                "--plot",
                str(plot),
                "--csv",
                str(tmp_path / "cmp.csv"),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "settings that differ" in text and plot.stat().st_size > 1000
    rows = pl.read_csv(tmp_path / "cmp.csv")
    assert rows["run"].to_list() == ["memoe", "memit"]
    assert rows["reliability"].to_list()[1] == pytest.approx(res["methods"]["memit"]["final"]["reliability"])
    assert main(["compare", "first-study", "--runs-dir", str(runs), "--plot", str(plot)]) == 0
    assert "memit" in capsys.readouterr().out
    assert main(["show", "no-such-run", "--runs-dir", str(runs)]) == 2
