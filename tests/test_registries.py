"""One registry per concept (methods, data formats, metrics): duplicates refused, and what lists a
concept's names reads its registry (config validation, load_edits, METRICS / HEADLINE)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import polars as pl
import pytest

from memoe.config import METHODS, ConfigError, load_config, register_method, unregister_method, validate_method
from memoe.data import FORMATS, load_edits, register_format
from memoe.editors.base import Editor, EditResult
from memoe.editors.ft import FTMethod
from memoe.editors.memoe import MEMoEMethod
from memoe.methods import Strict
from memoe.metric_registry import HEADLINE, METRICS, register_metric
from memoe.metric_registry import REGISTRY as METRIC_REGISTRY
from memoe.registry import Registry

README = Path(__file__).resolve().parent.parent / "README.md"


class ToyMethod(Strict):
    name: Literal["toy"] = "toy"
    strength: float = 1.0


class ToyEditor(Editor):
    def edit(self, records: pl.DataFrame) -> EditResult:
        return EditResult(steps=0, loss_first=None, loss_final=None, seconds=0.0, n_edits=records.height)

    def state_dict(self):
        return {}

    def load_state_dict(self, state) -> None:
        pass


@pytest.fixture
def toy_method():
    register_method(ToyMethod, ToyEditor)
    try:
        yield
    finally:
        unregister_method(ToyMethod)


def _toy_parser(rec, path, rid) -> dict:
    return dict(
        id=str(rid),
        subject=rec["who"],
        prompt=f"{rec['who']} lives in",
        target_new=rec["where"],
        target_true=None,
        rephrase_prompts=[],
        locality_prompts=[],
        locality_answers=[],
        portability_prompts=[],
        portability_answers=[],
        generation_prompts=[],
    )


@pytest.fixture
def toy_format():
    register_format("toy", _toy_parser)
    try:
        yield
    finally:
        del FORMATS["toy"]


def test_a_registry_refuses_a_duplicate_name():
    r = Registry("thing")
    r["a"] = 1
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        r["a"] = 2
    assert r == {"a": 1}


def test_each_registry_refuses_a_duplicate_name():
    before = dict(METHODS)
    with pytest.raises(ValueError, match="method 'memoe' is already registered"):
        register_method(MEMoEMethod, ToyEditor)
    with pytest.raises(ValueError, match="method 'ft-l' is already registered"):  # either of its names
        register_method(FTMethod, ToyEditor)
    assert METHODS == before
    with pytest.raises(ValueError, match="data format 'zsre' is already registered"):
        register_format("zsre", _toy_parser)
    with pytest.raises(ValueError, match="metric 'reliability' is already registered"):
        register_metric("reliability", "again")


def test_a_method_registered_in_a_test_is_validated_by_the_config(toy_method):
    cfg = load_config(None, ["method.name=toy", "method.strength=2"])
    assert isinstance(cfg.method, ToyMethod) and cfg.method.strength == 2.0
    assert isinstance(validate_method({"name": "toy"}), ToyMethod)
    cfg = load_config(None, ["methods=[{name: toy}, {name: memoe}]"])
    assert [type(m) for m in cfg.methods] == [ToyMethod, MEMoEMethod]
    with pytest.raises(ConfigError, match=r"method\.strength: Input should be a valid number"):  # no tag in the path
        load_config(None, ["method.name=toy", "method.strength=x"])
    with pytest.raises(ConfigError, match="unknown key 'method.rank'"):
        load_config(None, ["method.name=toy", "method.rank=3"])
    assert METHODS["toy"].editor_class() is ToyEditor and METHODS["toy"].editor_module == __name__


def test_the_method_union_is_back_after_the_test():
    assert "toy" not in METHODS
    with pytest.raises(ConfigError, match="expected tags: 'ft-l', 'ft-m', 'grace', 'lora', 'memit', 'memoe', 'wise'"):
        load_config(None, ["method.name=toy"])


def test_the_api_names_an_unknown_method_with_the_registered_ones():
    from memoe.api import method_config

    with pytest.raises(ConfigError, match="method: name: Input tag 'toy' .* expected tags: 'ft-l', 'ft-m'"):
        method_config("toy")


def test_an_edit_result_is_one_flat_dict_and_keeps_the_shared_names():
    r = EditResult(steps=3, loss_first=2.0, loss_final=0.5, seconds=1.5, n_edits=2, details={"block": 0})
    assert r.as_dict() == {
        "steps": 3,
        "loss_first": 2.0,
        "loss_final": 0.5,
        "seconds": 1.5,
        "n_edits": 2,
        "setup_s": 0.0,
        "block": 0,
    }
    with pytest.raises(ValueError, match=r"repeats shared fields: \['steps'\]"):
        EditResult(steps=3, loss_first=2.0, loss_final=0.5, seconds=1.5, n_edits=2, details={"steps": 4})


def test_the_built_in_methods_and_their_capabilities():
    # one package each under memoe/editors/, found and registered by memoe.methods.discover
    assert sorted(METHODS) == ["ft-l", "ft-m", "grace", "lora", "memit", "memoe", "wise"]
    for name, m in METHODS.items():
        cls = m.editor_class()
        assert issubclass(cls, Editor) and cls.__module__ == m.editor_module, name
        assert cls.uses_anchors == (name == "memoe"), name
        assert (cls.diagnostics is Editor.diagnostics) == (name != "memoe"), name  # only MEMoE has its own


def test_a_format_registered_in_a_test_is_accepted_by_the_config_and_load_edits(toy_format, tmp_path):
    assert load_config(None, ["data.format=toy"]).data.format == "toy"
    p = tmp_path / "toy.json"
    p.write_text(json.dumps([{"who": "Ada", "where": "Paris"}]))
    df, report = load_edits(p, "toy")
    assert df["prompt"].to_list() == ["Ada lives in"] and report.n_kept == 1


def test_an_unregistered_format_is_refused_by_name():
    with pytest.raises(
        ConfigError,
        match=r"data.format: Input should be 'zsre', 'counterfact', 'counterfact-flat', "
        r"'jsonl' or 'csv' \(got 'toy'\)",
    ):
        load_config(None, ["data.format=toy"])


def test_metrics_and_headline_are_derived_from_the_metric_registry():
    from flows import report
    from memoe import metrics

    assert (
        METRICS
        == list(METRIC_REGISTRY)
        == metrics.METRICS
        == [
            "reliability",
            "generality",
            "locality",
            "specificity",
            "restyled_generality",
            "chat_generality",
            "portability",
            "generation_reliability",
            "efficacy",
            "paraphrase",
            "neighborhood",
            "locality_conflicts",
            "fluency",
            "reedit_reliability",
            "overwritten_reliability",
            "overwritten_preferred",
            "overwritten_generation",
        ]
    )
    assert (
        HEADLINE
        == report.HEADLINE
        == [n for n, m in METRIC_REGISTRY.items() if m.headline]
        == METRICS[:8] + ["reedit_reliability", "overwritten_reliability"]
    )
    register_metric("toy_score", "a test's metric", headline=True)
    try:
        assert METRICS[-1] == HEADLINE[-1] == report.HEADLINE[-1] == "toy_score"
        assert metrics.summarize(pl.DataFrame({"reliability": [1.0], "toy_score": [0.5]}))["toy_score"] == 0.5
    finally:
        del METRIC_REGISTRY["toy_score"]
    assert "toy_score" not in METRICS + HEADLINE


def test_the_readme_names_every_registered_metric_and_format():
    text = README.read_text()
    metrics_part = text.split("## What the metrics mean", 1)[1].split("\n## ", 1)[0]
    assert [m for m in METRICS if f"`{m}`" not in metrics_part] == []
    formats_part = text.split("## Data formats", 1)[1].split("\n## ", 1)[0]
    assert [f for f in FORMATS if not re.search(rf"`{re.escape(f)}`", formats_part)] == []


def test_a_metric_is_one_function_registered_with_its_name(tokenizer):
    """A metric registered with a compute function is a column of ``evaluate``'s table (and averaged by
    ``summarize``) with no other change; its function sees the records and shares the scoring primitives."""
    from memoe import metrics
    from tests.conftest import tiny_model
    from tests.test_contract import records

    model, recs = tiny_model("llama", len(tokenizer)), records()

    def first_token(s):  # the edit prompt's first target token predicted, from the memoised scoring
        res = s.tf(s.records["prompt"].to_list(), s.records["target_new"].to_list())
        return [float(p[0] == t[0]) for p, t in zip(res.pred, res.target)]

    register_metric("first_token", "a test's metric", compute=first_token)
    register_metric("too_short", "a test's broken metric", compute=lambda s: [1.0])
    try:
        with pytest.raises(ValueError, match="'too_short' returned 1 values for 3 records"):
            metrics.evaluate(model, tokenizer, recs, generation=False)
        del METRIC_REGISTRY["too_short"]
        table = metrics.evaluate(model, tokenizer, recs, generation=False)
        tf = metrics.teacher_forced(model, tokenizer, recs["prompt"].to_list(), recs["target_new"].to_list())
        assert table["first_token"].to_list() == [float(p[0] == t[0]) for p, t in zip(tf.pred, tf.target)]
        assert metrics.summarize(table)["first_token"] == pytest.approx(table["first_token"].mean())
    finally:
        for name in ("first_token", "too_short"):
            if name in METRIC_REGISTRY:
                del METRIC_REGISTRY[name]
    assert "first_token" not in metrics.evaluate(model, tokenizer, recs, generation=False).columns
