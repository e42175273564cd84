import pytest
import torch

from memoe.config import MEMoEMethod
from memoe.editors import make_editor
from memoe.editors.memoe import MEMoEEditor
from memoe.metrics import evaluate, locality_predictions, summarize, teacher_forced

from .conftest import ZSRE, tiny_model
from .test_adapter import _records

EDITS = dict(prompts=["The mother tongue of Danielle Darrieux is", "Homer's most famous poem is"],
             targets=["Klingon", "Blue Lagoon"], subjects=["Danielle Darrieux", "Homer"])
LOC = "nq question: what is the boiling point of water"
FAST = dict(layers=[2], rank=8, lr=5e-2, steps=60, early_stop_loss=0.05)


def _recs():
    return _records(EDITS["prompts"], EDITS["targets"], EDITS["subjects"])


def test_edit_changes_answer_and_leaves_unanchored_prompt(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    recs = _recs()
    before = teacher_forced(model, tokenizer, EDITS["prompts"], EDITS["targets"]).acc()
    loc_before = model(**tokenizer([LOC], return_tensors="pt")).logits
    ed = make_editor(model, tokenizer, MEMoEMethod(**FAST))
    assert isinstance(ed, MEMoEEditor)
    stats = ed.edit(recs)
    assert stats["loss_final"] < stats["loss_first"] and stats["layer_cache"]
    after = teacher_forced(model, tokenizer, EDITS["prompts"], EDITS["targets"], editor=ed).acc()
    assert max(before) < 0.5 and min(after) == 1.0
    # the rephrase shares the anchor, so the edit carries over; the lower-cased subject still matches
    reph = teacher_forced(model, tokenizer, ["the mother tongue of danielle darrieux is"], ["Klingon"], editor=ed).acc()
    assert reph[0] > 0.0
    with ed.route([LOC]):
        loc_after = model(**tokenizer([LOC], return_tensors="pt")).logits
    assert torch.equal(loc_before, loc_after)
    table = evaluate(model, tokenizer, recs, locality_predictions(model, tokenizer, recs), editor=ed, generation=True)
    s = summarize(table)
    assert s["reliability"] == 1.0 and s["locality"] == 1.0 and s["generation_reliability"] == 1.0


def test_determinism_and_save_load(tokenizer, tmp_path):
    recs = _recs()
    cfg = MEMoEMethod(**{**FAST, "steps": 15, "context_templates": 2, "template_tokens": 4, "expert_sees_anchor": True})
    outs = []
    for _ in range(2):
        model = tiny_model("llama", len(tokenizer))
        ed = MEMoEEditor(model, tokenizer, cfg, seed=3)
        st = ed.edit(recs)
        outs.append((st["loss_final"], teacher_forced(model, tokenizer, EDITS["prompts"], EDITS["targets"], editor=ed).logprob))
    assert outs[0] == outs[1]
    ed.save(tmp_path / "ad")
    fresh_model = tiny_model("llama", len(tokenizer))
    ed2 = MEMoEEditor(fresh_model, tokenizer, cfg, seed=99)
    ed2.load(tmp_path / "ad")
    assert ed2.extractor.subjects == ed.extractor.subjects and ed2.edits_applied == 2
    reph = ["the mother tongue of danielle darrieux is", LOC]
    a = teacher_forced(model, tokenizer, reph, ["Klingon", "x"], editor=ed).logprob
    b = teacher_forced(fresh_model, tokenizer, reph, ["Klingon", "x"], editor=ed2).logprob
    assert a == b


def test_sequential_rounds_replay_and_keep_training(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    recs = _recs()
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(**FAST))
    s1 = ed.edit(recs.head(1))
    s2 = ed.edit(recs.tail(1))
    assert s1["n_replayed"] == 0 and s2["n_replayed"] == 1 and ed.edits_applied == 2
    acc = teacher_forced(model, tokenizer, EDITS["prompts"], EDITS["targets"], editor=ed).acc()
    assert min(acc) == 1.0  # the first round's edit survived the second round


def test_always_mode_acts_without_anchor(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    loc_before = model(**tokenizer([LOC], return_tensors="pt")).logits
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(**{**FAST, "gate_mode": "always", "steps": 10}))
    ed.edit(_recs())
    with ed.route([LOC]):
        loc_after = model(**tokenizer([LOC], return_tensors="pt")).logits
    assert not torch.equal(loc_before, loc_after)  # the paper's formula: every input is touched


@pytest.mark.slow
def test_real_model_three_zsre_edits_flip(real_model):
    from memoe.data import load_edits

    torch.set_num_threads(2)
    model, tok = real_model
    df = load_edits(ZSRE, "zsre")
    recs = (df[0] if isinstance(df, tuple) else df).head(3)
    ed = MEMoEEditor(model, tok, MEMoEMethod(steps=40))
    before = teacher_forced(model, tok, recs["prompt"].to_list(), recs["target_new"].to_list()).acc()
    ed.edit(recs)
    after = teacher_forced(model, tok, recs["prompt"].to_list(), recs["target_new"].to_list(), editor=ed).acc()
    ed.remove()
    assert sum(after) / 3 == 1.0 and sum(before) / 3 < 0.7
