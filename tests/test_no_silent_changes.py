"""Data and settings are used as written or refused with an error naming the place (issue 18,
items 4-6): the CSV/JSONL reader keeps every byte of a cell, settings the model or the data cannot
honour are errors naming the key, and bad input is an error, never a traceback or a silent change."""

from __future__ import annotations

import csv
import json
import re

import pytest

from memoe.checks import check_layers
from memoe.config import ConfigError, load_config
from memoe.data import EditDataError, load_edits

# ------------------------------------------------------------------ item 4: the reader keeps the data


def test_csv_keeps_newlines_inside_quoted_cells_and_counts_lines(tmp_path):
    p = tmp_path / "d.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject", "prompt", "target_new"])
        w.writerow(["Widget0 Corp", "The CEO of\nWidget0 Corp\nis", "Alice"])
        w.writerow(["Paris", "Paris is in", ""])  # starts on line 5 of the file
    with pytest.raises(EditDataError, match=r"d.csv, record line 5, field 'target_new'"):
        load_edits(p, "csv")
    df, _ = load_edits(p, "csv", skip_bad=True)
    assert df["prompt"].to_list() == ["The CEO of\nWidget0 Corp\nis"]


def test_csv_keeps_a_carriage_return_inside_a_cell(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b'subject,prompt,target_new\r\nParis,"Paris\ris in",Italy\r\n')
    df, _ = load_edits(p, "csv")
    assert df["prompt"].to_list() == ["Paris\ris in"]


def test_jsonl_allows_unicode_line_separators_inside_strings(tmp_path):
    p = tmp_path / "d.jsonl"
    recs = [
        {"subject": "Paris", "prompt": "Paris\u2028is in", "target_new": "Italy"},
        {"subject": "Rome", "prompt": "Rome\u0085is in", "target_new": "Spain"},
    ]
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n", encoding="utf-8")
    df, _ = load_edits(p, "jsonl")
    assert df["prompt"].to_list() == ["Paris\u2028is in", "Rome\u0085is in"]
    p.write_text(p.read_text(encoding="utf-8") + '{"subject": "X"\n', encoding="utf-8")
    with pytest.raises(EditDataError, match=r"record line 3: malformed JSON"):
        load_edits(p, "jsonl")


# ------------------------------------------------------------------ item 6: bad data is a clear error


def test_non_utf8_is_named_and_a_bom_is_read(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"subject": "Caf\xe9", "prompt": "Caf\xe9 is in", "target_new": "Paris"}\n')
    with pytest.raises(EditDataError, match=r"d.jsonl: not UTF-8"):
        load_edits(p, "jsonl")
    p.write_bytes(
        b"\xef\xbb\xbf"
        + json.dumps({"subject": "Paris", "prompt": "Paris is in", "target_new": "Italy"}).encode()
        + b"\n"
    )
    assert load_edits(p, "jsonl")[0].height == 1
    c = tmp_path / "d.csv"
    c.write_bytes(b"\xef\xbb\xbfsubject,prompt,target_new\nParis,Paris is in,Italy\n")
    assert load_edits(c, "csv")[0]["subject"].to_list() == ["Paris"]


def test_yaml_non_utf8_is_named_and_a_bom_is_read(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"data:\n  seed: 1  # \xff\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not UTF-8"):
        load_config(p)
    p.write_bytes(b"\xef\xbb\xbfdata:\n  seed: 1\n")
    assert load_config(p).data.seed == 1


def _cf(prompt="{} was born in", **rw):
    r = {
        "case_id": 0,
        "requested_rewrite": {
            "prompt": prompt,
            "subject": "Ada",
            "target_new": {"str": "Paris"},
            "target_true": {"str": "London"},
        },
    }
    r["requested_rewrite"].update(rw)
    return r


def test_counterfact_template_needs_exactly_one_placeholder(tmp_path):
    p = tmp_path / "cf.json"
    p.write_text(json.dumps([_cf("{} met {} in")]))
    with pytest.raises(EditDataError, match=r"record 0, field 'requested_rewrite.prompt': prompt template has 2"):
        load_edits(p, "counterfact")
    p.write_text(json.dumps([_cf("{} was born in {city}")]))  # other braces are text, not a format field
    assert load_edits(p, "counterfact")[0]["prompt"].to_list() == ["Ada was born in {city}"]


@pytest.mark.parametrize(
    "fmt, rec, field",
    [
        (
            "counterfact-flat",
            {"subject": "Ada", "prompt": "Ada was born in", "target_new": "Paris", "ground_truth": ["London"]},
            "ground_truth",
        ),
        (
            "jsonl",
            {"subject": "Ada", "prompt": "Ada was born in", "target_new": "Paris", "target_true": 5},
            "target_true",
        ),
        ("zsre", {"subject": "Ada", "src": "Where was Ada born?", "alt": "Paris", "answers": [5]}, "answers"),
    ],
)
def test_non_string_answers_are_errors_naming_the_field(tmp_path, fmt, rec, field):
    p = tmp_path / ("d.jsonl" if fmt == "jsonl" else "d.json")
    p.write_text(json.dumps(rec) + "\n" if fmt == "jsonl" else json.dumps([rec]))
    with pytest.raises(EditDataError, match=rf"field '{field}': expected a"):
        load_edits(p, fmt)


@pytest.mark.parametrize(
    "subject, prompt, ok",
    [
        ("corp", "The CEO of Widget Corporation is", False),  # inside a word: not the subject
        ("Widget Corp", "The CEO of widget corp. is", True),  # case and punctuation tolerant
        ("...", "The CEO of ... is", False),  # no letters or digits
    ],
)
def test_subject_check_matches_whole_words(tmp_path, subject, prompt, ok):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"subject": subject, "prompt": prompt, "target_new": "Alice"}) + "\n")
    if ok:
        assert load_edits(p, "jsonl")[0].height == 1
    else:
        with pytest.raises(EditDataError, match=r"field 'subject'"):
            load_edits(p, "jsonl")


# ------------------------------------------------------------------ item 5: settings are honoured or refused


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.layers=[]"], "method.layers"),
        (["methods=[]"], "methods"),
        (["method.lr=-5"], "method.lr"),
        (["eval.retention_sample=-1"], "eval.retention_sample"),
        (["model.device=tpu"], "model.device"),
        (["protocol.batch_size=5"], "protocol.batch_size applies to sequential mode only"),
        (["protocol.rounds=3"], "protocol.rounds=3 applies to sequential mode only"),
        (
            ["protocol.mode=sequential", "protocol.rounds=3", "protocol.batch_size=5", "data.n_edits=7"],
            "data.n_edits=7 but protocol.rounds x protocol.batch_size = 3 x 5 = 15",
        ),
        (["protocol.mode=sequential", "protocol.rounds=3", "data.n_edits=7"], "not a multiple of protocol.rounds=3"),
        (["method.name=memit", "method.layers=[]"], "method.layers"),
        (["method.name=lora", "method.layers=[]"], "method.layers"),
    ],
)
def test_settings_that_cannot_be_honoured_are_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_n_edits_follows_the_protocol_when_not_given(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("protocol:\n  mode: sequential\n  rounds: 3\n  batch_size: 2\n")
    assert load_config(p).data.n_edits == 6  # logged as what runs, not the default 100


@pytest.mark.parametrize(
    "method, key",
    [
        ({"name": "memoe", "layers": [99]}, "method.layers[0]"),
        ({"name": "memoe", "layers": [1, -31]}, "method.layers[1]"),
        ({"name": "ft-m", "layer": 30}, "method.layer"),
        ({"name": "grace", "layer": 40}, "method.layer"),
        ({"name": "wise", "layer": -31}, "method.layer"),
        ({"name": "memit", "layers": [4, 30]}, "method.layers[1]"),
    ],
)
def test_out_of_range_layers_are_errors_naming_the_key(method, key):
    from pydantic import TypeAdapter

    from memoe.config import MethodConfig

    m = TypeAdapter(MethodConfig).validate_python(method)
    with pytest.raises(ConfigError, match=re.escape(key) + r": layer .* out of range: the model has 30 decoder layers"):
        check_layers(m, 30)
    check_layers(TypeAdapter(MethodConfig).validate_python({"name": method["name"]}), 30)  # defaults fit
    check_layers(TypeAdapter(MethodConfig).validate_python({"name": "memoe", "layers": [-1, 29]}), 30)


def test_make_editor_refuses_a_layer_the_model_lacks(tiny):
    from memoe.editors import make_editor
    from memoe.editors.memoe import MEMoEMethod

    model, tok = tiny
    with pytest.raises(ConfigError, match=r"method.layers\[0\]: layer 9 is out of range"):
        make_editor(model, tok, MEMoEMethod(layers=[9]))  # 4 layers: once trained layer 9 % 4 = 1
