"""What is particular to the baseline editors (FT-L's norm bound, GRACE's prompt key and rounds, MEMIT's
closed form and key statistics, the training shortcuts) on tiny random models. The contract every
method keeps (it edits, comes off exactly, saves and loads, is deterministic, generates with the KV
cache as without) is checked for all of them in tests/test_contract.py."""

from __future__ import annotations

import pytest
import torch

from memoe.editors import make_editor
from memoe.editors.ft import FTMethod
from memoe.metrics import teacher_forced

from .test_contract import CASES, EDITS, records, rel


def settings(method, model):
    """The contract matrix's tiny-model settings (tests/test_contract.py CASES)."""
    return CASES[method].settings(model)


def test_ft_l_norm_constraint(tiny):
    model, tok = tiny
    ed = make_editor(model, tok, FTMethod(name="ft-l", layer=1, lr=1e-2, steps=5, norm_constraint=1e-3))
    stats = ed.edit(records())
    assert stats.details["delta_linf"] <= 1e-3 + 1e-7
    ed.remove()


def test_ft_l_default_constraint():
    assert FTMethod(name="ft-l").norm_constraint == 5e-4
    assert FTMethod(name="ft-m").norm_constraint is None


def test_grace_generate_uses_prompt_key(tiny):
    """Inside model.generate (left padding, KV cache) the edit fires: greedy output = new target."""
    from memoe.metrics import generate

    model, tok = tiny
    recs = records()
    ed = make_editor(model, tok, settings("grace", model))
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


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_memit_closed_form_uses_statistics(tokenizer, cache, monkeypatch):
    from memoe.editors.memit import editor as memit_mod
    from memoe.editors.memit.editor import memit_update
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
    cfg = settings("memit", model)
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
    ed = make_editor(model, tok, settings("grace", model))
    ed.edit(recs.head(2))
    ed.edit(recs.tail(1))
    assert ed.state_dict()["keys"].shape[0] == 3 and ed.edits_applied == 3
    assert rel(model, tok, recs, editor=ed) >= 0.9
    ed.remove()


def test_layer_stats_cached_pure(tiny, cache, monkeypatch):
    from memoe import corpus

    model, tok = tiny
    a = corpus.layer_stats(model, tok, [1], "pydoc", 1024, 64)
    monkeypatch.setattr(
        corpus, "compute_layer_stats", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed"))
    )
    b = corpus.layer_stats(model, tok, [1], "pydoc", 1024, 64)
    assert torch.equal(a[1], b[1])
    C = a[1]
    assert torch.allclose(C, C.T) and torch.linalg.eigvalsh(C).min() > -1e-9
    assert "pydoc" in corpus.stats_key(model, 1, "pydoc", 1024, 64)


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
