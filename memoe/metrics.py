"""Evaluation metrics, as ../shared/design/MEMOE.md defines them (the lineage's definitions).

Teacher-forced on ``prompt + " " + target``, argmax at each target position:
  reliability (edit prompt), generality (rephrases), locality (agreement with the unedited model's
  argmax on unrelated prompts), portability (follow-up question's own answer).
CounterFact probability scores: efficacy, paraphrase, neighbourhood (mean target log-prob compare).
Generation-based: greedy decoding until a newline / EOS, then exact match (prefix) and contains.
Fluency: weighted 2/3-gram entropy of generated text (ROME's definition).

Everything is batched and length-bucketed; logits are computed only at target positions.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import polars as pl
import torch

from memoe.data import encode_pair
from memoe.metric_registry import METRICS

TOKENS_PER_ROW = 64  # a batch of ``size`` rows holds at most size x 64 padded tokens (a longer row: alone)


def _batches(order: Sequence[int], size: int, lengths: Sequence[int] | None = None) -> Iterable[list[int]]:
    """Consecutive rows of ``order`` in batches of at most ``size`` rows and, with ``lengths``, at most
    ``size * TOKENS_PER_ROW`` padded tokens: one very long prompt is not padded onto its neighbours."""
    budget = size * TOKENS_PER_ROW
    batch: list[int] = []
    longest = 0
    for i in order:
        n = lengths[i] if lengths is not None else 0
        if batch and (len(batch) == size or (len(batch) + 1) * max(longest, n) > budget):
            yield batch
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, n)
    if batch:
        yield batch


def _route(editor, prompts):
    return editor.route(prompts) if editor is not None else contextlib.nullcontext()


def _body_and_head(model):
    return model.base_model, model.get_output_embeddings()


@dataclass
class TFResult:
    pred: list[list[int]]  # argmax ids at target positions
    target: list[list[int]]  # target ids
    logprob: list[float]  # mean log-prob of the target tokens

    def acc(self) -> list[float]:
        return [float(np.mean([a == b for a, b in zip(p, t)])) for p, t in zip(self.pred, self.target)]


@torch.inference_mode()
def teacher_forced(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], *, editor=None,
                   batch_size: int = 16) -> TFResult:
    n = len(prompts)
    enc = [encode_pair(tokenizer, p, t) for p, t in zip(prompts, targets)]
    order = sorted(range(n), key=lambda i: len(enc[i][0]))  # length buckets
    pred: list[list[int]] = [[] for _ in range(n)]
    tgt: list[list[int]] = [[] for _ in range(n)]
    lp: list[float] = [0.0] * n
    body, head = _body_and_head(model)
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id or 0
    for idx in _batches(order, batch_size, [len(e[0]) for e in enc]):
        L = max(len(enc[i][0]) for i in idx)
        ids = torch.full((len(idx), L), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), L), dtype=torch.long)
        rows, cols, labels = [], [], []
        for r, i in enumerate(idx):
            seq, npr = enc[i]
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
            for j in range(npr, len(seq)):
                rows.append(r)
                cols.append(j - 1)
                labels.append(seq[j])
        with _route(editor, [prompts[i] for i in idx]):
            h = body(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
        logits = head(h[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]).float()
        logp = torch.log_softmax(logits, -1)
        lab = torch.tensor(labels, device=dev)
        am = logits.argmax(-1).tolist()
        tok_lp = logp.gather(1, lab[:, None])[:, 0].tolist()
        k = 0
        for i in idx:
            seq, npr = enc[i]
            m = len(seq) - npr
            pred[i] = am[k:k + m]
            tgt[i] = seq[npr:]
            lp[i] = float(np.mean(tok_lp[k:k + m]))
            k += m
    return TFResult(pred, tgt, lp)


_STOP = re.compile(r"\n|<\|im_end\|>|<\|endoftext\|>|</s>")


def normalise(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", "", s.lower())).strip()


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[str], *, editor=None, batch_size: int = 16,
             max_new_tokens: int = 16, cut: bool = True) -> list[str]:
    """Greedy continuation of each prompt, cut at the first newline or end-of-text (``cut``)."""
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    dev = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        lengths = [len(tokenizer(p).input_ids) + max_new_tokens for p in prompts]
        for idx in _batches(order, batch_size, lengths):
            batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(dev)
            with _route(editor, [prompts[i] for i in idx]):
                gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(gen[:, batch.input_ids.shape[1]:], skip_special_tokens=not cut)
            for i, t in zip(idx, texts):
                out[i] = _STOP.split(t.lstrip(), maxsplit=1)[0].strip() if cut else t
    finally:
        tokenizer.padding_side = side
    return out


def exact_match(generated: str, target: str) -> float:
    return float(normalise(generated).startswith(normalise(target)))


def contains(generated: str, target: str) -> float:
    return float(normalise(target) in normalise(generated))


def ngram_entropy(texts: Sequence[str], ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """ROME's fluency: weighted mean of the n-gram entropies, averaged over texts."""
    vals = []
    for text in texts:
        toks = text.split()
        ents = []
        for n in ns:
            grams = Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
            tot = sum(grams.values())
            ents.append(-sum(c / tot * math.log2(c / tot) for c in grams.values()) if tot else 0.0)
        vals.append(float(np.average(ents, weights=weights)))
    return float(np.mean(vals)) if vals else float("nan")


# --------------------------------------------------------------------------- per-record scoring
def _flat(df: pl.DataFrame, prompts_col: str, answers_col: str | None = None, answer_scalar: str | None = None):
    owner, prompts, answers = [], [], []
    for r, row in enumerate(df.iter_rows(named=True)):
        ps = row[prompts_col] or []
        ans = row[answers_col] if answers_col else [row[answer_scalar]] * len(ps)
        for p, a in zip(ps, ans):
            owner.append(r)
            prompts.append(p)
            answers.append(a)
    return owner, prompts, answers


def _mean_by(owner: list[int], vals: list[float], n: int) -> list[float | None]:
    acc: list[list[float]] = [[] for _ in range(n)]
    for o, v in zip(owner, vals):
        acc[o].append(v)
    return [float(np.mean(a)) if a else None for a in acc]


def _continuations(model, tokenizer, prompts: Sequence[str], batch_size: int, n_tokens: int = 4) -> list[str]:
    """The unedited model's own greedy continuation of each prompt (``n_tokens``, newlines folded):
    the answer the subject-specificity probes are teacher-forced on."""
    if not prompts:
        return []
    out = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=n_tokens, cut=False)
    return [" ".join(t.split()) or "the" for t in out]


def locality_predictions(model, tokenizer, records: pl.DataFrame, *, batch_size: int = 16) -> pl.DataFrame:
    """The unedited model's argmax tokens on every locality prompt, and (where the records have
    ``specificity_prompts``) its own continuation of each specificity probe with its argmax tokens
    there (computed once per model+data)."""
    owner, prompts, answers = _flat(records, "locality_prompts", "locality_answers")
    res = teacher_forced(model, tokenizer, prompts, answers, batch_size=batch_size)
    per: list[list[list[int]]] = [[] for _ in range(records.height)]
    for o, p in zip(owner, res.pred):
        per[o].append(p)
    cols = {"id": records["id"], "loc_base_pred": per}
    schema = {"id": pl.String, "loc_base_pred": pl.List(pl.List(pl.Int64))}
    if "specificity_prompts" in records.columns:
        so, sp, _ = _flat(records, "specificity_prompts", answer_scalar="target_new")
        ans = _continuations(model, tokenizer, sp, batch_size)
        sres = teacher_forced(model, tokenizer, sp, ans, batch_size=batch_size)
        spa: list[list[str]] = [[] for _ in range(records.height)]
        spp: list[list[list[int]]] = [[] for _ in range(records.height)]
        for o, a, p in zip(so, ans, sres.pred):
            spa[o].append(a)
            spp[o].append(p)
        cols |= {"spec_answers": spa, "spec_base_pred": spp}
        schema |= {"spec_answers": pl.List(pl.String), "spec_base_pred": pl.List(pl.List(pl.Int64))}
    return pl.DataFrame(cols, schema=schema)


def _agreement(model, tokenizer, records, base, owner, prompts, answers, base_col, kw) -> list[float | None]:
    """Per record: the share of answer positions whose argmax equals the unedited model's."""
    res = teacher_forced(model, tokenizer, prompts, answers, **kw)
    base_pred = dict(zip(base["id"].to_list(), base[base_col].to_list()))
    flat_base, seen = [], {}
    ids = records["id"].to_list()
    for o in owner:
        j = seen.get(o, 0)
        seen[o] = j + 1
        flat_base.append(base_pred[ids[o]][j])
    agree = [float(np.mean([a == b for a, b in zip(p, q)])) for p, q in zip(res.pred, flat_base)]
    return _mean_by(owner, agree, records.height)


def evaluate(model, tokenizer, records: pl.DataFrame, base: pl.DataFrame | None = None, *, editor=None,
             batch_size: int = 16, generation: bool = True, max_new_tokens: int = 16,
             fluency: bool = False) -> pl.DataFrame:
    """Score every record; returns one row per edit with the metric columns (null where n/a)."""
    n = records.height
    kw = dict(editor=editor, batch_size=batch_size)
    prompts = records["prompt"].to_list()
    new = records["target_new"].to_list()
    rel = teacher_forced(model, tokenizer, prompts, new, **kw)
    cols: dict[str, list] = {"id": records["id"].to_list(), "reliability": rel.acc()}

    ro, rp, ra = _flat(records, "rephrase_prompts", answer_scalar="target_new")
    rr = teacher_forced(model, tokenizer, rp, ra, **kw) if rp else TFResult([], [], [])
    cols["generality"] = _mean_by(ro, rr.acc(), n)

    lo, lp, la = _flat(records, "locality_prompts", "locality_answers")
    if lp and base is not None:
        cols["locality"] = _agreement(model, tokenizer, records, base, lo, lp, la, "loc_base_pred", kw)
    else:
        cols["locality"] = [None] * n

    # the hard probes (memoe/probes.py): the subject with other relations against the unedited model,
    # restyled and chat-template rephrases against the new target
    if "specificity_prompts" in records.columns and base is not None and "spec_base_pred" in base.columns:
        so, sp, _ = _flat(records, "specificity_prompts", answer_scalar="target_new")
        if sp:
            answers = dict(zip(base["id"].to_list(), base["spec_answers"].to_list()))
            ids = records["id"].to_list()
            seen: dict[int, int] = {}
            sa = []
            for o in so:
                j = seen.get(o, 0)
                seen[o] = j + 1
                sa.append(answers[ids[o]][j])
            cols["specificity"] = _agreement(model, tokenizer, records, base, so, sp, sa, "spec_base_pred", kw)
    for col, name in (("restyled_prompts", "restyled_generality"), ("chat_prompts", "chat_generality")):
        if col in records.columns:
            o_, p_, a_ = _flat(records, col, answer_scalar="target_new")
            if p_:
                cols[name] = _mean_by(o_, teacher_forced(model, tokenizer, p_, a_, **kw).acc(), n)

    po, pp, pa = _flat(records, "portability_prompts", "portability_answers")
    pr = teacher_forced(model, tokenizer, pp, pa, **kw) if pp else TFResult([], [], [])
    cols["portability"] = _mean_by(po, pr.acc(), n)

    # CounterFact-style probability comparisons where the true target is known
    has_true = records["target_true"].is_not_null().to_list()
    if all(has_true) and records.height:
        true = records["target_true"].to_list()
        t_rel = teacher_forced(model, tokenizer, prompts, true, **kw)
        cols["efficacy"] = [float(a > b) for a, b in zip(rel.logprob, t_rel.logprob)]
        if rp:
            rtrue = [true[o] for o in ro]
            rt = teacher_forced(model, tokenizer, rp, rtrue, **kw)
            cols["paraphrase"] = _mean_by(ro, [float(a > b) for a, b in zip(rr.logprob, rt.logprob)], n)
        no, np_, _ = _flat(records, "locality_prompts", "locality_answers")
        if np_ and all(a == true[o] for o, a in zip(no, _flat(records, "locality_prompts", "locality_answers")[2])):
            nt = teacher_forced(model, tokenizer, np_, [true[o] for o in no], **kw)
            nn_ = teacher_forced(model, tokenizer, np_, [new[o] for o in no], **kw)
            cols["neighborhood"] = _mean_by(no, [float(a > b) for a, b in zip(nt.logprob, nn_.logprob)], n)

    if generation:
        lens = [len(t) for t in rel.target]
        gen = generate(model, tokenizer, prompts, editor=editor, batch_size=batch_size,
                       max_new_tokens=max(max_new_tokens, max(lens) + 2))
        cols["generation"] = gen
        cols["generation_reliability"] = [exact_match(g, t) for g, t in zip(gen, new)]
        cols["generation_contains"] = [contains(g, t) for g, t in zip(gen, new)]
    if fluency:
        go, gp, _ = _flat(records, "generation_prompts", answer_scalar="target_new")
        if gp:
            texts = generate(model, tokenizer, gp, editor=editor, batch_size=batch_size, max_new_tokens=64)
            cols["fluency"] = _mean_by(go, [ngram_entropy([t]) for t in texts], n)
    return pl.DataFrame(cols, strict=False)


def summarize(table: pl.DataFrame) -> dict[str, float]:
    """Mean of each registered metric's column (``memoe.metric_registry``) over the records that have it;
    'avg' = mean(Rel, Gen, Loc)."""
    out: dict[str, float] = {}
    for m in METRICS:
        if m in table.columns and table[m].drop_nulls().len():
            out[m] = float(table[m].drop_nulls().mean())
    core = [out[m] for m in ("reliability", "generality", "locality") if m in out]
    if core:
        out["avg"] = float(np.mean(core))
    fact = [out[m] for m in ("reliability", "generality", "specificity") if m in out]
    if len(fact) == 3:  # an edit of the fact, not of the subject: mean of Rel, Gen and subject specificity
        out["fact_avg"] = float(np.mean(fact))
    if all(k in out for k in ("efficacy", "paraphrase", "neighborhood")):
        vals = [out["efficacy"], out["paraphrase"], out["neighborhood"]]
        out["cf_score"] = float(len(vals) / sum(1 / max(v, 1e-9) for v in vals))
    # edits in force (an overwritten edit's row carries only overwritten_reliability)
    out["n_edits"] = float(table["reliability"].drop_nulls().len() if "reliability" in table.columns else table.height)
    return out
