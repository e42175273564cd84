"""docs/extending.md works as written: its method package (three files, written to a temporary folder
and imported as ``memoe.editors.delta``) registers, validates in a config and passes the core of the
editor contract with the settings of its test-matrix row; its data format parses a file; its metric is
a column of the evaluation. Everything registered here is unregistered again."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import memoe.editors
from memoe.config import load_config
from memoe.data import FORMATS, load_edits
from memoe.methods import METHODS, unregister_method
from memoe.metric_registry import REGISTRY as METRIC_REGISTRY

from .conftest import tiny_model
from .test_contract import Case, records, rel

DOC = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), re.S)


def section(title: str) -> list[str]:
    part = DOC.read_text().split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", part, re.S)


@pytest.fixture
def delta_package(tmp_path):
    pkg = tmp_path / "delta"
    pkg.mkdir()
    for code in section("A method"):
        name = re.match(r"# memoe/editors/delta/(\w+\.py)\n", code).group(1)
        (pkg / name).write_text(code)
    memoe.editors.__path__.append(str(tmp_path))
    try:
        module = importlib.import_module("memoe.editors.delta")
        yield module
    finally:
        if "delta" in METHODS:
            unregister_method(METHODS["delta"].config)
        memoe.editors.__path__.remove(str(tmp_path))
        for m in [m for m in sys.modules if m.startswith("memoe.editors.delta")]:
            del sys.modules[m]


def test_the_documented_method_registers_and_keeps_the_contract(delta_package, tokenizer, tmp_path):
    from memoe.editors import make_editor

    assert "delta" in METHODS and sorted(p.name for p in (tmp_path / "delta").iterdir() if p.suffix == ".py") == [
        "__init__.py",
        "config.py",
        "editor.py",
    ]
    cfg = load_config(None, ["method.name=delta", "method.lr=0.1"])
    assert type(cfg.method).__name__ == "DeltaMethod" and cfg.method.lr == 0.1
    row = re.search(r'"delta": (Case\(.*\)),', blocks("text")[0]).group(1)
    case = eval(row, {"Case": Case, "DeltaMethod": type(cfg.method)})  # the documented test-matrix row
    model = tiny_model("llama", len(tokenizer))
    recs = records()
    probe = tokenizer(["The mother tongue of Danielle Darrieux is"], return_tensors="pt")
    before = model(**probe).logits
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    ed = make_editor(model, tokenizer, case.settings(model), seed=0)
    steps = []
    ed.on_step = lambda step, loss: steps.append(step)
    res = ed.edit(recs)
    assert res.steps == len(steps) >= 1 and res.loss_final < res.loss_first and "delta_norm" in res.as_dict()
    assert rel(model, tokenizer, recs, ed) >= case.rel  # the edit changes the answers
    edited = model(**probe).logits  # a plain forward applies it
    assert not torch.equal(edited, before)
    ed.save(tmp_path / "state")
    ed.remove()
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items()) and torch.equal(
        model(**probe).logits, before
    )
    again = make_editor(model, tokenizer, case.settings(model), seed=0)
    again.load(tmp_path / "state")
    assert torch.equal(model(**probe).logits, edited)  # save/load reproduces the edited outputs
    again.remove()


def test_the_documented_data_format_parses_a_file(tmp_path):
    (code,) = section("A data format")
    try:
        exec(code, {})
        path = tmp_path / "people.jsonl"
        path.write_text(
            "\n".join(
                json.dumps(r)
                for r in [{"who": "Ada Lovelace", "where": "Paris"}, {"who": "Alan Turing", "where": "Rome"}]
            )
        )
        df, report = load_edits(path, "people")
        assert df["prompt"].to_list() == ["Ada Lovelace lives in", "Alan Turing lives in"]
        assert df["rephrase_prompts"].to_list()[1] == ["The home of Alan Turing is"] and report.n_kept == 2
        assert load_config(None, [f"data.path={path}", "data.format=people"]).data.format == "people"
    finally:
        FORMATS.pop("people", None)


def test_the_documented_metric_is_a_column_of_the_evaluation(tokenizer):
    from memoe.metrics import evaluate, summarize

    (code,) = section("A metric")
    try:
        exec(code, {})
        table = evaluate(tiny_model("llama", len(tokenizer)), tokenizer, records(), generation=False)
        assert table["first_token"].len() == 3 and "first_token" in summarize(table)
    finally:
        if "first_token" in METRIC_REGISTRY:
            del METRIC_REGISTRY["first_token"]
