"""Baseline editors (FT-L, FT-M, LoRA, GRACE, MEMIT) on tiny random models: they edit, they come off
exactly, they save and load, they are deterministic."""
from __future__ import annotations

import polars as pl
import pytest
import torch

from memoe.config import FTMethod, GraceMethod, LoRAMethod, MemitMethod, WiseMethod
from memoe.data import SCHEMA
from memoe.editors import make_editor
from memoe.metrics import teacher_forced

EDITS = [
    ("Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "English", "French"),
    ("Toko Yasuda", "Toko Yasuda plays the instrument", "piano", "guitar"),
    ("Autonomous University of Madrid", "Autonomous University of Madrid is located in", "Sweden", "Spain"),
]
FAR = ["Bananas are a kind of", "The capital city of Peru is"]


def records(edits=EDITS) -> pl.DataFrame:
    rows = [dict(id=str(i), subject=s, prompt=p, target_new=t, target_true=tt,
                 rephrase_prompts=[f"Q: {p}"], locality_prompts=[FAR[i % 2]], locality_answers=["fruit"],
                 portability_prompts=[], portability_answers=[], generation_prompts=[])
            for i, (s, p, t, tt) in enumerate(edits)]
    return pl.DataFrame(rows, schema=SCHEMA)


def rel(model, tok, recs, editor=None) -> float:
    r = teacher_forced(model, tok, recs["prompt"].to_list(), recs["target_new"].to_list(), editor=editor)
    return sum(r.acc()) / len(r.acc())


def logits(model, tok, prompts, editor=None) -> torch.Tensor:
    enc = tok(prompts, return_tensors="pt", padding=True)
    ctx = editor.route(prompts) if editor is not None else torch.no_grad()
    with torch.no_grad(), ctx:
        return model(**enc).logits


def _last(model) -> int:
    return model.config.num_hidden_layers - 1


METHODS = {
    "ft-l": lambda m: FTMethod(name="ft-l", layer=_last(m), lr=5e-2, steps=30, norm_constraint=5e-2),
    "ft-m": lambda m: FTMethod(name="ft-m", layer=_last(m), lr=1e-2, steps=40),
}


def _check_edit_remove_roundtrip(method, tiny, tmp_path, extra=None):
    model, tok = tiny
    cfg = METHODS[method](model)
    recs = records()
    prompts = recs["prompt"].to_list() + FAR
    before = logits(model, tok, prompts)
    r0 = rel(model, tok, recs)
    ed = make_editor(model, tok, cfg, seed=0)
    stats = ed.edit(recs)
    assert stats
    r1 = rel(model, tok, recs, editor=ed)
    after = logits(model, tok, prompts, editor=ed)
    assert r0 < 0.5 and r1 >= (0.6 if method == "ft-l" else 0.9), (r0, r1)
    if extra is not None:
        extra(ed, stats)
    ed.save(tmp_path / "ed")
    ed.remove()
    assert torch.equal(logits(model, tok, prompts), before)
    ed2 = make_editor(model, tok, cfg, seed=0)
    ed2.load(tmp_path / "ed")
    assert torch.equal(logits(model, tok, prompts, editor=ed2), after)
    ed2.remove()
    assert torch.equal(logits(model, tok, prompts), before)
    # determinism: the same seed gives the same edited model
    ed3 = make_editor(model, tok, cfg, seed=0)
    ed3.edit(recs)
    assert torch.equal(logits(model, tok, prompts, editor=ed3), after)
    ed3.remove()
    return ed


@pytest.mark.parametrize("method", ["ft-m", "ft-l"])
def test_ft(method, tiny, tmp_path):
    _check_edit_remove_roundtrip(method, tiny, tmp_path)


def test_ft_l_norm_constraint(tiny):
    model, tok = tiny
    ed = make_editor(model, tok, FTMethod(name="ft-l", layer=1, lr=1e-2, steps=5, norm_constraint=1e-3))
    stats = ed.edit(records())
    assert stats["delta_linf"] <= 1e-3 + 1e-7
    ed.remove()


def test_ft_l_default_constraint():
    assert FTMethod(name="ft-l").norm_constraint == 5e-4
    assert FTMethod(name="ft-m").norm_constraint is None


METHODS["lora"] = lambda m: LoRAMethod(target_modules=["mlp_out"], rank=4, alpha=8, lr=3e-2, steps=25)


def test_lora(tiny, tmp_path):
    model, tok = tiny
    names = {n for n, _ in model.named_modules()}
    _check_edit_remove_roundtrip("lora", tiny, tmp_path)
    assert {n for n, _ in model.named_modules()} == names  # adapters unloaded
    assert not any("lora" in n for n, _ in model.named_parameters())


METHODS["grace"] = lambda m: GraceMethod(layer=_last(m), eps=1.0, lr=1.0, steps=40)


def test_grace(tiny, tmp_path):
    model, tok = tiny
    far = ["Bananas are a kind of", "In 1905 Einstein published"]
    before_far = logits(model, tok, far)

    def extra(ed, stats):
        assert stats["codebook_size"] == 3
        assert torch.equal(logits(model, tok, far, editor=ed), before_far)  # far prompts untouched
        assert torch.equal(logits(model, tok, far), before_far)  # ... with or without route

    _check_edit_remove_roundtrip("grace", tiny, tmp_path, extra)


def test_grace_generate_uses_prompt_key(tiny):
    """Inside model.generate (left padding, KV cache) the edit fires: greedy output = new target."""
    from memoe.metrics import generate

    model, tok = tiny
    recs = records()
    ed = make_editor(model, tok, METHODS["grace"](model))
    ed.edit(recs)
    gen = generate(model, tok, recs["prompt"].to_list(), editor=ed, max_new_tokens=4)
    tf = teacher_forced(model, tok, recs["prompt"].to_list(), recs["target_new"].to_list(), editor=ed)
    hits = 0
    for g, pred, t in zip(gen, tf.pred, recs["target_new"].to_list()):
        if pred == tok(" " + t, add_special_tokens=False).input_ids:
            hits += 1
            assert g.startswith(t), (g, t)
    assert hits >= 2
    ed.remove()


METHODS["memit"] = lambda m: MemitMethod(layers=[1, 2], fact_token="last", corpus="pydoc", mom2_tokens=4096, mom2_seq_len=64,
                                         mom2_weight=10.0, v_lr=0.5, v_steps=20, clamp_norm_factor=8.0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_memit(tiny, tmp_path, cache):
    _check_edit_remove_roundtrip("memit", tiny, tmp_path)
    assert len(list((cache / "stats").rglob("*.safetensors"))) == 2  # one cached C per layer


def test_memit_closed_form_uses_statistics(tokenizer, cache, monkeypatch):
    from memoe.editors import memit as memit_mod
    from memoe.editors.memit import memit_update
    from tests.conftest import tiny_model

    g = torch.Generator().manual_seed(0)
    K, R = torch.randn(6, 3, generator=g), torch.randn(4, 3, generator=g)
    A = torch.randn(6, 6, generator=g)
    C = A @ A.T / 6 + 0.1 * torch.eye(6)
    D = memit_update(C, K, R, 2.0)
    # normal equation of min ||D K - R||^2 + 2 tr(D C D^T)
    assert torch.allclose(D @ (2.0 * C.double() + K.double() @ K.double().T), R.double() @ K.double().T, atol=1e-8)
    assert not torch.allclose(D, memit_update(torch.eye(6), K, R, 2.0))

    model, tok = tiny_model("llama", len(tokenizer)), tokenizer
    seen = []
    real = memit_mod.layer_stats

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(out)
        return out

    monkeypatch.setattr(memit_mod, "layer_stats", spy)
    cfg = METHODS["memit"](model)
    ed = make_editor(model, tok, cfg)
    ed.edit(records())
    d1 = {k: v.clone() for k, v in ed.state_dict().items()}
    ed.remove()
    assert seen and set(seen[0]) == {1, 2}
    # a (much) heavier weight on the statistics shrinks the update
    ed = make_editor(model, tok, cfg.model_copy(update={"mom2_weight": 1e6}))
    ed.edit(records())
    d2 = ed.state_dict()
    ed.remove()
    assert all(d2[k].norm() < 0.5 * d1[k].norm() for k in d1)


def test_sequential_rounds_continue(tiny):
    """edit() twice: the second round continues from the first (GRACE keeps round 1's entries)."""
    model, tok = tiny
    recs = records()
    ed = make_editor(model, tok, METHODS["grace"](model))
    ed.edit(recs.head(2))
    ed.edit(recs.tail(1))
    assert ed.state_dict()["keys"].shape[0] == 3 and ed.edits_applied == 3
    assert rel(model, tok, recs, editor=ed) >= 0.9
    ed.remove()


def test_layer_stats_cached_pure(tiny, cache, monkeypatch):
    from memoe import corpus

    model, tok = tiny
    a = corpus.layer_stats(model, tok, [1], "pydoc", 1024, 64)
    monkeypatch.setattr(corpus, "compute_layer_stats", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    b = corpus.layer_stats(model, tok, [1], "pydoc", 1024, 64)
    assert torch.equal(a[1], b[1])
    C = a[1]
    assert torch.allclose(C, C.T) and torch.linalg.eigvalsh(C).min() > -1e-9
    assert "pydoc" in corpus.stats_key(model, 1, "pydoc", 1024, 64)


METHODS["wise"] = lambda m: WiseMethod(layer=_last(m), lr=0.5, steps=40, mask_ratio=0.5, corpus="pydoc",
                                       irr_margin=0.05, edit_margin=1.0, gap=0.5, irr_chunks=8, irr_len=16)


def test_wise(tiny, tmp_path):
    model, tok = tiny
    far = ["Bananas are a kind of", "In 1905 Einstein published"]
    before_far = logits(model, tok, far)

    def extra(ed, stats):
        assert stats["min_edit_score"] > stats["max_irr_score"]
        assert torch.equal(logits(model, tok, far, editor=ed), before_far)  # routed to the main memory

    _check_edit_remove_roundtrip("wise", tiny, tmp_path, extra)


@pytest.mark.parametrize("method", ["grace", "wise"])
def test_router_generation_kv_cache_matches_full_forward(method, tiny):
    """Greedy generation with the KV cache = without it (every step a full forward): the routing decision
    of the prompt holds for the generated tokens too. Multi-token targets, left padding."""
    model, tok = tiny
    recs = records([(s, p, t + " and more words here", tt) for s, p, t, tt in EDITS])
    ed = make_editor(model, tok, METHODS[method](model))
    ed.edit(recs)
    prompts = recs["prompt"].to_list() + FAR
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True)
        outs = []
        for cache in (True, False):
            with torch.no_grad(), ed.route(prompts):
                outs.append(model.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=cache,
                                           pad_token_id=tok.pad_token_id))
    finally:
        tok.padding_side = side
    assert torch.equal(outs[0], outs[1])
    ed.remove()


@pytest.mark.parametrize("first", [0, 2])
def test_training_shortcuts_give_the_full_forward_loss(tiny, first):
    """The editors' loss from cached lower layers + the LM head at target positions only equals the
    target NLL of a full forward with logits everywhere (values and gradients)."""
    from memoe.editors.common import body_hidden, edit_batch, head_nll, layer_cache, target_nll

    model, tok = tiny
    from memoe.models import decoder_layers

    b = edit_batch(tok, [e[1] for e in EDITS], [e[2] for e in EDITS], "cpu")
    w = next(decoder_layers(model)[-1].parameters())  # a weight above the cached layers
    w.requires_grad_(True)
    try:
        ref = target_nll(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        g_ref = torch.autograd.grad(ref, w)[0]
        cache = layer_cache(model, first, b)
        assert (cache is None) == (first == 0)
        got = head_nll(model, body_hidden(model, b, cache), b["labels"])
        g_got = torch.autograd.grad(got, w)[0]
    finally:
        w.requires_grad_(False)
    assert torch.allclose(ref, got, atol=1e-5)
    assert torch.allclose(g_ref, g_got, atol=1e-5, rtol=1e-4)
