"""The editor contract, checked the same way for every registered method (in the manner of peft's
shared tuner tests): on the tiny random models of ``tests/conftest.py`` an edit changes the answer,
``remove()`` gives back the unedited model bit for bit, ``save``/``load`` into a fresh editor
reproduces the edited outputs exactly, the same seed gives the same edit, greedy generation with the
KV cache equals argmax over full forwards, and (where the method claims it) a plain forward without
``route()`` is the routed one.

A new method needs one row in ``CASES``: ``test_every_registered_method_has_a_case`` fails until it
has one. Each (method, architecture) is edited once per module (the ``run`` fixture) and every check
reads that edit; only the determinism and save/load checks build a fresh copy of the model.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import polars as pl
import pytest
import torch

from memoe.config import METHODS
from memoe.data import SCHEMA
from memoe.editors import EditResult, make_editor
from memoe.editors.ft import FTMethod
from memoe.editors.grace import GraceMethod
from memoe.editors.lora import LoRAMethod
from memoe.editors.memit import MemitMethod
from memoe.editors.memoe import MEMoEMethod
from memoe.editors.wise import WiseMethod
from memoe.metrics import teacher_forced

from .conftest import tiny_model

EDITS = [
    ("Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "English", "French"),
    ("Toko Yasuda", "Toko Yasuda plays the instrument", "piano", "guitar"),
    ("Autonomous University of Madrid", "Autonomous University of Madrid is located in", "Sweden", "Spain"),
]
FAR = ["Bananas are a kind of", "The capital city of Peru is"]
UNRELATED = ["Bananas are a kind of", "In 1905 Einstein published"]  # prompts an input-keyed edit must leave alone
KINDS = ["llama", "gpt2"]
NEW_TOKENS = 6  # generated tokens in the KV-cache check: the routing of the prompt must hold for all of them


def records(edits=EDITS) -> pl.DataFrame:
    rows = [
        dict(
            id=str(i),
            subject=s,
            prompt=p,
            target_new=t,
            target_true=tt,
            rephrase_prompts=[f"Q: {p}"],
            locality_prompts=[FAR[i % 2]],
            locality_answers=["fruit"],
            portability_prompts=[],
            portability_answers=[],
            generation_prompts=[],
        )
        for i, (s, p, t, tt) in enumerate(edits)
    ]
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


# ---------------------------------------------------------------------- the table
@dataclass
class Case:
    """How a method is tried on a tiny model. ``settings(model)``: fast settings with which the tiny
    random model learns the three edits; ``rel``: the reliability the edit must reach (the method's
    documented bar); ``drop_in``: True where any plain forward applies the edit as ``route()`` does,
    else the reason it does not; ``plain_generation``: without the whole claim, a plain forward of the
    bare prompts and plain ``generate`` still equal the routed ones; ``on_edit(run)`` /
    ``on_remove(run)``: the method's own assertions on the shared edit and after its removal."""

    settings: Callable[[Any], Any]
    rel: float = 0.9
    drop_in: bool | str = True
    plain_generation: bool = False
    on_edit: Callable[[Run], None] | None = None
    on_remove: Callable[[Run], None] | None = None


@dataclass
class Run:
    """One (method, architecture) edited once; the checks read it."""

    method: str
    kind: str
    case: Case
    model: Any
    tok: Any
    cfg: Any
    editor: Any
    recs: pl.DataFrame
    prompts: list[str]
    before: torch.Tensor  # unedited logits on the edit prompts + FAR
    after: torch.Tensor  # edited (routed) logits on the same
    rel_before: float
    gen_before: torch.Tensor  # unedited greedy tokens (left padding) on the same prompts
    stats: dict[str, Any]
    folder: Path  # where the test of remove() saves the edit
    twin: Any = None  # an unedited copy of the model, for the checks on a fresh model
    names: set[str] = field(default_factory=set)  # the unedited model's module names
    unrelated_before: torch.Tensor | None = None
    cache: Path | None = None  # $MEMOE_CACHE of this run (MEMIT's key statistics)


def _grace_claims(run: Run) -> None:
    assert run.stats.details["codebook_size"] == 3
    far = logits(run.model, run.tok, UNRELATED, editor=run.editor)
    assert torch.equal(far, run.unrelated_before)  # unrelated prompts untouched
    assert torch.equal(logits(run.model, run.tok, UNRELATED), run.unrelated_before)  # ... with or without route


def _wise_claims(run: Run) -> None:
    assert run.stats.details["min_edit_score"] > run.stats.details["max_irr_score"]
    far = logits(run.model, run.tok, UNRELATED, editor=run.editor)
    assert torch.equal(far, run.unrelated_before)  # routed to the main memory


def _memit_claims(run: Run) -> None:
    assert len(list((run.cache / "stats").rglob("*.safetensors"))) == 2  # one cached C per layer (and reused)


def _lora_unloaded(run: Run) -> None:
    assert {n for n, _ in run.model.named_modules()} == run.names  # adapters unloaded
    assert not any("lora" in n for n, _ in run.model.named_parameters())


CASES: dict[str, Case] = {
    # test_memoe_editor.py's FAST at 40 steps, which learn these three edits on both tiny models at every
    # seed tried (0-3; 25 steps did too); drop_in is on by default
    "memoe": Case(lambda m: MEMoEMethod(layers=[2], rank=8, lr=5e-2, steps=40, early_stop_loss=0.05)),
    # a variant row ("method+variant"): the fact gate's running mean and latch over the KV cache's decode
    # steps, its hooks under remove(), its keys through save/load
    "memoe+fact_gate": Case(
        lambda m: MEMoEMethod(
            layers=[2], rank=8, lr=5e-2, steps=40, early_stop_loss=0.05, fact_gate=True, fact_gate_layers=[1, 2]
        )
    ),
    # FT-L's norm bound keeps it from learning every edit: its bar is 0.6
    "ft-l": Case(lambda m: FTMethod(name="ft-l", layer=_last(m), lr=5e-2, steps=30, norm_constraint=5e-2), rel=0.6),
    "ft-m": Case(lambda m: FTMethod(name="ft-m", layer=_last(m), lr=1e-2, steps=40)),
    "lora": Case(
        lambda m: LoRAMethod(target_modules=["mlp_out"], rank=4, alpha=8, lr=3e-2, steps=25), on_remove=_lora_unloaded
    ),
    "grace": Case(
        lambda m: GraceMethod(layer=_last(m), eps=1.0, lr=1.0, steps=40),
        on_edit=_grace_claims,
        drop_in="its key is the prompt's last token, which a forward of prompt + target cannot tell without "
        "route(); a bare prompt's is its last token, so plain generation is the routed one",
        plain_generation=True,
    ),
    "memit": Case(
        lambda m: MemitMethod(
            layers=[1, 2],
            fact_token="last",
            corpus="pydoc",
            mom2_tokens=4096,
            mom2_seq_len=64,
            mom2_weight=10.0,
            v_lr=0.5,
            v_steps=20,
            clamp_norm_factor=8.0,
        ),
        on_edit=_memit_claims,
    ),
    "wise": Case(
        lambda m: WiseMethod(
            layer=_last(m),
            lr=0.5,
            steps=40,
            mask_ratio=0.5,
            corpus="pydoc",
            irr_margin=0.05,
            edit_margin=1.0,
            gap=0.5,
            irr_chunks=8,
            irr_len=16,
        ),
        on_edit=_wise_claims,
    ),
}


def test_every_registered_method_has_a_case():
    """Adding a method is one package plus one row here."""
    base = {name.split("+")[0] for name in CASES}  # "method+variant" rows check an option of a method
    assert base == set(METHODS), f"registered methods without a row in CASES: {sorted(set(METHODS) - base)}"
    model = tiny_model("llama", 64)
    for name, case in CASES.items():
        cfg = case.settings(model)
        assert cfg.name == name.split("+")[0] and isinstance(cfg, METHODS[cfg.name].config), name


# ---------------------------------------------------------------------- the shared edit
def _left_padded(tok, prompts):
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        return tok(prompts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side


def _generate(model, tok, prompts, editor=None):
    enc = _left_padded(tok, prompts)
    ctx = editor.route(prompts) if editor is not None else torch.no_grad()
    with torch.no_grad(), ctx:
        return model.generate(
            **enc, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id
        )


@pytest.fixture(scope="module", params=[(m, k) for m in CASES for k in KINDS], ids=lambda p: f"{p[0]}-{p[1]}")
def run(request, tokenizer, tmp_path_factory):
    method, kind = request.param
    case = CASES[method]
    tmp = tmp_path_factory.mktemp(f"{method}-{kind}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEMOE_CACHE", str(tmp / "cache"))  # MEMIT's key statistics: a cache of this run's own
        model, tok = tiny_model(kind, len(tokenizer)), tokenizer
        cfg = case.settings(model)
        recs = records()
        prompts = recs["prompt"].to_list() + FAR
        names, twin = {n for n, _ in model.named_modules()}, copy.deepcopy(model)
        before, unrelated = logits(model, tok, prompts), logits(model, tok, UNRELATED)
        gen_before, rel_before = _generate(model, tok, prompts), rel(model, tok, recs)
        ed = make_editor(model, tok, cfg, seed=0)
        stats = ed.edit(recs)
        r = Run(
            method,
            kind,
            case,
            model,
            tok,
            cfg,
            ed,
            recs,
            prompts,
            before,
            logits(model, tok, prompts, editor=ed),
            rel_before,
            gen_before,
            stats,
            tmp / "saved",
            twin,
            names,
            unrelated,
            tmp / "cache",
        )
        yield r
        r.editor.remove()


def _fresh(r: Run):
    """The unedited copy of the model (every check that edits it removes its edit): checked unedited."""
    assert torch.equal(logits(r.twin, r.tok, r.prompts), r.before)
    return r.twin


# ---------------------------------------------------------------------- the checks
def test_edit_changes_the_answer(run):
    assert run.stats  # edit() reports its training
    r1 = rel(run.model, run.tok, run.recs, editor=run.editor)
    assert run.rel_before < 0.5 and r1 >= run.case.rel, (run.rel_before, r1)


def test_edit_reports_an_edit_result(run):
    """``edit()`` returns the shared figures under the same names for every method, and one flat
    JSON-able dict of them and the method's own."""
    st = run.stats
    assert isinstance(st, EditResult) and st.n_edits == len(run.recs) and st.steps >= 1
    assert st.loss_final is not None and st.seconds >= st.setup_s >= 0
    flat = json.loads(json.dumps(st.as_dict()))
    assert flat == {
        "steps": st.steps,
        "loss_first": st.loss_first,
        "loss_final": st.loss_final,
        "seconds": st.seconds,
        "n_edits": st.n_edits,
        "setup_s": st.setup_s,
        **st.details,
    }


def test_save_load_reproduces_the_edit(run, tmp_path):
    run.editor.save(tmp_path / "ed")
    model = _fresh(run)
    ed2 = make_editor(model, run.tok, run.cfg, seed=0)
    ed2.load(tmp_path / "ed")
    assert ed2.edits_applied == run.editor.edits_applied == len(run.recs)
    assert torch.equal(logits(model, run.tok, run.prompts, editor=ed2), run.after)
    ed2.remove()
    assert torch.equal(logits(model, run.tok, run.prompts), run.before)


def test_same_seed_same_edit(run):
    """The same seed gives the same edit, with the progress callback ``on_step`` listening: a method
    that trains in steps calls it once per step, with the step's loss."""
    model = _fresh(run)
    ed3 = make_editor(model, run.tok, run.cfg, seed=0)
    seen = []
    ed3.on_step = lambda step, loss: seen.append((step, loss))
    st = ed3.edit(run.recs)
    try:
        assert torch.equal(logits(model, run.tok, run.prompts, editor=ed3), run.after)
        if "steps" in type(run.cfg).model_fields:
            assert [s for s, _ in seen] == list(range(1, st.steps + 1)) and seen[-1][1] == st.loss_final
            assert (st.steps, st.loss_first, st.loss_final) == (
                run.stats.steps,
                run.stats.loss_first,
                run.stats.loss_final,
            )
        else:  # MEMIT: a closed-form update
            assert seen == []
    finally:
        ed3.remove()


def test_kv_cache_generation_equals_full_forwards(run):
    """Greedy ``generate`` with the KV cache gives the tokens of argmax over repeated full forwards
    (no cache), under the editor's routing; left padding, edit prompts and unrelated ones in one batch."""
    model, tok, ed = run.model, run.tok, run.editor
    cached = _generate(model, tok, run.prompts, editor=ed)
    enc = _left_padded(tok, run.prompts)
    ids, mask = enc.input_ids, enc.attention_mask
    eos = model.generation_config.eos_token_id
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), dtype=ids.dtype)
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad(), ed.route(run.prompts):
        for _ in range(NEW_TOKENS):
            pos = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
            nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)  # generate pads a finished row
            done |= torch.isin(nxt, eos)
            ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if bool(done.all()):
                break
    assert torch.equal(cached, ids)
    n = len(run.recs)
    assert not torch.equal(cached[:n], run.gen_before[:n])  # the edit acts in the generated tokens


def test_plain_forward_is_the_routed_one(run):
    """Drop-in: without ``route()`` the model gives what the routed evaluation gives (teacher-forced
    edit prompts, rephrases and unrelated prompts)."""
    if run.case.drop_in is not True:
        pytest.skip(f"{run.method} does not claim drop-in: {run.case.drop_in}")
    model, tok, ed = run.model, run.tok, run.editor
    texts = run.recs["prompt"].to_list() + [r[0] for r in run.recs["rephrase_prompts"].to_list()] + FAR
    targets = run.recs["target_new"].to_list() * 2 + ["fruit"] * len(FAR)
    routed = teacher_forced(model, tok, texts, targets, editor=ed)
    plain = teacher_forced(model, tok, texts, targets)
    assert routed.pred == plain.pred and routed.logprob == plain.logprob


def test_plain_generation_is_the_routed_one(run):
    """Drop-in for prompts: without ``route()``, the logits of the bare prompts and greedy generation
    (left padding, KV cache) are the routed ones."""
    if run.case.drop_in is not True and not run.case.plain_generation:
        pytest.skip(f"{run.method} does not claim drop-in: {run.case.drop_in}")
    model, tok, ed = run.model, run.tok, run.editor
    assert torch.equal(logits(model, tok, run.prompts), run.after)
    assert torch.equal(_generate(model, tok, run.prompts), _generate(model, tok, run.prompts, editor=ed))


def test_what_the_edit_claims_to_leave_alone_is_left_alone(run):
    """``leaves_unchanged``: where an editor says its edit acts nowhere, the output is the unedited
    model's, bit for bit (the evaluation takes the unedited model's answers there without running it)."""
    prompts = run.prompts + UNRELATED
    said = run.editor.leaves_unchanged(prompts)
    assert len(said) == len(prompts) and not any(said[: len(run.recs)]), said  # the edits act on their prompts
    twin = _fresh(run)
    for p, alone in zip(prompts, said):
        if alone:
            assert torch.equal(logits(run.model, run.tok, [p], editor=run.editor), logits(twin, run.tok, [p])), p


def test_the_layers_said_unchanged_are_unchanged_and_their_states_reusable(run):
    """``unchanged_layers``: the states entering that layer are the unedited model's, and scoring from
    them (memoe/frozen.py) gives the full forward's argmax."""
    from memoe.frozen import FrozenStates, capture_input

    layer = run.editor.unchanged_layers()
    if layer < 1:
        pytest.skip(f"{run.method}: does not say which layers it leaves unchanged")
    prompts = run.prompts
    seen, seen_twin = [], []
    twin = _fresh(run)
    enc = run.tok(prompts, return_tensors="pt", padding=True)
    hook = capture_input(run.model, layer, seen)
    with torch.no_grad(), run.editor.route(prompts):
        run.model(**enc)
    hook.remove()
    hook = capture_input(twin, layer, seen_twin)
    with torch.no_grad():
        twin(**enc)
    hook.remove()
    assert torch.equal(seen[0], seen_twin[0])
    targets = run.recs["target_new"].to_list() + ["fruit", "Lima"]
    plain = teacher_forced(run.model, run.tok, prompts, targets, editor=run.editor)
    states = FrozenStates(layer)
    teacher_forced(run.model, run.tok, prompts, targets, editor=run.editor, frozen=states)
    reused = teacher_forced(run.model, run.tok, prompts, targets, editor=run.editor, frozen=states)
    assert states.hits == len(prompts) and reused.pred == plain.pred


def test_the_methods_own_claims(run):
    if run.case.on_edit is None:
        pytest.skip(f"{run.method}: no claims beyond the contract")
    run.case.on_edit(run)


def test_remove_is_bit_exact(run):
    """Last in the file, so the checks above read the trained editor; it leaves the edit loaded
    back for any check that runs after it."""
    run.editor.save(run.folder)
    run.editor.remove()
    try:
        assert torch.equal(logits(run.model, run.tok, run.prompts), run.before)
        if run.case.on_remove is not None:
            run.case.on_remove(run)
    finally:  # the edit back for the checks after this one: a fresh editor loads it
        run.editor = make_editor(run.model, run.tok, run.cfg, seed=0)
        run.editor.load(run.folder)
    assert torch.equal(logits(run.model, run.tok, run.prompts, editor=run.editor), run.after)
