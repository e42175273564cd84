"""The fact gate (``MEMoEMethod(fact_gate=True)``): an edit of a subject's fact leaves the subject's other
facts as the unedited model had them, with no training beyond the edit's own. Its drop-in behaviour
(plain forward, KV cache, save/load, remove) is the contract matrix's ``memoe+fact_gate`` row."""

import pytest
import torch

from memoe.editors.memoe import MEMoEMethod
from memoe.editors.memoe.editor import MEMoEEditor
from memoe.metrics import generate, teacher_forced
from memoe.probes import SCOPE_RELATIONS, add_probes

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
