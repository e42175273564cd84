"""MEMoE: a bypass mixture-of-experts adapter beside one MLP, routed by knowledge anchors.

``MEMoEEditor(model, tok, cfg).edit(records)`` trains the adapter on the records' target NLL
(prompt masked; optionally also on ROME-style self-generated context prefixes + prompt) and can be
called again for sequential rounds (it keeps training the same adapter and replays the earlier
rounds' edit prompts, which are edits, never evaluation data). ``route(prompts)`` sets each batch
row's anchor before a forward or ``generate`` call. See ../shared/design/MEMOE.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import polars as pl
import torch

from memoe.adapter import LayerCache, MEMoEAdapter, final_norm, supports_layer_cache
from memoe.anchors import Anchor, AnchorExtractor, anchor_embeddings, anchor_tokens, gold_anchor, normalise_subject
from memoe.data import encode_pair
from memoe.editors.base import Editor, EditResult
from memoe.editors.common import (
    can_compile,
    compiled_layers,
    edit_batch,
    head_nll_sum,
    length_buckets,
    packed_batch,
    packing_is_exact,
    resolve_precision,
    token_groups,
    training_precision,
)
from memoe.editors.memoe.config import MEMoEMethod
from memoe.editors.memoe.fact_gate import FactGate
from memoe.models import decoder_layers, mlp_of
from memoe.probes import chat_prompt, restyle, scope_negatives

ROME_STARTS = ["The", "Therefore", "Because", "I", "You"]


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the part it needs is computed."""


def _cast_floats(obj, dtype: torch.dtype):
    """Floating tensors inside nested tuples / lists / dicts cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_floats(x, dtype) for x in obj)
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    return obj


class MEMoEEditor(Editor):
    name = "memoe"
    uses_anchors = True  # the study extracts knowledge anchors for it

    def __init__(self, model, tokenizer, cfg=None, seed: int = 0):
        cfg = cfg or MEMoEMethod()
        super().__init__(model, tokenizer, cfg, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.adapter = MEMoEAdapter(
                model,
                list(cfg.layers),
                num_experts=cfg.num_experts,
                top_k=cfg.top_k,
                form=cfg.expert_form,
                rank=cfg.rank,
                lam=cfg.lam,
                noise=cfg.router_noise,
                expert_sees_anchor=cfg.expert_sees_anchor,
                act=cfg.expert_act,
            )
        self.adapter.eval()
        self.adapter.state.default_gate = 1.0 if cfg.gate_mode == "always" else 0.0
        self._auto_cache: dict[tuple, tuple] = {}
        if cfg.drop_in:
            self.adapter.state.auto = self._auto_context
        self.extractor = AnchorExtractor(ner=cfg.ner_fallback)
        self.gate: FactGate | None = None
        self._gate_subjects: list[str] = []  # from the saved extra state, for the gate's keys
        if cfg.fact_gate:
            n = len(decoder_layers(model))
            top = min(l % n for l in self.adapter.layer_ids)
            bad = [l for l in cfg.fact_gate_layers if not -n <= l < n or l % n > top]
            if bad:
                raise ValueError(
                    f"fact_gate_layers {bad}: the gate reads the inputs of decoder layers at or below the adapter's "
                    f"layer {top} (the model has {n} layers)"
                )
            st = self.adapter.state
            self.gate = FactGate(
                model,
                tokenizer,
                cfg.fact_gate_layers,
                cfg.fact_gate_margin,
                cfg.fact_gate_negatives,
                sentence=cfg.fact_gate_sentence,
                wanted=lambda: st.scope is not None and st.active is None,
            )
            st.mask_fn = lambda B, T, device: self.gate.open_mask(st.scope, st.attention_mask, st.past, B, T, device)
        self.history: list[tuple[str, str, str]] = []  # (prompt, target, subject) of every edit in force
        self.overwritten: dict[str, list[tuple[str, str, str]]] = {}  # prompt key -> the edits re-edits replaced
        self.block_of: dict[str, int] = {}  # growth 'round': normalised subject -> the block holding its latest edits
        # recurring 'stack': normalised subject -> the earlier blocks that still hold some of its edits
        self.earlier_blocks: dict[str, list[int]] = {}
        self._train_block: int | None = None  # growth 'round', inside edit(): the block being trained
        self.templates: list[str] | None = None
        self.rounds = 0
        self.uses_layer_cache = bool(cfg.layer_cache) and supports_layer_cache(model)
        self._head_weight: torch.Tensor | None = None  # the LM head in the training dtype, while training
        self._warned_packing = False
        self._digests: dict[int, tuple] = {}  # block -> (its weights' stamp, their digest): row_versions
        self.compiles = bool(cfg.compile) and can_compile(self.device)
        if cfg.compile and not self.compiles:
            warnings.warn(
                f"compile: torch.compile cannot build kernels on {self.device} here (no C++ compiler / "
                "triton): training runs eagerly",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ routing
    def anchors_for(self, prompts: Sequence[str]) -> list[Anchor]:
        return self.extractor.extract_all(prompts)

    def _context(
        self,
        texts: Sequence[str],
        anchors: Sequence[Anchor],
        spans: Sequence[tuple[int, int]] | None = None,
        begins: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """A batch's routing context; ``spans``: each row's anchor tokens (first, last), and ``begins``
        (fact gate): the first token of the anchor's sentence, found here from the texts when not given."""
        always = self.cfg.gate_mode == "always"
        names = [a.text if (a.known or (always and a.found)) else None for a in anchors]
        emb = anchor_embeddings(self.model.get_input_embeddings(), self.tokenizer, names, self.cfg.anchor_pooling)
        gate = torch.tensor([1.0 if (always or a.known) else 0.0 for a in anchors], device=self.device)
        start = None
        if self.cfg.apply_from == "anchor" or self.gate is not None:
            if spans is None:
                spans = [anchor_tokens(self.tokenizer, t, a) if a.found else (0, 0) for t, a in zip(texts, anchors)]
            start = torch.tensor([last for _, last in spans], dtype=torch.long, device=self.device)
        ctx = dict(anchor=emb, gate=gate, start=start)
        if self.gate is not None:  # each row's edited subject, its tokens and its sentence's, for the fact gate
            if begins is None:
                begins = [self.gate.text_begin(t, sp[0]) for t, sp in zip(texts, spans)]
            ctx["scope"] = [
                (self.extractor.canonical(a.text), *sp, b) if a.known else None
                for a, sp, b in zip(anchors, spans, begins)
            ]
        if self.cfg.growth == "round":  # the anchor index: each known subject's block(s) (training: the new one)
            if self.cfg.recurring == "stack":
                ctx["block"] = self._membership(anchors)
            elif self._train_block is not None:
                ctx["block"] = self._train_block
            else:
                ctx["block"] = torch.tensor(
                    [self.block_of.get(normalise_subject(a.text), 0) if a.known else 0 for a in anchors],
                    dtype=torch.long,
                    device=self.device,
                )
        return ctx

    def blocks_for(self, subject: str) -> list[int]:
        """Growth 'round': the blocks a known subject's rows run through (recurring 'move': the one block
        holding its edits; 'stack': every block holding some of them, earliest first)."""
        key = normalise_subject(subject)
        return self.earlier_blocks.get(key, []) + [self.block_of.get(key, 0)]

    def _membership(self, anchors: Sequence[Anchor]) -> torch.Tensor:
        """Recurring 'stack': (B, n_blocks) bool, the blocks each row runs through: its subject's blocks
        (while training, the frozen ones holding the subject's earlier edits and the block being trained)."""
        mem = torch.zeros(len(anchors), self.adapter.n_blocks, dtype=torch.bool)
        for r, a in enumerate(anchors):
            if not a.known:
                mem[r, 0] = True  # a silent row (gate 0): any block, it adds nothing
                continue
            blocks = self.blocks_for(a.text) if normalise_subject(a.text) in self.block_of else []
            if self._train_block is not None:
                blocks.append(self._train_block)
            mem[r, blocks or [0]] = True
        return mem.to(self.device)

    @contextlib.contextmanager
    def _set(self, ctx: dict[str, torch.Tensor | None]) -> Iterator[None]:
        st = self.adapter.state
        old = st.set(ctx)
        try:
            yield
        finally:
            st.restore(old)

    def _auto_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
        """Drop-in routing: the routing context of a batch found from its token ids alone (each row's
        real tokens decoded, then the same anchor search as ``route``), so a plain ``model(...)`` or
        ``model.generate(...)`` applies the edits. Rows are cached by their ids."""
        texts, anchors, spans, begins = [], [], [], []
        ids_cpu = input_ids.detach().cpu()
        mask = attention_mask.detach().cpu().bool() if attention_mask is not None else None
        for b in range(ids_cpu.shape[0]):
            row = ids_cpu[b][mask[b]] if mask is not None and mask.shape == ids_cpu.shape else ids_cpu[b]
            key = tuple(row.tolist())
            hit = self._auto_cache.get(key)
            if hit is None:
                text = self.tokenizer.decode(list(key), skip_special_tokens=False)
                anchor = self.extractor(text)
                span = (0, 0)
                if (self.cfg.apply_from == "anchor" or self.gate is not None) and anchor.found and anchor.end > 0:
                    # the first tokens whose decoded prefix passes the anchor's first and covers its last character
                    # (decoding stops there: the prefixes beyond the anchor are not decoded)
                    first = None
                    for j in range(len(key)):
                        c = len(self.tokenizer.decode(list(key[: j + 1]), skip_special_tokens=False))
                        first = j if first is None and c > anchor.start else first
                        if c >= anchor.end:
                            span = (first or 0, j)
                            break
                hit = (text, anchor, span, self.gate.begin(key, span[0]) if self.gate is not None else 0)
                if len(self._auto_cache) > 4096:
                    self._auto_cache.clear()
                self._auto_cache[key] = hit
            texts.append(hit[0])
            anchors.append(hit[1])
            spans.append(hit[2])
            begins.append(hit[3])
        ctx = self._context(texts, anchors, spans=spans, begins=begins)
        return ctx

    @contextlib.contextmanager
    def route(self, prompts: list[str]) -> Iterator[None]:
        with self._set(self._context(prompts, self.anchors_for(prompts))):
            yield

    # ------------------------------------------------------------------ context templates
    @torch.no_grad()
    def context_templates(self) -> list[str]:
        """ROME-style prefixes the model itself generates (seeded), e.g. 'The first time I. '"""
        if self.templates is not None:
            return self.templates
        n = self.cfg.context_templates
        out: list[str] = []
        if n:
            starts = [ROME_STARTS[i % len(ROME_STARTS)] for i in range(n)]
            tok = self.tokenizer
            side = tok.padding_side
            tok.padding_side = "left"
            silent = dict(anchor=None, gate=torch.zeros(len(starts), device=self.device), start=None)
            try:
                with (
                    self._set(silent),
                    torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]),
                ):
                    torch.manual_seed(self.seed)
                    batch = tok(starts, return_tensors="pt", padding=True).to(self.device)
                    gen = self.model.generate(
                        **batch,
                        max_new_tokens=self.cfg.template_tokens,
                        do_sample=True,
                        top_k=5,
                        pad_token_id=tok.pad_token_id,
                    )
            finally:
                tok.padding_side = side
            for s, g in zip(starts, tok.batch_decode(gen[:, batch.input_ids.shape[1] :], skip_special_tokens=True)):
                text = (s + g).replace("\n", " ").replace("{", " ").replace("}", " ").strip()
                out.append(" ".join(text.split()) + ". ")
        self.templates = out
        return out

    # ------------------------------------------------------------------ training
    def _examples(self, items: Sequence[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        """The training rows of some edits: each edit prompt, with each context prefix, and in each
        form of ``augment`` (the edit prompt itself restyled; never a rephrase or any evaluation text)."""
        rows = []
        for p, t, s in items:
            rows.append((p, t, s))
            for tpl in self.context_templates():
                rows.append((tpl + p, t, s))
            for form in self.cfg.augment:
                if form == "chat":
                    c = chat_prompt(self.tokenizer, p)
                    if c:
                        rows.append((c, t, s))
                elif form == "lower":
                    rows.append((restyle(p, s, 0), t, s))
        return rows

    def _loss(self, batch: dict, ctx: dict, cache: tuple | None, reduction: str = "mean") -> torch.Tensor:
        h, y = self._hidden(batch, ctx, cache)
        head = self.model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            return torch.nn.functional.cross_entropy(head(h).float(), y, reduction=reduction)
        # under mixed precision the LM head is cast to the training dtype once per round (autocast
        # would re-cast the frozen vocab x d matrix at every call)
        w = self._head_weight if self._head_weight is not None else head.weight.detach()
        loss = head_nll_sum(h, w, y)
        return loss if reduction == "sum" else loss / max(len(y), 1)

    def _forget_loss(self, part: tuple) -> torch.Tensor:
        """Unlikelihood of the overwritten targets (``_forget_part``): mean of -log(1 - p) over their
        tokens, each after the overwritten target's own earlier tokens (as its reliability is scored)."""
        batch, ctx, cache = part
        h, y = self._hidden(batch, ctx, cache)
        head = self.model.get_output_embeddings()
        logits = head(h.to(head.weight.dtype)).float()
        logp = torch.log_softmax(logits, -1).gather(1, y[:, None])[:, 0]
        return -torch.log1p(-logp.exp().clamp(max=1 - 1e-6)).mean()

    def _forget_part(self, forget: Sequence[tuple[str, str, str, str]]) -> tuple | None:
        """The overwritten edits of a round, prepared once: (prompt, old target, subject) rows whose labels
        keep only the old target's tokens from the first one that differs from the latest target's."""
        if not forget:
            return None
        rows = [(p, old, s) for p, old, _, s in forget]
        batch, ctx, cache = self._prepare(rows, pack=False)  # one row per batch row: its labels are cut below
        labels = batch["labels"]
        for r, (p, old, new, _) in enumerate(forget):
            o, n = encode_pair(self.tokenizer, p, old), encode_pair(self.tokenizer, p, new)
            old_ids, new_ids = o[0][o[1] :], n[0][n[1] :]
            shared = 0
            while shared < min(len(old_ids), len(new_ids)) and old_ids[shared] == new_ids[shared]:
                shared += 1
            cols = (labels[r] != -100).nonzero(as_tuple=True)[0]
            labels[r, cols[:shared]] = -100
        if not bool((labels != -100).any()):
            return None
        return batch, ctx, cache

    def _hidden(self, batch: dict, ctx: dict, cache: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-normed hidden states at the positions that predict a label, and those labels."""
        labels = batch["labels"]
        rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
        st = self.adapter.state
        with self._set(ctx):
            if cache is not None:
                st.attention_mask, st.past = None, 0  # right-padded rows, no KV cache
                cache, mlp_in = cache
                if mlp_in is not None:  # layer l's output without the adapter + the adapter's term
                    hidden = self.adapter.add_term(mlp_in, cache.hidden)
                    if torch.is_autocast_enabled(hidden.device.type):  # layers above l in the autocast
                        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))  # dtype, no casts
                    h = cache.run(self.model, hidden=hidden)
                else:
                    h = cache.run(self.model)
                h = final_norm(self.model)(h[rows, cols])
            else:
                h = self.model.base_model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    position_ids=batch.get("position_ids"),
                    use_cache=False,
                ).last_hidden_state[rows, cols]
        return h, labels[rows, cols + 1]

    def _capture(self, batch: dict) -> tuple[LayerCache, torch.Tensor | None]:
        """The layer cache of a batch, and the input of layer l's MLP. The adapter only adds a term
        to that MLP's output, so layer l itself computes the same thing at every step too: the
        cache holds layer l's output with the adapter switched off (its input to layer l+1), and
        each step adds the adapter's term for the cached MLP input and runs layers l+1.. only."""
        first = self.adapter.layer_ids[0]
        ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch.get("position_ids")
        layers = decoder_layers(self.model)
        # the last layer, or a norm after the MLP (Gemma 2/3: the adapter's term is not additive on
        # the layer's output): cache the layers below l only
        if first + 1 >= len(layers) or hasattr(layers[first], "post_feedforward_layernorm"):
            return LayerCache.capture(self.model, first, ids, mask, pos), None
        kept = {}

        def keep(module, args, output):  # returns None: the output is left as it is
            kept["x"] = args[0].detach()

        handle = mlp_of(self.model, first).register_forward_hook(keep)
        silent = dict(anchor=None, gate=torch.zeros(ids.shape[0], device=self.device), start=None)
        try:
            with self._set(silent):
                cache = LayerCache.capture(self.model, first + 1, ids, mask, pos)
        finally:
            handle.remove()
        if torch.is_autocast_enabled(self.device.type):  # rotary tables and mask in the autocast dtype:
            cache.calls = _cast_floats(cache.calls, torch.get_autocast_dtype(self.device.type))  # no fp32 detours
        return cache, kept["x"]

    def _prepare(self, rows: Sequence[tuple[str, str, str]], pack: bool | None = None):
        """A batch of training rows (packed: ``pack``, default ``_packs()``), its routing context, and
        its layer cache (where the editor uses one)."""
        prompts, targets, subjects = zip(*rows)
        packed = self._packs() if pack is None else pack
        if packed:
            batch = packed_batch(self.tokenizer, list(prompts), list(targets), self.device, self.cfg.pack_tokens)
        else:
            batch = edit_batch(self.tokenizer, list(prompts), list(targets), self.device)
        anchors = [gold_anchor(p, s) for p, s in zip(prompts, subjects)]
        # training rows route like inference rows: the gold subject is a known anchor
        ctx = self._context(list(prompts), anchors)
        if self.cfg.gate_mode == "anchor":
            ctx["gate"] = torch.ones_like(ctx["gate"])
        if self.gate is not None:  # the adapter trains where the gate will let it act at inference
            ctx["start"] = self._gated_starts(list(prompts), list(subjects), ctx.pop("scope"), ctx["start"])
        if packed:
            ctx = self._per_token(ctx, batch)
        return batch, ctx, self._capture(batch) if self.uses_layer_cache else None

    def _packs(self) -> bool:
        """Pack training rows (``pack_tokens``) where the model keeps packed rows apart."""
        if not self.cfg.pack_tokens:
            return False
        if not packing_is_exact(self.model):
            if not self._warned_packing:
                warnings.warn(
                    f"{type(self.model).__name__} lets packed rows attend to each other: "
                    "training on padded rows (length buckets) instead",
                    stacklevel=2,
                )
                self._warned_packing = True
            return False
        return True

    def _gated_starts(self, prompts: list[str], subjects: list[str], scope: list, starts: torch.Tensor) -> torch.Tensor:
        """Training rows' first active token under the fact gate: where the gate opens on the prompt
        (never before the anchor's end), or the prompt's last token where it does not open there."""
        opens = self.gate.open_from(
            prompts, [r[0] if r else self.extractor.canonical(g) for r, g in zip(scope, subjects)]
        )
        last = [len(self.tokenizer(p).input_ids) - 1 for p in prompts]
        return torch.tensor(
            [max(int(s), o if o is not None else n) for s, o, n in zip(starts.tolist(), opens, last)],
            dtype=torch.long,
            device=self.device,
        )

    @staticmethod
    def _per_token(ctx: dict, batch: dict) -> dict:
        """A per-row routing context spread over a packed batch's tokens (padding: inactive)."""
        row = batch["row"]
        real = row >= 0
        r = row.clamp(min=0)
        active = real & (ctx["gate"][r] > 0)
        if ctx["start"] is not None:
            active = active & (batch["position_ids"] >= ctx["start"][r])
        anchor = ctx["anchor"][r] * real[..., None].to(ctx["anchor"].dtype)
        block = ctx.get("block")
        if isinstance(block, torch.Tensor) and block.dtype == torch.bool:  # each row's blocks, over its tokens
            block = block[r]
        return dict(anchor=anchor, gate=None, start=None, active=active, block=block)

    # ------------------------------------------------------------------ scope: same subject, other relations
    def scope_rows(self, items: Sequence[tuple[str, str, str]]) -> list[tuple[str, str]]:
        """Training negatives of some edits: (prompt, subject) for each edit's subject with
        ``scope_negatives`` other relations (``memoe.probes.SCOPE_RELATIONS``; never a relation that any
        edit of the same subject edits, never an evaluation probe's relation)."""
        n = self.cfg.scope_negatives
        if not n:
            return []
        by_subject: dict[str, list[str]] = {}
        for p, _, subj in list(self.history) + list(items):
            by_subject.setdefault(self.extractor.canonical(subj), []).append(p)
        out, seen = [], set()
        for p, _, subj in items:
            all_prompts = " ".join(by_subject.get(self.extractor.canonical(subj), [p]))
            for q in scope_negatives(all_prompts, subj, n, salt=f"{p}\x1f{self.rounds}"):
                if (q, subj) not in seen:
                    seen.add((q, subj))
                    out.append((q, subj))
        return out

    @torch.no_grad()
    def _scope_part(self, rows: Sequence[tuple[str, str]], only_block: int | None = None) -> dict | None:
        """The negatives of a round, prepared once: the input of layer l's MLP at their tokens (the
        adapter silent: nothing below l depends on it), their routing context as inference would give
        it, and the scale of the MLP's own output there. The scope loss keeps the adapter's term at
        these tokens near zero, so the model says there exactly what the unedited model says.
        ``only_block``: the term of that one block (recurring 'stack': the block being trained, kept
        silent on the prompts of the subject's earlier edits, which its frozen blocks answer)."""
        if not rows:
            return None
        prompts, subjects = [list(x) for x in zip(*rows)]
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "right"
        try:
            enc = tok(prompts, return_tensors="pt", padding=True).to(self.device)
        finally:
            tok.padding_side = side
        x, y = self._frozen_mlp_io(enc.input_ids, enc.attention_mask)
        anchors = [gold_anchor(p, s) for p, s in zip(prompts, subjects)]
        ctx = self._context(prompts, anchors)
        ctx.pop("scope", None)  # trained silent everywhere from the anchor on
        if only_block is not None:
            ctx["block"] = only_block
        if self.cfg.gate_mode == "anchor":
            ctx["gate"] = torch.ones_like(ctx["gate"])
        valid = self._from_anchor(enc.attention_mask, ctx)
        scale = float(y[valid].float().pow(2).sum(-1).mean().clamp(min=1e-12))
        return dict(x=x.float(), ctx=ctx, valid=valid, scale=scale)

    @torch.no_grad()
    def _frozen_mlp_io(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The input and output of the adapter's (lowest) layer's MLP on right-padded rows, the adapter silent
        (nothing below that layer depends on it); nothing above the MLP runs."""
        kept: dict[str, torch.Tensor] = {}

        def keep(module, args, output):
            kept["x"], kept["y"] = args[0].detach(), output.detach()
            raise _StopForward

        handle = mlp_of(self.model, self.adapter.layer_ids[0]).register_forward_hook(keep)
        silent = dict(anchor=None, gate=torch.zeros(input_ids.shape[0], device=self.device), start=None)
        try:
            with self._set(silent):
                self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return kept["x"], kept["y"]

    def _from_anchor(self, attention_mask: torch.Tensor, ctx: dict) -> torch.Tensor:
        """(B, T) bool: the real tokens of right-padded rows where the adapter acts under ``ctx`` (from the
        row's ``start`` on, where it has one)."""
        valid = attention_mask.bool()
        if ctx["start"] is not None:
            valid = valid & (torch.arange(valid.shape[1], device=self.device)[None, :] >= ctx["start"][:, None])
        return valid

    @torch.no_grad()
    def _protect(self, block: int, keep: Sequence[tuple[str, str, str]]) -> int:
        """Keep 'nullspace': hide from block ``block`` the span of what its experts would read at the adapter's
        layer on ``keep``'s edits (each (prompt, target) in the trained forms, every token the adapter acts on:
        the MLP input, and the row's anchor where the experts see it). That input is the frozen model's (no
        adapter runs below its one layer), so the block's term there is zero whatever it learns. Returns the
        number of directions hidden."""
        rows = self._examples(keep)
        if not rows:
            return 0
        layer = self.adapter.layer_ids[0]
        prompts, targets, subjects = (list(x) for x in zip(*rows))
        batch = edit_batch(self.tokenizer, prompts, targets, self.device)
        x, _ = self._frozen_mlp_io(batch["input_ids"], batch["attention_mask"])
        ctx = self._context(prompts, [gold_anchor(p, s) for p, s in zip(prompts, subjects)])
        valid = self._from_anchor(batch["attention_mask"], ctx)
        z = x.double()
        moe = self.adapter.block(block)[str(layer)]
        if moe.sees_anchor:
            z = torch.cat([z, ctx["anchor"].double()[:, None, :].expand(-1, z.shape[1], -1)], -1)
        _, sv, vh = torch.linalg.svd(z[valid], full_matrices=False)
        r = int((sv > self.cfg.keep_nullspace_tol * sv[0]).sum())
        self.adapter.protect(block, layer, vh[:r].T.float())
        return r

    def _scope_loss(self, part: dict) -> torch.Tensor:
        """Mean squared size of the adapter's term at the negatives' tokens, relative to the MLP's own
        output there (0: the unedited model's behaviour exactly)."""
        st = self.adapter.state
        with self._set(part["ctx"]):
            st.attention_mask, st.past = None, 0  # right-padded rows, no KV cache
            d = self.adapter.delta(part["x"].to(next(self.adapter.parameters()).dtype))
        return d[part["valid"]].float().pow(2).sum(-1).mean() / part["scale"]

    def train_loss(self, records_or_rows, use_cache: bool | None = None) -> torch.Tensor:
        """The training loss of the current adapter on some edits (tests compare cached/uncached)."""
        rows = records_or_rows if isinstance(records_or_rows, list) else self._rows(records_or_rows)
        batch, ctx, cache = self._prepare(rows)  # captured there when the editor uses the cache
        use = use_cache if use_cache is not None else self.uses_layer_cache
        if use and cache is None:
            cache = self._capture(batch)
        return self._loss(batch, ctx, cache if use else None)

    def gradient_pass(self, records: pl.DataFrame) -> Callable[[], float]:
        """One training step's forward and backward over ``records`` as a step of ``edit()`` runs them
        (their rows and context prefixes, packed, from the layer cache, in the round's precision), without
        the optimiser: each call of the returned function accumulates the gradient into the adapter's
        ``.grad`` and returns the summed NLL. The rows are prepared on the first call: call it inside a
        round (from ``on_step``); with growth 'round' it runs through the block being trained. Benchmarks
        time it (``benchmarks/gauge.py``)."""
        rows = self._examples(self._rows(records))
        parts: list[tuple] = []

        def run() -> float:
            if not parts:
                parts.extend(self._step_parts(rows, self._packs()))
            if self._train_block is not None:  # growth 'round': through the block being trained alone (the
                for _, ctx, _, _ in parts:  # same work every round, whatever blocks the rows' subjects have)
                    ctx["block"] = self._train_block
            with torch.enable_grad():
                return self._backward(parts)

        return run

    @staticmethod
    def _rows(records: pl.DataFrame) -> list[tuple[str, str, str]]:
        return list(zip(records["prompt"].to_list(), records["target_new"].to_list(), records["subject"].to_list()))

    def _step_parts(self, chunk: Sequence[tuple[str, str, str]], packed: bool) -> list[tuple]:
        """One optimiser step's rows, prepared: [(batch, ctx, cache, n_target_tokens)], one part per
        micro-batch (packed) or length bucket."""
        cfg = self.cfg
        lengths = [len(encode_pair(self.tokenizer, p, t)[0]) for p, t, _ in chunk]
        if packed:  # packed rows: one batch per step, in micro-batches of bounded size
            groups = token_groups(lengths, cfg.max_batch_tokens, cfg.pack_tokens)
        elif cfg.length_buckets:
            groups = length_buckets(lengths)
        else:
            groups = [list(range(len(chunk)))]
        parts = []
        for g in groups:
            batch, ctx, cache = self._prepare([chunk[j] for j in g])
            parts.append((batch, ctx, cache, int((batch["labels"][:, 1:] != -100).sum())))
        return parts

    def _backward(self, parts: list[tuple]) -> float:
        """The gradient of one optimiser step's mean target NLL (plus the load-balance term) over its
        parts, accumulated into the adapter's ``.grad``; returns the step's summed NLL."""
        n_all = sum(p[3] for p in parts)
        rows_all = sum(p[0]["labels"].shape[0] for p in parts)
        nll = 0.0
        for batch, ctx, cache, _ in parts:
            loss_sum = self._loss(batch, ctx, cache, reduction="sum")
            total = loss_sum / n_all
            if self.cfg.load_balance > 0:
                lb = self.adapter.load_balance_loss().to(loss_sum.device)
                total = total + self.cfg.load_balance * lb * (batch["labels"].shape[0] / rows_all)
            else:
                self.adapter.load_stats = {}
            total.backward()
            nll += float(loss_sum.detach())
        return nll

    @staticmethod
    def _prompt_key(prompt: str) -> str:
        return " ".join(prompt.split())

    def edit(self, records: pl.DataFrame) -> EditResult:
        cfg = self.cfg
        t0 = time.perf_counter()
        new = self._rows(records)
        self.extractor.add(s for _, _, s in new)
        # a re-edit (an earlier edit's prompt with a new target) supersedes the earlier edit: it is
        # never replayed again, so the old target cannot come back
        keys = {self._prompt_key(p) for p, _, _ in new}
        history = [h for h in self.history if self._prompt_key(h[0]) not in keys]
        n_superseded = len(self.history) - len(history)
        latest = {self._prompt_key(p): t for p, t, _ in new}
        for p, t, s in self.history:  # every target a re-edit overwrote, kept for the rounds after this one
            k = self._prompt_key(p)
            if k in latest and latest[k] != t and (p, t, s) not in self.overwritten.get(k, []):
                self.overwritten.setdefault(k, []).append((p, t, s))
        if cfg.growth == "round":
            # 'move': each new block takes over its subjects: their earlier edits still in force move with
            # them (the anchor index then routes those subjects there); nothing else is replayed.
            # 'stack': they stay where they are, and the new block is trained on top of the subject's
            # earlier blocks, leaving those edits as they are (``keep``: their answers as training rows,
            # or the new block's own term held near zero on their prompts)
            subjects = {normalise_subject(s) for _, _, s in new}
            old = [h for h in history if normalise_subject(h[2]) in subjects]
            chunks = self._block_chunks(new, old if cfg.recurring == "move" else [])
        else:
            rng = random.Random(self.seed * 1000 + self.rounds)
            old = list(history)
            if cfg.replay is not None and len(old) > cfg.replay:
                old = rng.sample(old, cfg.replay)
            chunks = [(new, old)]
        if self.gate is not None:  # the fact gate's keys of this round's subjects, from all their edits in force
            by_subject: dict[str, list[str]] = {}
            for p, _, subj in history + new:
                by_subject.setdefault(self.extractor.canonical(subj), []).append(p)
            mine = {self.extractor.canonical(s) for _, _, s in new}
            self.gate.update({k: v for k, v in by_subject.items() if k in mine}, salt=str(self.rounds))
        losses: list[float] = []
        blocks: list[int] = []
        parts: list[dict[str, Any]] = []
        nullspace = cfg.recurring == "stack" and cfg.keep == "nullspace"
        for j, (new_c, old_c) in enumerate(chunks):
            mine = {normalise_subject(s) for _, _, s in new_c}
            keep = [h for h in old if normalise_subject(h[2]) in mine] if cfg.recurring == "stack" else []
            # keep 'answer': their answers are training rows, scored through the whole stack
            if cfg.recurring == "stack" and cfg.keep == "answer":
                old_c, keep = keep, []
            block = 0
            if cfg.growth == "round" and (self.rounds > 0 or j > 0):
                with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
                    torch.manual_seed(self.seed * 1000 + self.rounds + (0 if j == 0 else 1_000_003 * j))
                    block = self.adapter.grow()
            if nullspace:  # the new block never sees what their tokens span at the adapter's layer: nothing is trained
                protected, keep = keep, []
                dims = self._protect(block, protected)
            # whenever a prompt is trained (a re-edit, or moved / replayed later), its overwritten targets
            # are trained unlikely beside it: a later round cannot bring one back
            trained = {self._prompt_key(p): t for p, t, _ in new_c + old_c}
            forget = [
                (p, t, trained[k], s)
                for k, rows in sorted(self.overwritten.items())
                if k in trained
                for p, t, s in rows
                if t != trained[k]
            ]
            self._train_block = block if cfg.growth == "round" else None
            started = t0 if j == 0 else time.perf_counter()  # each block's preparation timed from its start
            try:
                chunk_losses, details = self._train(
                    new_c, old_c, started, forget if cfg.forget_weight > 0 else [], salt=j, keep=keep
                )
            finally:
                self._train_block = None
            if cfg.growth == "round":
                for key in sorted({normalise_subject(s) for _, _, s in new_c + old_c}):
                    if cfg.recurring == "stack" and key in self.block_of and self.block_of[key] != block:
                        self.earlier_blocks.setdefault(key, []).append(self.block_of[key])
                    self.block_of[key] = block
            losses += chunk_losses
            blocks.append(block)
            if nullspace:
                details.update(n_kept=len(protected), protected_dims=dims)
            parts.append(details)
        details = parts[-1] if len(parts) == 1 else self._merge_details(parts)
        self.history = history + new
        self.rounds += 1
        self.edits_applied += len(new)
        return EditResult.of(
            losses,
            t0,
            len(new),
            **{
                **details,
                "n_superseded": n_superseded,
                "block": blocks[0],
                "blocks_trained": len(blocks),
                "n_blocks": self.adapter.n_blocks,
                "adapter_bytes": self.adapter.parameter_bytes(),
            },
        )

    def _block_chunks(
        self, new: list[tuple[str, str, str]], old: list[tuple[str, str, str]]
    ) -> list[tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]]:
        """Growth 'round': the round's (new, moved) edits of each new block. One block for the round, or
        with ``block_edits``, the round's subjects (each with all its edits, new and moved) filled in
        order into blocks of at most ``block_edits`` edits (a subject with more edits gets a block of its own)."""
        limit = self.cfg.block_edits
        if limit is None:
            return [(new, old)]
        groups: dict[str, tuple[list, list]] = {}
        for row in new:
            groups.setdefault(normalise_subject(row[2]), ([], []))[0].append(row)
        for row in old:
            groups[normalise_subject(row[2])][1].append(row)
        chunks: list[tuple[list, list]] = []
        for n_rows, o_rows in groups.values():
            size = len(n_rows) + len(o_rows)
            if not chunks or len(chunks[-1][0]) + len(chunks[-1][1]) + size > limit:
                chunks.append(([], []))
            chunks[-1][0].extend(n_rows)
            chunks[-1][1].extend(o_rows)
        return chunks

    @staticmethod
    def _merge_details(parts: list[dict[str, Any]]) -> dict[str, Any]:
        """One round's training figures from those of its blocks: counts and times summed, the last
        block's losses, the rest as the first block had them."""
        out = dict(parts[0])
        for key in ("n_replayed", "n_kept", "n_train_rows", "n_scope_negatives", "n_forgotten", "buckets", "prep_s"):
            out[key] = sum(p[key] for p in parts)
        if "protected_dims" in out:
            out["protected_dims"] = sum(p["protected_dims"] for p in parts)
        out["prep_s"] = round(out["prep_s"], 3)
        for key in ("scope_loss_final", "forget_loss_final", "loss_curve"):
            out[key] = parts[-1][key]
        return out

    def _train(
        self,
        new: list[tuple[str, str, str]],
        old: list[tuple[str, str, str]],
        t0: float,
        forget: Sequence[tuple[str, str, str, str]] = (),
        salt: int = 0,
        keep: Sequence[tuple[str, str, str]] = (),
    ) -> tuple[list[float], dict[str, Any]]:
        """One round's training of the adapter's trainable parameters on ``new`` and ``old`` edits (and,
        for ``forget``'s (prompt, overwritten target, latest target, subject), the unlikelihood of the
        overwritten target; for ``keep``'s earlier edits, held by frozen blocks, the new block's own term
        kept near zero on their training rows): the loss of each step, and the round's figures of its own."""
        cfg = self.cfg
        rows = self._examples(new + old)
        scope_rows = self.scope_rows(new + old)
        keep_rows = list(dict.fromkeys((p, s) for p, _, s in self._examples(keep)))
        bs = cfg.batch_size * (1 + len(self.context_templates()) + len(cfg.augment)) if cfg.batch_size else len(rows)
        dtype = resolve_precision(cfg.precision, self.device)
        # the frozen weights are cast to the training dtype once for the whole round
        with training_precision(self.model, dtype):
            packed = self._packs()  # decided once, in the training precision and attention implementation
            scope = self._scope_part(scope_rows)
            kept = self._scope_part(keep_rows, only_block=self._train_block)
            forgetting = self._forget_part(forget)
            # per optimiser step: [(batch, ctx, cache, n_target_tokens)] of similar-length rows
            steps_data = [self._step_parts(rows[i : i + bs], packed) for i in range(0, len(rows), bs)]
            t_prep = time.perf_counter() - t0

            params = [p for p in self.adapter.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            self.adapter.set_generator(self.seed * 7919 + self.rounds + 104_729 * salt)
            self.adapter.train()
            losses: list[float] = []
            scope_losses: list[float] = []
            forget_losses: list[float] = []
            keep_losses: list[float] = []
            step = 0
            if dtype is not None:
                self._head_weight = self.model.get_output_embeddings().weight.detach().to(dtype)
            compiled = (
                compiled_layers(self.model, max(self.adapter.layer_ids) + 1)
                if self.compiles
                else contextlib.nullcontext()
            )
            try:
                # its own loop, not common.train_steps: a step accumulates the gradient over its parts
                # (micro-batches or length buckets) and the scope term before each optimiser step, its
                # loss is per target token, it is timed, and the early stop also waits for the scope loss
                with torch.enable_grad(), compiled:

                    def converged(nll_mean: float) -> bool:
                        return (
                            nll_mean < cfg.early_stop_loss
                            and (not scope_losses or scope_losses[-1] < cfg.scope_stop_loss)
                            and (not forget_losses or forget_losses[-1] < cfg.early_stop_loss)
                        )

                    for step in range(1, cfg.steps + 1):
                        nll, ntok, stopped = 0.0, 0, False
                        for parts in steps_data:
                            opt.zero_grad(set_to_none=True)
                            nll += self._backward(parts)
                            ntok += sum(p[3] for p in parts)
                            if scope is not None:
                                sl = self._scope_loss(scope)
                                (cfg.scope_weight * sl).backward()
                                scope_losses.append(float(sl.detach()))
                            if kept is not None:
                                kl = self._scope_loss(kept)
                                (cfg.keep_weight * kl).backward()
                                keep_losses.append(float(kl.detach()))
                            if forgetting is not None:
                                fl = self._forget_loss(forgetting)
                                (cfg.forget_weight * fl).backward()
                                forget_losses.append(float(fl.detach()))
                            if len(steps_data) == 1 and converged(nll / ntok):
                                # the weights whose loss was just measured are the ones kept: no step past them
                                # (AdamW at a high lr can throw a converged edit out again in one step)
                                stopped = True
                                break
                            opt.step()
                        losses.append(nll / ntok)  # float(loss) above waits for the device
                        if self.on_step is not None:
                            self.on_step(step, losses[-1])
                        if stopped or converged(losses[-1]):
                            break
                        if cfg.plateau_patience and _plateaued(losses, cfg.plateau_patience):
                            break
            finally:
                self.adapter.eval()
                self.adapter.load_stats = {}
                self._head_weight = None
        return losses, {
            "n_replayed": len(old),
            "n_kept": len(keep),
            "keep_loss_final": keep_losses[-1] if keep_losses else None,
            "n_train_rows": len(rows),
            "n_scope_negatives": len(scope_rows),
            "scope_loss_final": scope_losses[-1] if scope_losses else None,
            "n_forgotten": len(forget),
            "forget_loss_final": forget_losses[-1] if forget_losses else None,
            "layer_cache": self.uses_layer_cache,
            "packed": packed,
            "compiled": self.compiles,
            "precision": str(dtype or torch.float32).replace("torch.", ""),
            "buckets": sum(len(p) for p in steps_data),
            "prep_s": round(t_prep, 3),
            "loss_curve": [round(x, 4) for x in losses[:: max(1, len(losses) // 10)]],
        }

    def diagnostics(self, records: pl.DataFrame, **kw) -> dict[str, float]:
        """``router_diagnostics``: expert load, anchor hit rates, routing agreement."""
        return router_diagnostics(self, records, **kw)

    # ------------------------------------------------------------------ state
    def leaves_unchanged(self, prompts: Sequence[str]) -> list[bool]:
        """Anchor gating: a prompt with no known edited subject in it routes to no expert (``route``
        sets its gate to 0), so the adapter adds nothing anywhere on it."""
        if self.cfg.gate_mode == "always":
            return [False] * len(prompts)
        return [not a.known for a in self.anchors_for(prompts)]

    def row_versions(self, prompts: Sequence[str]) -> list[str | None]:
        """Anchor gating: 'unedited' where no known subject is found (the adapter adds nothing there);
        otherwise a digest of what decides the adapter's term on the row: the settings, the anchor found
        (its text and place fix the anchor vector, the gate and where the adapter acts), the block the
        anchor index routes it to, that block's weights and, with the fact gate, the centre and the
        subject's keys. A grown adapter freezes each block after its round, so an earlier edit keeps its
        version until a later round moves its subject to a new block; the shared adapter's weights change
        every round, and its rows' versions with them."""
        if self.cfg.gate_mode == "always":
            return [None] * len(prompts)
        out: list[str | None] = []
        for a in self.anchors_for(prompts):
            if not a.known:
                out.append("unedited")
                continue
            blocks = self.blocks_for(a.text) if self.cfg.growth == "round" else [0]
            parts = [self._settings_digest(), a.text, a.start, a.end, blocks, [self._block_digest(b) for b in blocks]]
            if self.gate is not None:
                parts.append(self.gate.digest(self.extractor.canonical(a.text)))
            out.append(_digest(parts))
        return out

    def _settings_digest(self) -> str:
        return _digest([self.cfg.model_dump_json(), type(self.model).__name__, self.model.config.num_hidden_layers])

    def _block_digest(self, block: int) -> str:
        params = list(self.adapter.block(block).parameters()) + list(self.adapter.block(block).buffers())
        stamp = (block, tuple((p.data_ptr(), p._version) for p in params))
        if self._digests.get(block, (None,))[0] != stamp:
            h = hashlib.sha1()
            for p in params:
                h.update(p.detach().float().cpu().numpy().tobytes())
            self._digests[block] = (stamp, h.hexdigest())
        return self._digests[block][1]

    def unchanged_layers(self) -> int:
        """The adapter's lowest layer, or the fact gate's lowest (the gate reads the inputs of its layers
        with hooks, which must run)."""
        n = len(decoder_layers(self.model))
        low = [l % n for l in self.adapter.layer_ids]
        if self.gate is not None:
            low += [l % n for l in self.cfg.fact_gate_layers]
        return min(low)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {k: v.detach().clone() for k, v in self.adapter.state_dict().items()}
        if self.gate is not None:
            out.update(self.gate.state_dict()[0])
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        gate = {k: state.pop(k) for k in [k for k in state if k.startswith("fact_gate.")]}
        if self.gate is not None:
            self.gate.load_state_dict({k: v.cpu() for k, v in gate.items()}, self._gate_subjects)
        elif gate:
            raise ValueError("this editor state has fact-gate keys but the editor's config has fact_gate off")
        blocks = 1 + max((int(k.split(".")[1]) + 1 for k in state if k.startswith("grown.")), default=0)
        self._grow_to(blocks)
        for k in [k for k in state if k.endswith(".protect")]:  # keep 'nullspace': each block's hidden directions
            parts = k.split(".")
            self.adapter.protect(0 if parts[0] == "moe" else int(parts[1]) + 1, int(parts[-2]), state[k])
        self.adapter.load_state_dict(state)

    def _grow_to(self, blocks: int) -> None:
        if blocks > 1 and self.cfg.growth != "round":
            raise ValueError(
                f"this adapter state has {blocks} blocks (growth 'round') but the editor's "
                f"config has growth {self.cfg.growth!r}"
            )
        while self.adapter.n_blocks < blocks:
            self.adapter.grow()

    def extra_state(self) -> dict[str, Any]:
        return {
            "known_subjects": self.extractor.subjects,
            "templates": self.templates,
            "history": [list(h) for h in self.history],
            "overwritten": {k: [list(r) for r in rows] for k, rows in self.overwritten.items()},
            "rounds": self.rounds,
            "blocks": self.adapter.n_blocks,
            "block_of": dict(self.block_of),
            "earlier_blocks": {k: list(v) for k, v in self.earlier_blocks.items()},
            "fact_gate_subjects": sorted(self.gate.keys) if self.gate is not None else [],  # state_dict's order
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.extractor = AnchorExtractor(state.get("known_subjects", []), ner=self.cfg.ner_fallback)
        self.templates = state.get("templates")
        self.history = [tuple(h) for h in state.get("history", [])]
        self.overwritten = {k: [tuple(r) for r in rows] for k, rows in state.get("overwritten", {}).items()}
        self.rounds = state.get("rounds", 0)
        self.block_of = {k: int(v) for k, v in state.get("block_of", {}).items()}
        self.earlier_blocks = {k: [int(b) for b in v] for k, v in state.get("earlier_blocks", {}).items()}
        self._gate_subjects = list(state.get("fact_gate_subjects", []))
        self._grow_to(int(state.get("blocks", 1)))

    def remove(self) -> None:
        self.adapter.remove()
        if self.gate is not None:
            self.gate.remove()


def _plateaued(losses: Sequence[float], patience: int) -> bool:
    """The last ``patience`` losses all stayed above 0.95 x the best loss before them."""
    if len(losses) <= patience:
        return False
    best = min(losses[:-patience])
    return min(losses[-patience:]) > 0.95 * best


# ---------------------------------------------------------------------- diagnostics
@torch.no_grad()
def _digest(parts: list) -> str:
    return hashlib.sha1(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


def _record(editor: MEMoEEditor, fn) -> list[dict]:
    st = editor.adapter.state
    st.record = []
    try:
        fn()
        return st.record
    finally:
        st.record = None


def router_diagnostics(
    editor: MEMoEEditor, records: pl.DataFrame, max_new_tokens: int = 8, batch_size: int = 16
) -> dict[str, float]:
    """Load per expert, anchor hit rates, and teacher-forced vs generated routing agreement.

    - ``load_expert_e``: share of active (gated) edit-prompt tokens whose top-1 expert is e;
    - ``anchor_hit_edit`` / ``anchor_hit_rephrase``: share of prompts whose extracted anchor is the
      record's own subject; ``anchor_hit_locality``: share of locality prompts with any known
      subject (false positives: the adapter acts there); ``anchor_ner_locality``: share with a
      fallback anchor;
    - ``route_agree_first``: share of edit prompts whose routing (gate and top-1 expert, first
      edited layer) at the position predicting the first answer token is the same under teacher
      forcing and in ``generate``; ``route_agree_tokens``: the same over every answer position
      where the greedy output still equals the target.
    """
    tok, model = editor.tokenizer, editor.model
    ex = editor.extractor
    out: dict[str, float] = {}
    subj = records["subject"].to_list()
    prompts = records["prompt"].to_list()

    def hit(texts_owner):
        vals = [float(ex(t).known and ex.canonical(ex(t).text) == ex.canonical(subj[o])) for o, t in texts_owner]
        return float(np.mean(vals)) if vals else float("nan")

    out["anchor_hit_edit"] = hit(list(enumerate(prompts)))
    out["anchor_hit_rephrase"] = hit(
        [(o, t) for o, ts in enumerate(records["rephrase_prompts"].to_list()) for t in (ts or [])]
    )
    loc = [t for ts in records["locality_prompts"].to_list() for t in (ts or [])]
    if loc:
        an = ex.extract_all(loc)
        out["anchor_hit_locality"] = float(np.mean([a.known for a in an]))
        out["anchor_ner_locality"] = float(np.mean([a.found and not a.known for a in an]))

    layer = editor.adapter.layer_ids[0]
    E = editor.cfg.num_experts
    counts = np.zeros(E)
    agree_first, agree_tok = [], []
    for i in range(0, len(prompts), batch_size):
        ps = prompts[i : i + batch_size]
        ts = records["target_new"].to_list()[i : i + batch_size]
        batch = edit_batch(tok, ps, ts, editor.device)
        with editor.route(ps):
            rec = _record(
                editor,
                lambda batch=batch: model.base_model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ),
            )
        r = [x for x in rec if x["layer"] == layer][0]
        tf_idx = r["idx"][..., 0] if r["idx"] is not None else torch.full(r["active"].shape, -1)
        tf_act = r["active"]
        for e in range(E):
            counts[e] += int(((tf_idx == e) & tf_act).sum())
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(ps, return_tensors="pt", padding=True).to(editor.device)
            with editor.route(ps):
                holder = {}
                rec_g = _record(
                    editor,
                    lambda holder=holder, enc=enc: holder.setdefault(
                        "gen",
                        model.generate(
                            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
                        ),
                    ),
                )
        finally:
            tok.padding_side = side
        gen = holder["gen"][:, enc.input_ids.shape[1] :]
        steps = [x for x in rec_g if x["layer"] == layer]
        for b in range(len(ps)):
            lp = int(batch["last_prompt"][b])
            tgt = batch["input_ids"][b, lp + 1 :][batch["labels"][b, lp + 1 :] != -100].tolist()

            def g_route(s, b=b, steps=steps):  # routing of row b at generation step s (predicting token s)
                x = steps[s]
                act = bool(x["active"][b, -1])
                e = int(x["idx"][b, -1, 0]) if x["idx"] is not None else -1
                return act, (e if act else -1)

            def t_route(s, b=b, lp=lp, tf_act=tf_act, tf_idx=tf_idx):
                act = bool(tf_act[b, lp + s])
                return act, (int(tf_idx[b, lp + s]) if act else -1)

            agree_first.append(float(g_route(0) == t_route(0)))
            for s in range(min(len(tgt), len(steps))):
                agree_tok.append(float(g_route(s) == t_route(s)))
                if int(gen[b, s]) != tgt[s]:
                    break
    tot = counts.sum()
    for e in range(E):
        out[f"load_expert_{e}"] = float(counts[e] / tot) if tot else 0.0
    out["route_agree_first"] = float(np.mean(agree_first)) if agree_first else float("nan")
    out["route_agree_tokens"] = float(np.mean(agree_tok)) if agree_tok else float("nan")
    return out
