"""What evaluation reuses instead of recomputing: the unedited model's states below an edit, across
evaluations (memoe/frozen.py: a sequence whose states are kept runs only the layers from the edit up,
and scores what the full forward scores), and the unedited model's answers on prompts the editor
provably leaves alone (``Editor.leaves_unchanged``)."""

import polars as pl
import pytest
import torch

from memoe.editors.memoe import MEMoEMethod
from memoe.editors.memoe.editor import MEMoEEditor
from memoe.frozen import FrozenStates, forward_from
from memoe.metrics import evaluate, locality_predictions, teacher_forced
from memoe.models import decoder_layers

from .conftest import tiny_model
from .test_memoe_editor import EDITS, FAST, LOC, _recs

PROMPTS = EDITS["prompts"] + ["the mother tongue of danielle darrieux is", LOC]
TARGETS = EDITS["targets"] + ["Klingon", "one hundred degrees"]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2"])
def test_forward_from_a_layers_input_equals_the_full_forward(tokenizer, kind):
    model = tiny_model(kind, len(tokenizer))
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    full = model.base_model(**batch, use_cache=False)
    seen = []
    from memoe.frozen import capture_input

    hook = capture_input(model, 2, seen)
    model.base_model(**batch, use_cache=False)
    hook.remove()
    out = forward_from(model, 2, seen[0], batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(out, full.last_hidden_state, rtol=1e-5, atol=1e-5)
    # the skipped layers are back in place: the next full forward is the same as before
    torch.testing.assert_close(model.base_model(**batch, use_cache=False).last_hidden_state, full.last_hidden_state)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_reused_states_score_like_the_full_forward_and_survive_a_reload(tokenizer, kind, tmp_path):
    model = tiny_model(kind, len(tokenizer))
    before = teacher_forced(model, tokenizer, PROMPTS[:2], TARGETS[:2])
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(**{**FAST, "layers": [2], "steps": 30}))
    ed.edit(_recs())
    assert ed.unchanged_layers() == 2
    plain = teacher_forced(model, tokenizer, PROMPTS, TARGETS, editor=ed)
    states = FrozenStates(ed.unchanged_layers())
    filled = teacher_forced(model, tokenizer, PROMPTS, TARGETS, editor=ed, frozen=states)
    assert (states.hits, states.misses, len(states)) == (0, 4, 4)
    path = states.save(tmp_path / "states.safetensors")
    again = FrozenStates(2, [path])
    reused = teacher_forced(model, tokenizer, PROMPTS, TARGETS, editor=ed, frozen=again)
    assert (again.hits, again.misses, again.new) == (4, 0, {})
    for res in (filled, reused):
        assert res.pred == plain.pred and res.target == plain.target
        assert res.logprob == pytest.approx(plain.logprob, abs=1e-5)
    # the edit did change the answers: the reuse is not scoring the unedited model
    assert min(reused.logprob[:2]) > max(before.logprob) + 0.5
    # a prompt met for the first time beside reused ones: computed in full and added
    mixed = teacher_forced(
        model, tokenizer, PROMPTS + ["Homer wrote"], TARGETS + ["Blue Lagoon"], editor=ed, frozen=again
    )
    assert again.misses == 1 and len(again.new) == 1
    assert mixed.pred[:4] == plain.pred


def test_reused_states_feed_the_fact_gates_hooks(tokenizer):
    """The fact gate reads the input of its lowest layer, the layer the kept states enter: a reused forward must hand
    the gate those states (it once saw the skipped layers' pass-through, the embeddings, and decided otherwise)."""
    model = tiny_model("llama", len(tokenizer))
    cfg = MEMoEMethod(**{**FAST, "layers": [3], "steps": 30, "fact_gate": True, "fact_gate_layers": [1, 2]})
    ed = MEMoEEditor(model, tokenizer, cfg)
    ed.edit(_recs())
    assert ed.unchanged_layers() == 1
    seen = {}

    def spy(layer):  # registered after the gate's own hooks: it sees what the gate's hook on that layer saw
        def hook(module, args, kwargs):
            if ed.gate.wanted():
                seen.setdefault(layer, []).append((args[0] if args else kwargs["hidden_states"]).detach().clone())

        return hook

    layers = decoder_layers(model)
    spies = [layers[l].register_forward_pre_hook(spy(l), with_kwargs=True) for l in cfg.fact_gate_layers]
    plain = teacher_forced(model, tokenizer, PROMPTS, TARGETS, editor=ed, batch_size=8)
    want = {l: v[-1] for l, v in seen.items()}
    states = FrozenStates(1)
    teacher_forced(model, tokenizer, PROMPTS, TARGETS, editor=ed, frozen=states, batch_size=8)
    seen.clear()
    reused = teacher_forced(model, tokenizer, PROMPTS, TARGETS, editor=ed, frozen=states, batch_size=8)
    assert states.hits == len(PROMPTS)
    real = seen[1][-1].abs().sum(-1) > 0  # the kept states cover each row's own tokens, not its padding
    for h in spies:
        h.remove()
    for l in cfg.fact_gate_layers:
        torch.testing.assert_close(seen[l][-1][real], want[l][real])
    assert reused.pred == plain.pred
    assert reused.logprob == pytest.approx(plain.logprob, abs=1e-5)


def test_evaluate_with_reused_states_gives_the_same_table(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    recs = _recs()
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(**{**FAST, "layers": [3], "steps": 30}))
    ed.edit(recs)
    base = locality_predictions(model, tokenizer, recs)
    plain = evaluate(model, tokenizer, recs, base, editor=ed, generation=False)
    states = FrozenStates(3)
    evaluate(model, tokenizer, recs, base, editor=ed, generation=False, frozen=states)
    assert states.misses > 0
    again = evaluate(model, tokenizer, recs, base, editor=ed, generation=False, frozen=states)
    assert states.hits >= states.misses
    assert again.equals(plain)


def test_states_of_another_layer_or_above_the_edit_are_refused(tokenizer, tmp_path):
    model = tiny_model("llama", len(tokenizer))
    states = FrozenStates(3)
    teacher_forced(model, tokenizer, PROMPTS, TARGETS, frozen=states)
    path = states.save(tmp_path / "l3.safetensors")
    with pytest.raises(ValueError, match=r"l3\.safetensors.*layer 3.*needs layer 2"):
        FrozenStates(2, [path])
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(**{**FAST, "layers": [2], "steps": 2}))
    ed.edit(_recs())
    with pytest.raises(ValueError, match="changes layer 2 and above"):
        teacher_forced(model, tokenizer, PROMPTS, TARGETS, editor=ed, frozen=FrozenStates(3, [path]))
    with pytest.raises(ValueError, match="embeddings"):
        FrozenStates(0)


def test_the_fact_gate_keeps_its_own_layers_computed(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    ed = MEMoEEditor(
        model, tokenizer, MEMoEMethod(**{**FAST, "layers": [3], "fact_gate": True, "fact_gate_layers": [1, 2]})
    )
    assert ed.unchanged_layers() == 1


def _cf_records():
    recs = _recs().with_columns(
        target_true=pl.Series(["French", "Iliad"]),
        locality_prompts=pl.Series([["nq question: what is water", "The mother tongue of Homer is"]] * 2),
    )
    return recs.with_columns(locality_answers=pl.concat_list([pl.col("target_true"), pl.col("target_true")]))


def test_prompts_left_alone_take_the_unedited_models_answers_without_running(tokenizer, monkeypatch):
    import memoe.metrics as metrics

    model = tiny_model("llama", len(tokenizer))
    recs = _cf_records()
    base = locality_predictions(model, tokenizer, recs)
    assert base["nbr_base_kept"].list.len().to_list() == [2, 2]  # CounterFact-like: the neighbourhood kept too
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(**{**FAST, "layers": [2], "steps": 30}))
    ed.edit(recs)
    assert ed.leaves_unchanged(["nq question: what is water", "The mother tongue of Homer is"]) == [True, False]
    seen: list[str] = []
    real = metrics.teacher_forced

    def spy(model_, tok_, prompts, targets, **kw):
        if kw.get("editor") is not None:
            seen.extend(prompts)
        return real(model_, tok_, prompts, targets, **kw)

    monkeypatch.setattr(metrics, "teacher_forced", spy)
    fast = evaluate(model, tokenizer, recs, base, editor=ed, generation=False)
    assert "nq question: what is water" not in seen and "The mother tongue of Homer is" in seen
    monkeypatch.setattr(type(ed), "leaves_unchanged", lambda self, prompts: [False] * len(prompts))
    seen.clear()
    full = evaluate(model, tokenizer, recs, base, editor=ed, generation=False)
    assert "nq question: what is water" in seen
    assert fast.select("locality", "neighborhood").equals(full.select("locality", "neighborhood"))
    assert fast["neighborhood"].null_count() == 0
