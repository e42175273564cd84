"""The fact gate (``MEMoEMethod(fact_gate=True)``): an edit of a subject's fact leaves the subject's other
facts as the unedited model had them, with no training beyond the edit's own. Its drop-in behaviour
(plain forward, KV cache, save/load, remove) is the contract matrix's ``memoe+fact_gate`` row."""

import pytest
import torch

from memoe.editors.memoe import MEMoEMethod
from memoe.editors.memoe.editor import MEMoEEditor
from memoe.metrics import generate, teacher_forced
from memoe.probes import SCOPE_RELATIONS, add_probes, chat_prompt

from .conftest import tiny_model
from .test_adapter import _records


def test_gate_layers_must_lie_below_the_adapter(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    with pytest.raises(ValueError, match=r"fact_gate_layers \[3\].*at or below the adapter's layer 2"):
        MEMoEEditor(model, tokenizer, MEMoEMethod(layers=[2], fact_gate=True, fact_gate_layers=[1, 3]))
    with pytest.raises(ValueError, match="needs gate_mode 'anchor'"):
        MEMoEMethod(fact_gate=True, gate_mode="always")


def test_gate_keys_survive_save_and_load(tokenizer, tmp_path):
    model = tiny_model("llama", len(tokenizer))
    cfg = MEMoEMethod(layers=[2], rank=8, lr=5e-2, steps=5, fact_gate=True, fact_gate_layers=[1])
    ed = MEMoEEditor(model, tokenizer, cfg)
    ed.edit(_records(["The capital of Laos is"], ["Yamoussoukro"], ["Laos"]))
    keys, negs = ed.gate.keys["Laos"]
    # the edit prompt in 3 forms; every other scope relation (not "capital": the edit's own) as a template and in
    # the two common shapes, each plain and in the chat template
    assert keys.shape[0] == 3 and negs.shape[0] == 2 * 3 * (len(SCOPE_RELATIONS) - 1)
    ed.save(tmp_path / "ed")
    ed2 = MEMoEEditor(tiny_model("llama", len(tokenizer)), tokenizer, cfg)
    ed2.load(tmp_path / "ed")
    assert torch.equal(ed2.gate.keys["Laos"][0], keys) and torch.equal(ed2.gate.mu, ed.gate.mu)
    with pytest.raises(ValueError, match="fact_gate off"):
        MEMoEEditor(tiny_model("llama", len(tokenizer)), tokenizer, MEMoEMethod(layers=[2], rank=8)).load(
            tmp_path / "ed"
        )


@pytest.mark.parametrize("sentence", [True, False])
def test_the_gate_reads_the_subjects_sentence_only(tokenizer, sentence):
    """An unrelated sentence before the question (CounterFact's paraphrases do this) or a chat template's turns
    stay out of the question's mean: it starts at the subject's sentence, and a plain forward, which knows the row
    only by its ids, finds the same start as its text. ``fact_gate_sentence: false`` means the whole row."""
    model = tiny_model("llama", len(tokenizer))
    cfg = MEMoEMethod(layers=[2], rank=8, steps=2, fact_gate=True, fact_gate_layers=[1], fact_gate_sentence=sentence)
    ed = MEMoEEditor(model, tokenizer, cfg)
    ed.edit(_records(["The capital of Laos is"], ["Yamoussoukro"], ["Laos"]))
    text = "Answer briefly. The capital of Laos is"
    ids = tokenizer(text).input_ids
    ((first, last, begin),) = ed.gate.spans([text], ["Laos"])
    assert tokenizer.decode(ids[begin:]) == (" The capital of Laos is" if sentence else text)
    assert tokenizer.decode(ids[first : last + 1]) == " Laos"
    assert ed.gate.spans(["The capital of Laos is"], ["Laos"])[0][2] == 0
    chat = chat_prompt(tokenizer, "What is the capital of Laos?")
    c = tokenizer(chat).input_ids
    assert tokenizer.decode(c[ed.gate.spans([chat], ["Laos"])[0][2] :]).startswith(
        "What is the capital" if sentence else chat[:20]
    )
    skip = ed.gate.skip_mask(torch.ones(1, len(ids), dtype=torch.bool), [(first, last, begin)], 0, len(ids))
    assert skip[0, :begin].all() and skip[0, first : last + 1].all() and not skip[0, last + 1 :].any()
    assert bool(skip[0, begin]) == (begin == 0)  # the row's first token (the attention sink) is always left out
    enc = tokenizer([text, chat], return_tensors="pt", padding=True)
    plain = ed._auto_context(enc.input_ids, enc.attention_mask)["scope"]
    assert plain == ed._context([text, chat], ed.anchors_for([text, chat]))["scope"]
    assert plain[0] == ("Laos", first, last, begin)


@pytest.mark.slow
def test_the_gate_keeps_the_subjects_other_facts(real_model):
    """On the embedded model, in plain forwards and generate calls: the edits hold, and the subject's
    other relations (the probes' relations, which the gate never saw) keep the unedited model's
    continuations, where the subject-keyed adapter spills the new target onto them."""
    model, tok = real_model
    recs = add_probes(
        _records(["The capital of Laos is", "The capital of Iraq is"], ["Yamoussoukro", "Ankara"], ["Laos", "Iraq"]),
        tok,
        n_specificity=6,
    )
    others = [q for qs in recs["specificity_prompts"] for q in qs]
    before = generate(model, tok, others, max_new_tokens=3)
    out = {}
    for name, over in (("subject", {}), ("fact", {"fact_gate": True})):
        ed = MEMoEEditor(model, tok, MEMoEMethod(**over))
        try:
            ed.edit(recs)
            rel = teacher_forced(model, tok, recs["prompt"].to_list(), recs["target_new"].to_list()).acc()
            kept = sum(a == b for a, b in zip(generate(model, tok, others, max_new_tokens=3), before))
            out[name] = (min(rel), kept)
        finally:
            ed.remove()
    assert len(others) == 12
    assert out["fact"][0] == 1.0 and out["subject"][0] == 1.0, out  # the edits hold either way
    assert out["fact"][1] >= 11, out
    assert out["subject"][1] < out["fact"][1], out


@pytest.mark.slow
def test_the_gate_scan_reports_each_margins_decisions(capsys):
    """scripts/gate_scan.py on a few held-out records: one line per margin, every rate a fraction, and a higher
    margin never opens the gate more (rephrases open less often, specificity probes stay shut more often)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gate_scan.py"
    spec = importlib.util.spec_from_file_location("gate_scan", path)
    scan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scan)
    assert scan.main(["--data", "zsre", "--start", "600", "--n", "6", "--margins=-0.2,0.2"]) == 0
    low, high = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert (low["margin"], high["margin"]) == (-0.2, 0.2)
    cols = ["prompt", "rephrase_prompts", "restyled_prompts", "chat_prompts", "specificity_prompts", "mean"]
    assert all(0.0 <= r[c] <= 1.0 for r in (low, high) for c in cols)
    assert high["rephrase_prompts"] <= low["rephrase_prompts"] and high["restyled_prompts"] <= low["restyled_prompts"]
    assert high["specificity_prompts"] >= low["specificity_prompts"]
    assert high["mean"] != low["mean"]  # the margin really moves the decisions
    assert low["prompt"] == 1.0  # the edit prompt itself is a key: it opens at any margin below 0
