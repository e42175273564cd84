import pytest
import torch

from memoe.adapter import LayerCache, MEMoEAdapter, supports_layer_cache
from memoe.editors.memoe import MEMoEMethod
from memoe.editors.memoe.editor import MEMoEEditor

from .conftest import tiny_model

PROMPTS = ["The capital of Danielle Darrieux is", "nq question: who wrote the iliad"]
SUBJECTS = ["Danielle Darrieux"]


def _ids(tok, prompts=PROMPTS):
    return tok(prompts, return_tensors="pt", padding=True)


def _perturb(editor, std=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in editor.adapter.moe.values():
            m.w_out.copy_(torch.randn(m.w_out.shape, generator=g) * std)


@pytest.mark.parametrize("form", ["lowrank", "ffn"])
def test_fresh_adapter_identity_and_removal_bit_identical(tiny, form):
    model, tok = tiny
    enc = _ids(tok)
    base = model(**enc).logits
    ed = MEMoEEditor(model, tok, MEMoEMethod(layers=[1, 2], expert_form=form, gate_mode="always", rank=4))
    ed.extractor.add(SUBJECTS)
    with ed.route(PROMPTS):
        fresh = model(**enc).logits
    assert torch.allclose(fresh, base, atol=1e-6)
    _perturb(ed)
    with ed.route(PROMPTS):
        assert not torch.allclose(model(**enc).logits, base, atol=1e-3)
    ed.remove()
    assert torch.equal(model(**enc).logits, base)


def test_anchor_gate_silences_rows_without_known_anchor(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    enc = _ids(tokenizer)
    base = model(**enc).logits
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(layers=[2], rank=4, gate_mode="anchor"))
    ed.extractor.add(SUBJECTS)
    _perturb(ed)
    with ed.route(PROMPTS):
        out = model(**enc).logits
    assert not torch.allclose(out[0], base[0], atol=1e-3)
    assert torch.equal(out[1], base[1])  # no known anchor: untouched
    assert torch.equal(model(**enc).logits, out)  # outside route(): the anchors found from the ids (drop-in)
    ed.adapter.state.auto = None  # drop_in: false
    assert torch.equal(model(**enc).logits, base)  # outside route(): no anchor, silent


@pytest.mark.parametrize("apply_from", ["all", "anchor"])
def test_routing_in_generate_equals_teacher_forcing(tiny, apply_from):
    model, tok = tiny
    ed = MEMoEEditor(
        model, tok, MEMoEMethod(layers=[2], rank=4, num_experts=3, apply_from=apply_from, gate_mode="always")
    )
    ed.extractor.add(SUBJECTS)
    _perturb(ed, std=2.0)
    for prompt in PROMPTS:  # one row each: no padding, so the base model's own positions agree too
        enc = tok([prompt], return_tensors="pt")
        n = enc.input_ids.shape[1]
        with ed.route([prompt]):
            g = model.generate(
                **enc,
                max_new_tokens=6,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=tok.pad_token_id,
            )
            tf = model(g.sequences).logits[0, n - 1 : -1]
        gl = torch.stack(g.logits, 1)[0]
        assert torch.allclose(gl, tf, atol=1e-4)
        ed.adapter.remove()
        with torch.no_grad():
            plain = model(g.sequences).logits[0, n - 1 : -1]
        ed.adapter.attach()
        assert not torch.allclose(plain, tf, atol=1e-3)  # the adapter really acted in both runs
    recs = _records(PROMPTS, ["Paris", "Homer"], ["Danielle Darrieux", "Iliad"])
    d = ed.diagnostics(recs, max_new_tokens=4)  # the editor's diagnostics: router_diagnostics
    assert d["route_agree_first"] == 1.0 and d["route_agree_tokens"] == 1.0


def test_left_padding_start_positions(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    ad = MEMoEAdapter(model, [1])
    st = ad.state
    st.gate = torch.tensor([1.0, 1.0, 0.0])
    st.start = torch.tensor([2, 0, 1])
    st.attention_mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    act = ad._active(3, 5, "cpu")
    assert act.tolist() == [[False, False, False, True, True], [True] * 5, [False] * 5]
    st.attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6, [0, 0, 1, 1, 1, 1]])
    st.past = 5  # a cached step: one new token per row, after the prompt
    assert ad._active(3, 1, "cpu").tolist() == [[True], [True], [False]]
    ad.remove()


def _records(prompts, targets, subjects):
    import polars as pl

    n = len(prompts)
    return pl.DataFrame(
        {
            "id": [str(i) for i in range(n)],
            "subject": subjects,
            "prompt": prompts,
            "target_new": targets,
            "target_true": [None] * n,
            "rephrase_prompts": [[p.replace("The", "the")] for p in prompts],
            "locality_prompts": [["nq question: what is water"]] * n,
            "locality_answers": [["wet"]] * n,
            "portability_prompts": [[]] * n,
            "portability_answers": [[]] * n,
            "generation_prompts": [[]] * n,
        },
        schema_overrides={
            "target_true": pl.String,
            "portability_prompts": pl.List(pl.String),
            "portability_answers": pl.List(pl.String),
            "generation_prompts": pl.List(pl.String),
        },
    )


@pytest.mark.parametrize("layers", [[2], [1, 3]])
def test_layer_cache_equals_full_forward(tiny, layers):
    model, tok = tiny
    assert supports_layer_cache(model)
    ed = MEMoEEditor(
        model, tok, MEMoEMethod(layers=layers, rank=4, expert_sees_anchor=True, apply_from="anchor", router_noise=0.0)
    )
    _perturb(ed)
    recs = _records(
        ["The capital of Danielle Darrieux is", "Homer wrote"],
        ["Paris France", "the Iliad"],
        ["Danielle Darrieux", "Homer"],
    )
    ed.extractor.add(recs["subject"])
    with torch.no_grad():
        a = ed.train_loss(recs, use_cache=True)
        b = ed.train_loss(recs, use_cache=False)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    ga = torch.autograd.grad(ed.train_loss(recs, use_cache=True), ed.adapter.moe[str(layers[0])].w_out)[0]
    gb = torch.autograd.grad(ed.train_loss(recs, use_cache=False), ed.adapter.moe[str(layers[0])].w_out)[0]
    assert torch.allclose(ga, gb, atol=1e-5, rtol=1e-4)
    ed.remove()


def test_layer_cache_recomputes_only_upper_layers(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    enc = _ids(tokenizer)
    c = LayerCache.capture(model, 2, enc.input_ids, enc.attention_mask)
    calls = []
    hs = [model.model.layers[i].register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i in range(4)]
    h = c.run(model)
    for x in hs:
        x.remove()
    assert calls == [2, 3]
    full = model.model(**enc).last_hidden_state
    assert torch.allclose(model.model.norm(h), full, atol=1e-5)


@pytest.mark.parametrize("kind,ran", [("llama", [2, 3]), ("gemma2", [1, 2, 3])])
def test_cached_training_step_runs_only_layers_above_l(tokenizer, kind, ran):
    """The adapter only adds to layer l's MLP output: a cached step runs layers l+1.. only, and
    its loss equals the full forward's. Where a norm follows the MLP (Gemma 2/3) layer l runs too."""
    model = tiny_model(kind, len(tokenizer))
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(layers=[1], rank=4, router_noise=0.0))
    _perturb(ed)
    recs = _records(["The capital of Danielle Darrieux is"], ["Paris"], ["Danielle Darrieux"])
    ed.extractor.add(recs["subject"])
    batch, ctx, cache = ed._prepare(ed._rows(recs))
    calls = []
    hs = [model.model.layers[i].register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i in range(4)]
    with torch.no_grad():
        a = ed._loss(batch, ctx, cache)
    for h in hs:
        h.remove()
    assert calls == ran
    with torch.no_grad():
        b = ed._loss(batch, ctx, None)
    assert torch.allclose(a, b, atol=1e-5)
    ed.remove()
    with torch.no_grad():  # the adapter's term is really in the cached loss
        assert abs(ed._loss(batch, ctx, None).item() - a.item()) > 1e-3


def test_block_membership_adds_up_the_terms_of_each_rows_blocks(tokenizer):
    """A row routed to several blocks (bool membership, per row or per token) gets the sum of their
    terms; a row in one block gets that block's term alone, as with a block index."""
    model = tiny_model("llama", len(tokenizer))
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(layers=[2], rank=4, gate_mode="always"))
    ad = ed.adapter
    ad.grow(), ad.grow()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for b in range(3):
            for m in ad.block(b).values():
                m.w_out.copy_(torch.randn(m.w_out.shape, generator=g))
    x = torch.randn(2, 5, model.config.hidden_size, generator=g)

    def term(block):
        with ed.route(["a", "b"]):
            ad.state.block = block
            return ad.delta(x, 2)

    one = [term(b) for b in range(3)]
    TOL = dict(rtol=1e-4, atol=1e-4)  # the same products over other row subsets: float rounding only
    rows = term(torch.tensor([[True, False, True], [False, True, False]]))
    assert torch.allclose(rows[0], one[0][0] + one[2][0], **TOL) and torch.allclose(rows[1], one[1][1], **TOL)
    tokens = torch.zeros(2, 5, 3, dtype=torch.bool)
    tokens[0, :2, 0] = tokens[0, 2:, 1] = tokens[1, :, :] = True
    per_tok = term(tokens)
    assert torch.allclose(per_tok[0, :2], one[0][0, :2], **TOL)
    assert torch.allclose(per_tok[0, 2:], one[1][0, 2:], **TOL)
    assert torch.allclose(per_tok[1], one[0][1] + one[1][1] + one[2][1], **TOL)
    assert torch.allclose(term(torch.tensor([2, 0])), torch.stack([one[2][0], one[0][1]]), **TOL)
    with pytest.raises(RuntimeError, match="membership"):
        term(torch.ones(2, 4, dtype=torch.bool))  # more blocks than the adapter has
