"""The hard probes (memoe/probes.py), their metrics, and MEMoE's relation-aware scope."""

import polars as pl
import pytest

from memoe.editors.memoe import MEMoEMethod
from memoe.editors.memoe.editor import MEMoEEditor
from memoe.metrics import evaluate, locality_predictions, summarize, teacher_forced
from memoe.probes import (
    PROBE_RELATIONS,
    SCOPE_RELATIONS,
    add_probes,
    chat_prompt,
    relation_templates,
    restyle,
    scope_negatives,
)

from .conftest import tiny_model
from .test_adapter import _records


def test_probe_and_scope_relations_are_disjoint():
    probe_t = {t for _, t in PROBE_RELATIONS}
    scope_t = {t for _, t in SCOPE_RELATIONS}
    assert not probe_t & scope_t
    assert not {k[0] for k, _ in PROBE_RELATIONS} & {k[0] for k, _ in SCOPE_RELATIONS}


def test_templates_skip_the_edited_relation():
    prompt, subj = "What is the capital of Laos?", "Laos"
    negs = scope_negatives(prompt, subj, len(SCOPE_RELATIONS))
    assert negs and all("Laos" in q for q in negs)
    assert not any("capital" in q for q in negs)
    probes = relation_templates("The currency of Laos is", subj, PROBE_RELATIONS, len(PROBE_RELATIONS))
    assert not any("currency" in q for q in probes) and len(probes) == len(PROBE_RELATIONS) - 1
    # a fixed choice per record, different across records
    assert relation_templates(prompt, subj, PROBE_RELATIONS, 3, "a") == relation_templates(
        prompt, subj, PROBE_RELATIONS, 3, "a"
    )


def test_restyle_and_chat(tokenizer):
    q, s = "What is the capital of Laos?", "Laos"
    assert restyle(q, s, 0) == "What is the capital of laos?"
    assert restyle(q, s, 1) == "What is the capital of LAOS?"
    assert restyle(q, s, 2).endswith(q) and len(restyle(q, s, 2)) > len(q) + 5
    c = chat_prompt(tokenizer, q)
    assert q in c and c.index(q) < len(c) - len(q) and c.rstrip().endswith("assistant")


def test_add_probes_columns(tokenizer):
    recs = _records(["The mother tongue of Danielle Darrieux is"], ["Klingon"], ["Danielle Darrieux"])
    out = add_probes(recs, tokenizer)
    row = out.row(0, named=True)
    assert len(row["specificity_prompts"]) == 3 and all("Danielle Darrieux" in p for p in row["specificity_prompts"])
    assert not any("language" in p for p in row["specificity_prompts"])  # "tongue": the edited relation
    # CounterFact's religion prompts ("X is follower of") ask what the religion probe asks: never a probe of theirs
    follower = "Muhammad Jamalul Alam II is follower of"
    assert not any(
        "religion" in q for q in relation_templates(follower, "Muhammad Jamalul Alam II", PROBE_RELATIONS, 14)
    )
    assert len(row["restyled_prompts"]) == 3 and len(row["chat_prompts"]) == 1
    assert add_probes(recs, tokenizer).equals(out)  # deterministic
    assert add_probes(recs, None)["chat_prompts"].to_list() == [[]]  # no tokenizer: no chat probe


EDITS = (
    ["The mother tongue of Danielle Darrieux is", "Homer's most famous poem is"],
    ["Klingon", "Blue Lagoon"],
    ["Danielle Darrieux", "Homer"],
)
FAST = dict(layers=[2], rank=8, lr=5e-2, steps=100, early_stop_loss=0.05)


def _edited(tokenizer, **over):
    model = tiny_model("llama", len(tokenizer))
    recs = add_probes(_records(*EDITS), tokenizer)
    base = locality_predictions(model, tokenizer, recs)
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(**{**FAST, **over}))
    ed.edit(recs)
    return model, recs, base, ed


@pytest.mark.slow
def test_scope_keeps_the_subjects_other_facts(real_model):
    """On the embedded model: with scope negatives the edit holds and the subject's other relations that it
    was trained to leave alone keep more of the unedited model's answers than without them (where the edit
    leaks onto them). Relations never trained on are the probes' job (``specificity``)."""
    from memoe.metrics import generate

    model, tok = real_model
    recs = add_probes(
        _records(["The capital of Laos is", "The capital of Iraq is"], ["Yamoussoukro", "Ankara"], ["Laos", "Iraq"]),
        tok,
    )
    probe = MEMoEEditor(model, tok, MEMoEMethod(scope_negatives=6))
    negs = [q for q, _ in probe.scope_rows(list(zip(recs["prompt"], recs["target_new"], recs["subject"])))]
    probe.remove()
    before = generate(model, tok, negs, max_new_tokens=3)
    out = {}
    for name, over in (("subject", {}), ("relation", {"scope_negatives": 6, "scope_stop_loss": 0.002})):
        ed = MEMoEEditor(model, tok, MEMoEMethod(**over))
        try:
            ed.edit(recs)
            rel = teacher_forced(model, tok, recs["prompt"].to_list(), recs["target_new"].to_list()).acc()
            out[name] = (rel, sum(a == b for a, b in zip(generate(model, tok, negs, max_new_tokens=3), before)))
        finally:
            ed.remove()
    assert len(negs) == 12
    for name in out:
        assert min(out[name][0]) == 1.0, name  # the edit holds either way (a plain forward: drop-in)
    assert out["relation"][1] >= 8, out  # measured: 9 of 12 (and 1 of 12 without scope)
    assert out["subject"][1] < out["relation"][1], out


def test_specificity_metric_sees_a_subject_wide_edit(tokenizer):
    model, recs, base, ed = _edited(tokenizer)
    s = summarize(evaluate(model, tokenizer, recs, base, editor=ed, generation=False))
    assert s["reliability"] == 1.0
    for k in ("specificity", "restyled_generality", "chat_generality", "fact_avg"):
        assert k in s
    assert s["specificity"] < 1.0  # the unscoped adapter changes the subject's other facts
    ed.remove()
    s0 = summarize(evaluate(model, tokenizer, recs, base, generation=False))
    assert s0["specificity"] == 1.0 and s0["locality"] == 1.0  # the unedited model agrees with itself


def test_specificity_needs_base_predictions(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    recs = add_probes(_records(*EDITS), tokenizer)
    base = locality_predictions(model, tokenizer, recs.drop("specificity_prompts"))
    assert "spec_base_pred" not in base.columns
    table = evaluate(model, tokenizer, recs, base, generation=False)
    assert "specificity" not in table.columns and "chat_generality" in table.columns
    assert isinstance(table, pl.DataFrame)
