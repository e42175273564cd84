"""The edited model works wherever it is used: a plain forward, ``generate`` (left padding, KV cache),
a transformers pipeline and a saved-and-reloaded copy give what memoe's own evaluation path gives."""

import json

import pytest
import torch

from memoe.editors import load_edited
from memoe.editors.memoe import MEMoEMethod
from memoe.editors.memoe.editor import MEMoEEditor
from memoe.metrics import evaluate, generate, locality_predictions, summarize, teacher_forced
from memoe.probes import add_probes

from .conftest import ZSRE, tiny_model
from .test_adapter import _records

PROMPTS = ["The mother tongue of Danielle Darrieux is", "Homer's most famous poem is"]
TARGETS = ["Klingon", "Blue Lagoon"]
SUBJECTS = ["Danielle Darrieux", "Homer"]
FAST = dict(layers=[2], rank=8, lr=5e-2, steps=100, early_stop_loss=0.05)
OTHER = [
    "the mother tongue of danielle darrieux is",
    "nq question: what is the boiling point of water",
    "Everyone knows that Homer's most famous poem is",
]


@pytest.fixture(scope="module")
def edited(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(**FAST))
    ed.edit(_records(PROMPTS, TARGETS, SUBJECTS))
    return model, tokenizer, ed


def test_plain_forward_equals_route(edited):
    model, tok, ed = edited
    texts, tgts = PROMPTS + OTHER, TARGETS + ["Klingon", "x", "Blue Lagoon"]
    routed = teacher_forced(model, tok, texts, tgts, editor=ed)
    plain = teacher_forced(model, tok, texts, tgts)  # no memoe context at all
    assert routed.pred == plain.pred and routed.logprob == plain.logprob
    assert min(plain.acc()[:2]) == 1.0  # the edits hold in a plain forward
    ed.remove()
    try:
        unedited = teacher_forced(model, tok, texts, tgts)
    finally:
        ed.adapter.attach()
    assert unedited.pred[:2] != plain.pred[:2]  # ... and they are the edits, not the base model


def test_generate_left_padding_and_kv_cache(edited):
    model, tok, ed = edited
    prompts = [PROMPTS[0], OTHER[1], PROMPTS[1]]  # different lengths: left padding in one batch
    routed = generate(model, tok, prompts, editor=ed, max_new_tokens=4)
    plain = generate(model, tok, prompts, max_new_tokens=4)
    assert routed == plain and plain[0].startswith("Klingon") and plain[2].startswith("Blue Lagoon")
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        batch = tok(prompts, return_tensors="pt", padding=True)
        with_cache = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        no_cache = model.generate(
            **batch, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=tok.pad_token_id
        )
    finally:
        tok.padding_side = side
    assert torch.equal(with_cache, no_cache)


def test_transformers_pipeline(edited):
    from transformers import pipeline

    model, tok, _ = edited
    gen = pipeline("text-generation", model=model, tokenizer=tok)
    out = gen(PROMPTS[1], max_new_tokens=3, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert out.strip().startswith("Blue Lagoon")


def test_saved_and_reloaded_copy(edited, tmp_path, monkeypatch):
    model, tok, ed = edited
    ed.save(tmp_path / "ed")
    meta = json.loads((tmp_path / "ed" / "editor.json").read_text())
    assert meta["model"] is None  # a model built in a test has no memoe name: load_edited needs it given
    import memoe.models

    monkeypatch.setattr(memoe.models, "load_model", lambda name, device, dtype: (tiny_model("llama", len(tok)), tok))
    model2, tok2, ed2 = load_edited(tmp_path / "ed", model_name="tiny")
    texts = PROMPTS + OTHER
    tgts = TARGETS + ["Klingon", "x", "Blue Lagoon"]
    assert teacher_forced(model2, tok2, texts, tgts).logprob == teacher_forced(model, tok, texts, tgts).logprob
    assert generate(model2, tok2, PROMPTS, max_new_tokens=4) == generate(model, tok, PROMPTS, max_new_tokens=4)


def test_load_edited_needs_a_model(tmp_path, edited):
    _, _, ed = edited
    ed.save(tmp_path / "ed")
    with pytest.raises(ValueError, match="no 'model' recorded"):
        load_edited(tmp_path / "ed")
    with pytest.raises(FileNotFoundError, match="not a saved editor"):
        load_edited(tmp_path)


@pytest.mark.slow
def test_real_model_plain_calls_score_as_memoe_does(real_model):
    """On the embedded model: Rel / Gen / Loc / generation-based Rel (and the probes) from plain calls
    equal memoe's own evaluation path, with a chat template in the batch."""
    from memoe.data import load_edits

    model, tok = real_model
    df, _ = load_edits(ZSRE, "zsre")
    recs = add_probes(df.slice(20, 4), tok)
    ed = MEMoEEditor(model, tok, MEMoEMethod(steps=30))
    try:
        base = None
        ed.remove()
        base = locality_predictions(model, tok, recs)
        ed.adapter.attach()
        ed.edit(recs)
        routed = evaluate(model, tok, recs, base, editor=ed)
        plain = evaluate(model, tok, recs, base)  # no editor passed: plain forward / generate calls
        for col in (
            "reliability",
            "generality",
            "locality",
            "specificity",
            "chat_generality",
            "restyled_generality",
            "generation_reliability",
        ):
            assert routed[col].to_list() == plain[col].to_list(), col
        assert summarize(plain)["reliability"] > 0.9
    finally:
        ed.remove()
