import pytest
import torch

from memoe.editors import make_editor
from memoe.editors.common import can_compile
from memoe.editors.memoe import MEMoEMethod
from memoe.editors.memoe.editor import MEMoEEditor
from memoe.metrics import evaluate, locality_predictions, summarize, teacher_forced

from .conftest import ZSRE, tiny_model
from .test_adapter import _records

EDITS = dict(
    prompts=["The mother tongue of Danielle Darrieux is", "Homer's most famous poem is"],
    targets=["Klingon", "Blue Lagoon"],
    subjects=["Danielle Darrieux", "Homer"],
)
LOC = "nq question: what is the boiling point of water"
FAST = dict(layers=[2], rank=8, lr=5e-2, steps=60, early_stop_loss=0.05)


def _recs():
    return _records(EDITS["prompts"], EDITS["targets"], EDITS["subjects"])


def test_edit_changes_answer_and_leaves_unanchored_prompt(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    recs = _recs()
    before = teacher_forced(model, tokenizer, EDITS["prompts"], EDITS["targets"]).acc()
    loc_before = model(**tokenizer([LOC], return_tensors="pt")).logits
    # the tiny random model's targets need ~100 steps (at 60 the result hangs on the router noise draws)
    ed = make_editor(model, tokenizer, MEMoEMethod(**{**FAST, "steps": 100}))
    assert isinstance(ed, MEMoEEditor)
    stats = ed.edit(recs)
    assert stats.loss_final < stats.loss_first and stats.details["layer_cache"]
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
        outs.append(
            (st.loss_final, teacher_forced(model, tokenizer, EDITS["prompts"], EDITS["targets"], editor=ed).logprob)
        )
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
    assert s1.details["n_replayed"] == 0 and s2.details["n_replayed"] == 1 and ed.edits_applied == 2
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


def test_length_buckets_partition_rows_and_cut_padding():
    from memoe.editors.common import length_buckets

    lengths = [12, 30, 11, 29, 12, 31, 10, 30] * 8
    groups = length_buckets(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert 1 < len(groups) and padded < len(lengths) * max(lengths)
    assert length_buckets([7] * 5) == [[0, 1, 2, 3, 4]]  # equal lengths: one group, order kept


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # gpt2: LayerNorm, whose weights stay fp32 under autocast
def test_bucketed_bf16_training_edits_and_restores_the_model(tokenizer, kind):
    """Length buckets + bf16 autocast still edit; the frozen weights and the attention
    implementation are exactly as before afterwards (the fp32 originals are put back)."""
    model = tiny_model(kind, len(tokenizer))
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    recs = _records(
        EDITS["prompts"] + ["Paris is the capital of"],
        EDITS["targets"] + ["Narnia of the North"],
        EDITS["subjects"] + ["Paris"],
    )
    ed = make_editor(model, tokenizer, MEMoEMethod(**{**FAST, "steps": 120}, precision="bfloat16"))
    stats = ed.edit(recs)
    assert stats.details["precision"] == "bfloat16" and stats.details["buckets"] >= 1
    assert all(torch.equal(ref[k], v) and v.dtype == ref[k].dtype for k, v in model.state_dict().items())
    assert model.config._attn_implementation == impl
    after = teacher_forced(model, tokenizer, recs["prompt"].to_list(), recs["target_new"].to_list(), editor=ed).acc()
    assert min(after) == 1.0


def test_bucketed_step_has_the_same_gradient_as_one_padded_batch(tokenizer):
    """Splitting a step's rows into length groups changes padding, not the objective."""
    model = tiny_model("llama", len(tokenizer))
    recs = _records(
        EDITS["prompts"] + ["Paris is the capital of"],
        EDITS["targets"] + ["Narnia of the North"],
        EDITS["subjects"] + ["Paris"],
    )
    grads = []
    for buckets in (True, False):
        torch.manual_seed(0)
        ed = MEMoEEditor(
            model,
            tokenizer,
            MEMoEMethod(
                **{
                    **FAST,
                    "steps": 1,
                    "router_noise": 0.0,
                    "load_balance": 0.0,
                    "precision": "float32",
                    "length_buckets": buckets,
                    "pack_tokens": None,
                }
            ),
        )
        with torch.no_grad():
            for p in ed.adapter.parameters():
                p.add_(0.05 * torch.randn_like(p))
        before = {k: v.clone() for k, v in ed.adapter.state_dict().items()}
        ed.edit(recs)
        grads.append({k: v - before[k] for k, v in ed.adapter.state_dict().items()})
        ed.remove()
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6), k


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("apply_from", ["all", "anchor"])
def test_packed_rows_have_the_same_loss_and_gradient_as_padded_rows(tokenizer, kind, apply_from):
    """Packed rows (several rows per sequence, positions restarting, each row seeing only itself;
    the adapter's per-row anchor and start spread over the tokens) change the batch layout, not the
    objective: the same loss and adapter gradient as right-padded rows, with and without the cache."""
    model = tiny_model(kind, len(tokenizer))
    recs = _records(
        EDITS["prompts"] + ["Paris is the capital of"],
        EDITS["targets"] + ["Narnia of the North"],
        EDITS["subjects"] + ["Paris"],
    )
    out = {}
    for pack in (None, 21, 64):
        torch.manual_seed(0)
        ed = MEMoEEditor(
            model,
            tokenizer,
            MEMoEMethod(
                **{**FAST, "router_noise": 0.0, "apply_from": apply_from, "precision": "float32", "pack_tokens": pack}
            ),
        )
        ed.extractor.add(recs["subject"])
        with torch.no_grad():
            for p in ed.adapter.parameters():
                p.add_(0.05 * torch.randn_like(p))
        for cached in (True, False):
            ed.adapter.zero_grad()
            loss = ed.train_loss(recs, use_cache=cached)
            loss.backward()
            out[pack, cached] = loss.detach(), {k: p.grad.clone() for k, p in ed.adapter.named_parameters()}
        batch, _, _ = ed._prepare(ed._rows(recs))
        assert ("row" in batch) == (pack is not None)
        assert batch["input_ids"].shape[0] == {None: 3, 21: 2, 64: 1}[pack]  # rows of 13, 11, 10 tokens
        ed.remove()
    ref_loss, ref_grad = out[None, True]
    for key, (loss, grad) in out.items():
        assert torch.allclose(loss, ref_loss, atol=1e-5), key
        for k, g in grad.items():
            assert ref_grad[k].abs().max() > 0, k
            assert torch.allclose(g, ref_grad[k], atol=1e-5, rtol=1e-4), (key, k)


def test_packed_batch_layout(tokenizer):
    from memoe.editors.common import packed_batch

    prompts, targets = EDITS["prompts"] + ["Paris is the capital of"], EDITS["targets"] + ["Narnia of the North"]
    b = packed_batch(tokenizer, prompts, targets, "cpu", capacity=16)
    lengths = [
        len(tokenizer(p).input_ids) + len(tokenizer(" " + t, add_special_tokens=False).input_ids)
        for p, t in zip(prompts, targets)
    ]
    assert b["input_ids"].shape[1] <= max(16, max(lengths))
    for i, n in enumerate(lengths):  # every row once, whole, its positions from 0
        where = (b["row"] == i).nonzero()
        assert len(where) == n and len(set(where[:, 0].tolist())) == 1
        assert b["position_ids"][b["row"] == i].tolist() == list(range(n))
    assert b["attention_mask"] is None and bool((b["labels"][b["row"] < 0] == -100).all())
    # a row's first token is never a label: no row is trained to predict from the row before it
    starts = b["position_ids"] == 0
    assert bool((b["labels"][starts] == -100).all())


def test_packing_falls_back_to_padded_rows_where_the_model_mixes_them(tokenizer, monkeypatch):
    import memoe.editors.memoe.editor as mod

    monkeypatch.setattr(mod, "packing_is_exact", lambda model: False)
    model = tiny_model("llama", len(tokenizer))
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(**{**FAST, "steps": 2}))
    with pytest.warns(UserWarning, match="padded rows"):
        stats = ed.edit(_recs())
    assert stats.details["packed"] is False


def test_packing_is_exact_on_the_tiny_architectures(tokenizer):
    from memoe.editors.common import packing_is_exact

    for kind in ("llama", "gpt2", "gemma2"):
        assert packing_is_exact(tiny_model(kind, len(tokenizer))), kind


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_nll_equals_cross_entropy(dtype):
    """The training loss's fused head + NLL: autograd's cross-entropy value and input gradient."""
    from memoe.editors.common import head_nll_sum

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(500, 32, generator=g) * 0.3).to(dtype)
    h0 = torch.randn(7, 32, generator=g).to(dtype)
    y = torch.randint(0, 500, (7,), generator=g)
    h1, h2 = h0.clone().requires_grad_(), h0.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h1, w).float(), y, reduction="sum")
    got = head_nll_sum(h2, w, y)
    (ref * 0.5).backward()
    (got * 0.5).backward()
    assert torch.allclose(got, ref, rtol=1e-6) and h2.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert torch.allclose(h2.grad.float(), h1.grad.float(), atol=tol * float(h1.grad.abs().max()))
    with pytest.raises(ValueError, match="frozen"):
        head_nll_sum(h0, w.clone().requires_grad_(), y)


def test_token_groups_bound_the_tokens_per_micro_batch():
    from memoe.editors.common import token_groups

    lengths = [10, 20, 30, 5, 50, 1]
    groups = token_groups(lengths, 35)
    assert [i for g in groups for i in g] == list(range(len(lengths)))  # every row once, in order
    assert groups == [[0, 1], [2, 3], [4], [5]]  # 50 > 35: a group of its own
    assert token_groups(lengths, 1000) == [list(range(6))] and token_groups([], 10) == []


def test_packed_micro_batches_have_the_same_gradient_as_one(tokenizer, monkeypatch):
    """A step split into micro-batches (``max_batch_tokens``) accumulates the same gradient."""
    model = tiny_model("llama", len(tokenizer))
    recs = _records(
        EDITS["prompts"] + ["Paris is the capital of"],
        EDITS["targets"] + ["Narnia of the North"],
        EDITS["subjects"] + ["Paris"],
    )
    sgd = torch.optim.SGD  # one plain gradient step: the update is the gradient itself
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: sgd(params, lr=1.0))
    moved, buckets = [], []
    for max_tokens in (4096, 12):
        torch.manual_seed(0)
        ed = MEMoEEditor(
            model,
            tokenizer,
            MEMoEMethod(
                **{
                    **FAST,
                    "steps": 1,
                    "router_noise": 0.0,
                    "load_balance": 0.0,
                    "precision": "float32",
                    "max_batch_tokens": max_tokens,
                }
            ),
        )
        with torch.no_grad():
            for p in ed.adapter.parameters():
                p.add_(0.05 * torch.randn_like(p))
        before = {k: v.clone() for k, v in ed.adapter.state_dict().items()}
        buckets.append(ed.edit(recs).details["buckets"])
        moved.append({k: v - before[k] for k, v in ed.adapter.state_dict().items()})
        ed.remove()
    assert buckets == [1, 3]
    for k in moved[0]:
        assert moved[0][k].abs().max() > 0
        assert torch.allclose(moved[0][k], moved[1][k], atol=1e-6), k


def _losses(model, tokenizer, cfg, recs):
    ed = MEMoEEditor(model, tokenizer, cfg, seed=1)
    losses = []
    ed.on_step = lambda step, loss: losses.append(loss)
    stats = ed.edit(recs)
    ed.remove()
    return stats, losses


@pytest.mark.skipif(not can_compile(torch.device("cpu")), reason="no C++ compiler for torch.compile")
def test_compiled_layers_train_like_eager_and_compile_once(tokenizer):
    """``compile: true`` runs the layers above the adapter through torch.compile: the same training
    (up to float rounding), deterministic, the plain forward back after the round, no recompiling
    in a later round of another size."""
    from torch._dynamo.utils import counters

    from memoe.models import decoder_layers

    model = tiny_model("llama", len(tokenizer))
    recs = _records(
        EDITS["prompts"] + ["Paris is the capital of"],
        EDITS["targets"] + ["Narnia of the North"],
        EDITS["subjects"] + ["Paris"],
    )
    cfg = MEMoEMethod(**{**FAST, "layers": [1], "steps": 6, "early_stop_loss": 0.0, "precision": "float32"})
    _, eager = _losses(model, tokenizer, cfg, recs)
    torch._dynamo.reset()  # forget graphs that earlier tests traced for the same layer code
    traced = counters["stats"]["unique_graphs"]
    stats, comp = _losses(model, tokenizer, cfg.model_copy(update=dict(compile=True)), recs)
    assert counters["stats"]["unique_graphs"] > traced  # the layers above the adapter went through dynamo
    assert stats.details["compiled"] and not any("forward" in vars(layer) for layer in decoder_layers(model))
    assert comp == pytest.approx(eager, rel=1e-4) and comp[-1] < comp[0]
    graphs = counters["stats"]["unique_graphs"]
    again = _losses(model, tokenizer, cfg.model_copy(update=dict(compile=True)), recs)[1]
    assert again == comp  # deterministic
    _losses(model, tokenizer, cfg.model_copy(update=dict(compile=True)), recs.head(2))  # fewer rows: other shapes
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_falls_back_to_eager_where_it_cannot_build(tokenizer, monkeypatch):
    import memoe.editors.memoe.editor as mod

    monkeypatch.setattr(mod, "can_compile", lambda device: False)
    model = tiny_model("llama", len(tokenizer))
    cfg = MEMoEMethod(**{**FAST, "steps": 2, "compile": True})
    with pytest.warns(UserWarning, match="cannot build kernels"):
        ed = MEMoEEditor(model, tokenizer, cfg)
    assert ed.edit(_recs()).details["compiled"] is False


GROW = [
    ("The mother tongue of Danielle Darrieux is", "Klingon", "Danielle Darrieux"),
    ("Homer's most famous poem is", "Blue Lagoon", "Homer"),
    ("The capital of Laos is", "Yamoussoukro", "Laos"),
]


def _one(p, t, s):
    return _records([p], [t], [s])


def test_grown_adapter_freezes_earlier_blocks_and_routes_each_subject_to_its_block(tokenizer, tmp_path):
    model = tiny_model("llama", len(tokenizer))
    loc_before = model(**tokenizer([LOC], return_tensors="pt")).logits
    cfg = MEMoEMethod(**{**FAST, "steps": 100, "growth": "round"})
    ed = MEMoEEditor(model, tokenizer, cfg)
    snapshots, sizes = [], []
    for i, edit in enumerate(GROW):
        st = ed.edit(_one(*edit))
        assert st.details["block"] == i and st.details["n_blocks"] == i + 1 and st.details["n_replayed"] == 0
        sizes.append(st.details["adapter_bytes"])
        snapshots.append({k: v.clone() for k, v in ed.state_dict().items()})
    # a later round trains only its own block: every earlier block's weights are bit-identical
    for i, snap in enumerate(snapshots[:-1]):
        prefix = "moe." if i == 0 else f"grown.{i - 1}."
        later = ed.state_dict()
        assert all(torch.equal(v, later[k]) for k, v in snap.items() if k.startswith(prefix))
    assert sizes[1] - sizes[0] == sizes[2] - sizes[1] == sizes[0]  # one block's bytes per round
    assert ed.block_of == {"danielle darrieux": 0, "homer": 1, "laos": 2}
    prompts, targets = [p for p, _, _ in GROW], [t for _, t, _ in GROW]
    assert min(teacher_forced(model, tokenizer, prompts, targets, editor=ed).acc()) == 1.0
    assert min(teacher_forced(model, tokenizer, prompts, targets).acc()) == 1.0  # drop-in: a plain forward
    assert torch.equal(loc_before, model(**tokenizer([LOC], return_tensors="pt")).logits)
    # routing a row to another block changes its output: the blocks really hold different edits
    with ed.route([prompts[0]]):
        ed.adapter.state.block = torch.tensor([2])
        wrong = teacher_forced(model, tokenizer, prompts[:1], targets[:1]).acc()
    assert wrong[0] < 1.0
    ed.save(tmp_path / "grown")
    fresh = tiny_model("llama", len(tokenizer))
    ed2 = MEMoEEditor(fresh, tokenizer, cfg)
    ed2.load(tmp_path / "grown")
    assert ed2.adapter.n_blocks == 3 and ed2.block_of == ed.block_of
    a = teacher_forced(model, tokenizer, prompts, targets, editor=ed).logprob
    assert a == teacher_forced(fresh, tokenizer, prompts, targets, editor=ed2).logprob


@pytest.mark.parametrize("growth", ["shared", "round"])
def test_a_re_edit_answers_the_latest_target_and_the_old_one_does_not_come_back(tokenizer, growth):
    model = tiny_model("llama", len(tokenizer))
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(**{**FAST, "steps": 100, "growth": growth}))
    (p0, t0, s0), (p1, t1, s1), (p2, t2, s2) = GROW
    ed.edit(_records([p0, p1], [t0, t1], [s0, s1]))
    # the same prompt with a new target, and another subject
    p1_again = "Homer's   most famous poem is"  # the same prompt up to spacing
    st = ed.edit(_records([p1_again, p2], ["Star Wars", t2], [s1, s2]))
    assert st.details["n_superseded"] == 1
    assert [h[1] for h in ed.history if h[2] == s1] == ["Star Wars"]
    if growth == "round":
        assert st.details["n_replayed"] == 0 and ed.block_of["homer"] == 1 and ed.block_of["danielle darrieux"] == 0
    else:
        assert st.details["n_replayed"] == 1  # Danielle Darrieux's edit; never Homer's superseded one
    new = teacher_forced(model, tokenizer, [p1, p0, p2], ["Star Wars", t0, t2], editor=ed).acc()
    old = teacher_forced(model, tokenizer, [p1], [t1], editor=ed).acc()
    # the overwritten target is trained unlikely on its prompt (the tiny model forgets it anyway; the
    # real model keeps credit for a name's continuation: docs/lifelong.md)
    assert st.details["n_forgotten"] == 1 and st.details["forget_loss_final"] < 0.05
    assert min(new) == 1.0 and old[0] == 0.0


def test_the_forget_rows_leave_out_the_tokens_the_latest_target_shares(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(**FAST))
    p, s = "Homer's most famous poem is", "Homer"
    batch, _, _ = ed._forget_part([(p, "Blue Lagoon", "Blue Moon", s), (p, "Blue Lagoon", "Star Wars", s)])
    old = tokenizer(" Blue Lagoon").input_ids
    shared = 1 if tokenizer(" Blue Moon").input_ids[0] == old[0] else 0
    kept = (batch["labels"] != -100).sum(1).tolist()
    assert kept == [len(old) - shared, len(old)] and shared == 1
    assert ed._forget_part([(p, "Blue", "Blue Moon", s)]) is None  # nothing of the old target to unlearn


def test_a_grown_block_takes_the_re_edited_subjects_other_edits_with_it(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(**{**FAST, "steps": 100, "growth": "round"}))
    other = "The birthplace of Homer is"
    ed.edit(_records(["Homer's most famous poem is", other], ["Blue Lagoon", "Mars"], ["Homer", "Homer"]))
    st = ed.edit(_records(["Homer's most famous poem is"], ["Star Wars"], ["Homer"]))
    assert st.details["n_replayed"] == 1 and ed.block_of["homer"] == 1  # the birthplace edit moved to block 1
    acc = teacher_forced(
        model, tokenizer, ["Homer's most famous poem is", other], ["Star Wars", "Mars"], editor=ed
    ).acc()
    assert min(acc) == 1.0


def test_growth_round_needs_anchor_gating():
    with pytest.raises(ValueError, match="gate_mode 'anchor'"):
        MEMoEMethod(growth="round", gate_mode="always")


def test_block_edits_splits_a_round_by_subject_into_new_blocks(tokenizer):
    """Four edits of three subjects in one round, at most two edits per block: Homer's two edits share a
    block, each other subject gets its own, each subject is routed to its block, and every edit holds."""
    model = tiny_model("llama", len(tokenizer))
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(**{**FAST, "steps": 100, "growth": "round", "block_edits": 2}))
    (p0, t0, s0), (p1, t1, s1), (p2, t2, s2) = GROW
    other = ("The birthplace of Homer is", "Mars", "Homer")
    rows = [(p0, t0, s0), (p1, t1, s1), other, (p2, t2, s2)]
    st = ed.edit(_records(*map(list, zip(*rows))))
    assert st.details["blocks_trained"] == 3 and st.details["n_blocks"] == 3 and st.details["block"] == 0
    assert 3 <= st.steps <= 300 and 0 < st.details["prep_s"] < st.seconds  # three blocks, each timed from its start
    assert ed.block_of == {"danielle darrieux": 0, "homer": 1, "laos": 2}
    prompts, targets = [r[0] for r in rows], [r[1] for r in rows]
    assert min(teacher_forced(model, tokenizer, prompts, targets, editor=ed).acc()) == 1.0
    # a later round moves Homer's edits (old and new together) into one new block
    st = ed.edit(_records(["Homer's most famous poem is"], ["Star Wars"], ["Homer"]))
    assert st.details["blocks_trained"] == 1 and st.details["n_replayed"] == 1 and ed.block_of["homer"] == 3
    acc = teacher_forced(model, tokenizer, [p1, other[0], p0], ["Star Wars", "Mars", t0], editor=ed).acc()
    assert min(acc) == 1.0


def test_block_edits_needs_growth_round():
    with pytest.raises(ValueError, match="growth 'round'"):
        MEMoEMethod(block_edits=25)


def test_an_overwritten_target_is_trained_unlikely_again_whenever_its_prompt_is_trained(tokenizer, tmp_path):
    """Round 3 edits Homer again (another relation): in growth 'round' the new block takes Homer's edits,
    the re-edit among them, and its overwritten target is trained unlikely there too; the record of the
    overwritten targets survives save/load (the pipeline loads each round's editor from the last state)."""
    model = tiny_model("llama", len(tokenizer))
    cfg = MEMoEMethod(**{**FAST, "steps": 40, "growth": "round"})
    ed = MEMoEEditor(model, tokenizer, cfg)
    (p0, t0, s0), (p1, t1, s1), _ = GROW
    ed.edit(_records([p0, p1], [t0, t1], [s0, s1]))
    assert ed.edit(_records([p1], ["Star Wars"], [s1])).details["n_forgotten"] == 1
    ed.save(tmp_path / "state")
    ed.remove()
    again = MEMoEEditor(model, tokenizer, cfg)
    again.load(tmp_path / "state")
    assert again.overwritten == ed.overwritten and list(again.overwritten.values()) == [[(p1, t1, s1)]]
    st = again.edit(_records(["The birthplace of Homer is"], ["Atlantis"], [s1]))
    assert st.details["n_replayed"] == 1 and st.details["n_forgotten"] == 1
    assert teacher_forced(model, tokenizer, [p1], [t1], editor=again).acc() == [0.0]


@pytest.mark.parametrize("growth", ["round", "shared"])
def test_kept_scores_are_reused_only_while_the_rows_version_holds(tokenizer, tmp_path, growth):
    """A grown adapter freezes each block: a later round's edit of another subject leaves an earlier
    edit's version (and its outputs) as they were, so its kept scores are reused, and they equal a fresh
    scoring; re-editing that subject moves it to a new block, changes its version, and it is scored
    again (with the new target's answer). The shared adapter changes every round: nothing is reused."""
    from memoe.memo import ScoreMemo
    from memoe.metrics import generate

    model = tiny_model("llama", len(tokenizer))
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(**{**FAST, "steps": 100, "growth": growth}))
    p, t, s = GROW[0]
    probes = [p, p.lower(), "nq question: who wrote the odyssey"]
    ed.edit(_one(p, t, s))
    memo = ScoreMemo()
    first = teacher_forced(model, tokenizer, probes, [t] * 3, editor=ed, memo=memo)
    gen = generate(model, tokenizer, probes, editor=ed, max_new_tokens=4, memo=memo)
    assert memo.hits == 0 and memo.misses == 6
    memo.save(tmp_path / "m.json")
    ed.edit(_one(*GROW[1]))  # another subject
    later = ScoreMemo([tmp_path / "m.json"])
    again = teacher_forced(model, tokenizer, probes, [t] * 3, editor=ed, memo=later)
    fresh = teacher_forced(model, tokenizer, probes, [t] * 3, editor=ed)
    assert again.pred == fresh.pred and again.logprob == pytest.approx(fresh.logprob, abs=1e-5)
    fresh_gen = generate(model, tokenizer, probes, editor=ed, max_new_tokens=4)
    assert generate(model, tokenizer, probes, editor=ed, max_new_tokens=4, memo=later) == fresh_gen
    if growth == "round":
        assert later.hits == 6 and again.logprob == first.logprob and fresh_gen == gen  # all of them kept
    else:
        assert later.hits == 2  # only the prompt without an edited subject: the adapter changed
    ed.edit(_one(p, "Blue Lagoon", s))  # a re-edit: the subject moves to a new block
    third = teacher_forced(model, tokenizer, [p], ["Blue Lagoon"], editor=ed, memo=later)
    hits = later.hits
    assert teacher_forced(model, tokenizer, [p], [t], editor=ed, memo=later).logprob != first.logprob[:1]
    assert later.hits == hits and third.acc() == [1.0]


@pytest.mark.slow
@pytest.mark.parametrize("keep", ["term", "answer", "nullspace"])
def test_stacked_blocks_keep_a_recurring_subjects_earlier_edits_where_they_are(real_model, tmp_path, keep):
    """Recurring 'stack' on the embedded model (a tiny random model cannot tell a subject's relations apart):
    Homer's second round trains only its new edit, in a new block on top of the frozen block 0 that holds
    Homer's first edit; Homer's rows then run through both blocks and both edits hold, block 0 stays
    bit-identical, a re-edit's latest target beats the frozen block holding the old one, and a saved editor
    reloads the stack."""
    model, tok = real_model
    cfg = MEMoEMethod(
        growth="round", recurring="stack", keep=keep, block_edits=10, num_experts=1, rank=96, early_stop_loss=0.01
    )
    ed = MEMoEEditor(model, tok, cfg)
    try:
        birth, poem = ("The birthplace of Homer is", "Mars", "Homer"), GROW[1]
        ed.edit(_records([birth[0], GROW[0][0]], [birth[1], GROW[0][1]], [birth[2], GROW[0][2]]))
        block0 = {k: v.clone() for k, v in ed.state_dict().items() if k.startswith("moe.")}
        st = ed.edit(_one(*poem))
        assert st.details["n_replayed" if keep == "answer" else "n_kept"] == 1
        assert st.details["n_kept" if keep == "answer" else "n_replayed"] == 0
        assert ed.blocks_for("Homer") == [0, 1] and ed.blocks_for("Danielle Darrieux") == [0]
        assert all(torch.equal(v, ed.state_dict()[k]) for k, v in block0.items())
        prompts, targets = [birth[0], poem[0], GROW[0][0]], [birth[1], poem[1], GROW[0][1]]
        assert min(teacher_forced(model, tok, prompts, targets, editor=ed).acc()) == 1.0
        # without its earlier block, block 1 alone gives Homer's rows another answer: the terms really add up
        with ed.route([birth[0]]):
            ed.adapter.state.block = torch.tensor([1])
            alone = teacher_forced(model, tok, [birth[0]], [birth[1]]).logprob
        assert alone[0] < teacher_forced(model, tok, [birth[0]], [birth[1]], editor=ed).logprob[0] - 1.0
        # a re-edit of round 1's prompt: the latest target wins over the frozen block that holds the old one
        st = ed.edit(_one(birth[0], "Venus", "Homer"))
        assert st.details["n_superseded"] == 1 and ed.blocks_for("Homer") == [0, 1, 2]
        prompts[0], targets[0] = birth[0], "Venus"
        assert min(teacher_forced(model, tok, prompts, targets).acc()) == 1.0  # drop-in: a plain forward
        assert teacher_forced(model, tok, [birth[0]], [birth[1]], editor=ed).acc()[0] < 1.0
        ed.save(tmp_path / "stack")
        a = teacher_forced(model, tok, prompts, targets, editor=ed).logprob
    finally:
        ed.remove()
    ed2 = MEMoEEditor(model, tok, cfg)
    try:
        ed2.load(tmp_path / "stack")
        assert ed2.earlier_blocks == ed.earlier_blocks == {"homer": [0, 1]}
        assert a == teacher_forced(model, tok, prompts, targets, editor=ed2).logprob
    finally:
        ed2.remove()


def test_keep_nullspace_leaves_a_recurring_subjects_earlier_edits_exactly_as_they_were(tokenizer, tmp_path):
    """Keep 'nullspace': the new block of a subject edited again never sees what the subject's earlier edit spans
    at the adapter's layer, so that edit's teacher-forced log-probabilities do not move at all (nothing of it is
    trained), while the new edit of the same subject is learned; a saved editor keeps the hidden directions."""
    model = tiny_model("llama", len(tokenizer))
    cfg = MEMoEMethod(**{**FAST, "steps": 100, "growth": "round", "recurring": "stack", "keep": "nullspace"})
    ed = MEMoEEditor(model, tokenizer, cfg)
    first, again = ("The birthplace of Homer is", "Mars", "Homer"), GROW[1]
    ed.edit(_records(*map(list, zip(first, GROW[0]))))
    before = teacher_forced(model, tokenizer, [first[0]], [first[1]], editor=ed).logprob
    st = ed.edit(_one(*again))
    assert st.details["n_kept"] == 1 and st.details["n_replayed"] == 0 and st.details["n_train_rows"] == 1
    assert st.details["protected_dims"] > 0 and ed.blocks_for("Homer") == [0, 1]
    after = teacher_forced(model, tokenizer, [first[0], again[0]], [first[1], again[1]], editor=ed)
    assert after.acc() == [1.0, 1.0]
    assert after.logprob[0] == pytest.approx(before[0], abs=1e-4)
    # the same round without the hidden directions moves the earlier edit: the test can fail
    q = ed.adapter.block(1)[str(FAST["layers"][0])].protect
    ed.adapter.protect(1, FAST["layers"][0], None)
    moved = teacher_forced(model, tokenizer, [first[0]], [first[1]], editor=ed).logprob
    assert abs(moved[0] - before[0]) > 1e-2
    ed.adapter.protect(1, FAST["layers"][0], q)
    ed.save(tmp_path / "nullspace")
    ed2 = MEMoEEditor(tiny_model("llama", len(tokenizer)), tokenizer, cfg)
    ed2.load(tmp_path / "nullspace")
    assert torch.equal(ed2.adapter.block(1)[str(FAST["layers"][0])].protect, q)
    with pytest.raises(ValueError, match="protected directions"):
        ed.adapter.protect(1, FAST["layers"][0], torch.zeros(3, 2))


def test_keep_nullspace_needs_one_adapter_layer():
    with pytest.raises(ValueError, match="one adapter layer"):
        MEMoEMethod(growth="round", recurring="stack", keep="nullspace", layers=[2, 3])


def test_recurring_stack_needs_growth_round():
    with pytest.raises(ValueError, match="growth 'round'"):
        MEMoEMethod(recurring="stack")


def test_the_plateau_stop_ends_a_block_whose_loss_no_longer_falls(tokenizer):
    from memoe.editors.memoe.editor import _plateaued

    assert not _plateaued([5.0, 3.0, 1.0, 0.5], 2)  # still falling
    assert _plateaued([5.0, 1.0, 0.99, 0.98], 2)  # two steps within 5% of the best before them
    assert not _plateaued([5.0, 1.0], 2)  # too few steps to tell
    model = tiny_model("llama", len(tokenizer))
    # the tiny model's loss stays high (a 49k vocabulary): without the plateau stop it runs all 60 steps
    full = MEMoEEditor(model, tokenizer, MEMoEMethod(**FAST)).edit(_one(*GROW[0]))
    model = tiny_model("llama", len(tokenizer))
    short = MEMoEEditor(model, tokenizer, MEMoEMethod(**FAST, plateau_patience=3)).edit(_one(*GROW[0]))
    assert full.steps == 60 and short.steps < 60
