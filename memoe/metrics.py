"""Evaluation metrics, as ../shared/design/MEMOE.md defines them (the lineage's definitions).

Teacher-forced on ``prompt + " " + target``, argmax at each target position:
  reliability (edit prompt), generality (rephrases), locality (agreement with the unedited model's
  argmax on unrelated prompts), portability (follow-up question's own answer).
CounterFact probability scores: efficacy, paraphrase, neighbourhood (mean target log-prob compare).
Generation-based: greedy decoding until a newline / EOS, then exact match (prefix) and contains.
Fluency: weighted 2/3-gram entropy of generated text (ROME's definition).

Each metric is a function of a ``Scoring`` registered in ``memoe.metric_registry`` (``compute=``);
``evaluate`` runs every registered one. Everything is batched and length-bucketed; logits are computed
only at target positions.
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

from memoe.anchors import AnchorExtractor, normalise_subject
from memoe.data import encode_pair
from memoe.frozen import FrozenStates, capture_input, forward_from
from memoe.memo import ScoreMemo
from memoe.metric_registry import METRICS, REGISTRY

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
def teacher_forced(
    model,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    editor=None,
    batch_size: int = 16,
    frozen: FrozenStates | None = None,
    memo: ScoreMemo | None = None,
) -> TFResult:
    """Argmax and mean log-prob at each target token of ``prompt + " " + target``. ``frozen``: the
    unedited model's states entering decoder layer ``frozen.layer`` (``memoe.frozen``), which the
    editor must leave unchanged: a sequence found there runs the layers from ``frozen.layer`` up
    only, and one not found there is computed in full and added. ``memo``: the edited model's results
    kept by sequence and ``editor.row_versions`` (``memoe.memo``): a sequence found there under its
    row's version is not run at all, and one computed here is added."""
    if frozen is not None and editor is not None and editor.unchanged_layers() < frozen.layer:
        raise ValueError(
            f"frozen states of layer {frozen.layer}, but {type(editor).__name__} changes layer "
            f"{editor.unchanged_layers()} and above"
        )
    n = len(prompts)
    enc = [encode_pair(tokenizer, p, t) for p, t in zip(prompts, targets)]
    pred: list[list[int]] = [[] for _ in range(n)]
    tgt: list[list[int]] = [[] for _ in range(n)]
    lp: list[float] = [0.0] * n
    memo_key, kept = {}, {}
    if memo is not None and editor is not None:
        memo_key, kept = memo.lookup(
            editor.row_versions(prompts), lambda i, v: ScoreMemo.key("tf", enc[i][0], enc[i][1], v), memo.get_tf
        )
    for i, got in kept.items():
        pred[i], tgt[i], lp[i] = list(got[0]), list(got[1]), got[2]
    todo = [i for i in range(n) if i not in kept]
    order = sorted(todo, key=lambda i: len(enc[i][0]))  # length buckets
    body, head = _body_and_head(model)
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id or 0

    def run(idx: list[int], keys: list[str] | None, cached: bool) -> None:
        L = max(len(enc[i][0]) for i in idx)
        ids = torch.full((len(idx), L), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), L), dtype=torch.long)
        rows, cols, labels = [], [], []
        for r, i in enumerate(idx):
            seq, npr = enc[i]
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            for j in range(npr, len(seq)):
                rows.append(r)
                cols.append(j - 1)
                labels.append(seq[j])
        ids, mask = ids.to(dev), mask.to(dev)
        with _route(editor, [prompts[i] for i in idx]):
            if cached:
                states = [frozen.get(k) for k in keys]
                hidden = torch.zeros((len(idx), L, states[0].shape[-1]), dtype=states[0].dtype)
                for r, st in enumerate(states):
                    hidden[r, : st.shape[0]] = st
                h = forward_from(model, frozen.layer, hidden.to(dev), ids, mask)
            else:
                seen: list[torch.Tensor] = []
                hook = capture_input(model, frozen.layer, seen) if frozen is not None else None
                try:
                    h = body(input_ids=ids, attention_mask=mask).last_hidden_state
                finally:
                    if hook is not None:
                        hook.remove()
                for r, k in enumerate(keys or []):
                    frozen.put(k, seen[0][r, : len(enc[idx[r]][0])])
        logits = head(h[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]).float()
        logp = torch.log_softmax(logits, -1)
        lab = torch.tensor(labels, device=dev)
        am = logits.argmax(-1).tolist()
        tok_lp = logp.gather(1, lab[:, None])[:, 0].tolist()
        k = 0
        for i in idx:
            seq, npr = enc[i]
            m = len(seq) - npr
            pred[i] = am[k : k + m]
            tgt[i] = seq[npr:]
            lp[i] = float(np.mean(tok_lp[k : k + m]))
            if i in memo_key:
                memo.put_tf(memo_key[i], pred[i], tgt[i], lp[i])
            k += m

    for idx in _batches(order, batch_size, [len(e[0]) for e in enc]):
        if frozen is None:
            run(idx, None, False)
            continue
        key = {i: FrozenStates.key(enc[i][0]) for i in idx}
        hit = [i for i in idx if key[i] in frozen]
        miss = [i for i in idx if key[i] not in frozen]
        frozen.hits, frozen.misses = frozen.hits + len(hit), frozen.misses + len(miss)
        for part, cached in ((hit, True), (miss, False)):
            if part:
                run(part, [key[i] for i in part], cached)
    return TFResult(pred, tgt, lp)


_STOP = re.compile(r"\n|<\|im_end\|>|<\|endoftext\|>|</s>")


def normalise(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", "", s.lower())).strip()


class _StopWhenCut:
    """Ends a row's greedy decoding once its text already holds the point where ``generate`` cuts it (the
    first newline or end-of-text after its first non-blank character): the tokens after that point are
    cut anyway, so the kept text is the same as with every step decoded. Decoding the rows' new tokens
    each step costs far less than the step's forward."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kw) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=False)
        return torch.tensor([bool(_STOP.search(t.lstrip())) for t in texts], device=input_ids.device)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    editor=None,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    cut: bool = True,
    stop_early: bool = True,
    memo: ScoreMemo | None = None,
) -> list[str]:
    """Greedy continuation of each prompt, cut at the first newline or end-of-text (``cut``); with
    ``cut``, a batch stops decoding once every row has reached its cut (``stop_early``; the same texts).
    ``memo``: as in ``teacher_forced``, by prompt, ``max_new_tokens``, ``cut`` and the row's version."""
    from transformers import StoppingCriteriaList

    out: list[str] = [""] * len(prompts)
    memo_key, kept = {}, {}
    if memo is not None and editor is not None:
        memo_key, kept = memo.lookup(
            editor.row_versions(prompts),
            lambda i, v: ScoreMemo.key("gen", prompts[i], max_new_tokens, cut, v),
            memo.get_gen,
        )
    for i, got in kept.items():
        out[i] = got
    order = sorted((i for i in range(len(prompts)) if i not in kept), key=lambda i: len(prompts[i]))
    dev = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        lengths = [len(tokenizer(p).input_ids) + max_new_tokens for p in prompts]
        for idx in _batches(order, batch_size, lengths):
            batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(dev)
            n_in = batch.input_ids.shape[1]
            stop = StoppingCriteriaList([_StopWhenCut(tokenizer, n_in)] if cut and stop_early else [])
            with _route(editor, [prompts[i] for i in idx]):
                gen = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    stopping_criteria=stop,
                )
            texts = tokenizer.batch_decode(gen[:, n_in:], skip_special_tokens=not cut)
            for i, t in zip(idx, texts):
                out[i] = _STOP.split(t.lstrip(), maxsplit=1)[0].strip() if cut else t
                if i in memo_key:
                    memo.put_gen(memo_key[i], out[i])
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
            grams = Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
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


CONFLICT = "locality_conflict"  # the records' column: per locality prompt, whether it asks an edited fact


def mark_locality_conflicts(records: pl.DataFrame, in_force: pl.DataFrame) -> pl.DataFrame:
    """``records`` with ``locality_conflict``: per locality prompt, True where it asks a fact that an edit
    in force (``in_force``: every edit applied so far) has changed. The locality prompts of a record ask
    its relation about other subjects (CounterFact's neighbours); one that names a subject edited *with
    that relation* (its ``relation``, where the data gives one) no longer has the unedited answer as its
    truth, so locality and neighborhood leave it out and ``locality_conflicts`` counts it. Without
    relations (ZsRE) nothing is marked and the records come back as they are."""
    if "relation" not in records.columns or "relation" not in in_force.columns:
        return records
    edited: dict[str, set[str]] = {}
    for subj, rel in zip(in_force["subject"].to_list(), in_force["relation"].to_list()):
        if rel:
            edited.setdefault(normalise_subject(subj), set()).add(rel)
    if not edited:
        return records
    index = AnchorExtractor(edited, ner=False)  # only subjects edited with a relation can conflict
    marks = []
    for rel, prompts in zip(records["relation"].to_list(), records["locality_prompts"].to_list()):
        row = []
        for p in prompts or []:
            a = index.known(p) if rel else None
            row.append(bool(a is not None and a.found and rel in edited.get(normalise_subject(a.text), ())))
        marks.append(row)
    return records.with_columns(pl.Series(CONFLICT, marks, dtype=pl.List(pl.Boolean)))


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
    if _neighbours_answer_true(records):  # CounterFact: the unedited model's own neighbourhood comparison
        kept = _neighbour_kept(model, tokenizer, records, owner, prompts, None, batch_size, None)
        per_kept: list[list[float]] = [[] for _ in range(records.height)]
        for o, v in zip(owner, kept):
            per_kept[o].append(v)
        cols |= {"nbr_base_kept": per_kept}
        schema |= {"nbr_base_kept": pl.List(pl.Float64)}
    return pl.DataFrame(cols, schema=schema)


def _neighbours_answer_true(records: pl.DataFrame) -> bool:
    """Every record has its true target and its locality prompts (CounterFact's neighbours) answer it."""
    if not records.height or "target_true" not in records.columns:
        return False
    true = records["target_true"].to_list()
    if any(t is None for t in true):
        return False
    owner, prompts, answers = _flat(records, "locality_prompts", "locality_answers")
    return bool(prompts) and all(a == true[o] for o, a in zip(owner, answers))


def _neighbour_kept(model, tokenizer, records, owner, prompts, editor, batch_size, tf) -> list[float]:
    """Per neighbour prompt: 1.0 where the true target is more likely (mean log-prob) than the new one."""
    true, new = records["target_true"].to_list(), records["target_new"].to_list()
    run = tf or (lambda p, t: teacher_forced(model, tokenizer, p, t, editor=editor, batch_size=batch_size))
    kept, moved = run(prompts, [true[o] for o in owner]), run(prompts, [new[o] for o in owner])
    return [float(a > b) for a, b in zip(kept.logprob, moved.logprob)]


class Scoring:
    """What a metric function sees (``memoe.metric_registry.register_metric(..., compute=fn)``): the
    records being scored, the unedited model's predictions (``base``, or None), the evaluation's options,
    and the scoring primitives. Teacher-forced results and generations are memoised by their inputs, so
    metrics that score the same prompts (generality and paraphrase, reliability and efficacy) share the
    forward passes. A metric function returns one value per record (None where it does not apply), or
    None when it does not apply to these records at all (its column is then left out)."""

    def __init__(
        self,
        model,
        tokenizer,
        records: pl.DataFrame,
        base: pl.DataFrame | None,
        *,
        editor=None,
        batch_size: int = 16,
        generation: bool = True,
        max_new_tokens: int = 16,
        fluency: bool = False,
        frozen: FrozenStates | None = None,
        generation_batch_size: int | None = None,
        memo: ScoreMemo | None = None,
    ):
        self.model, self.tokenizer, self.records, self.base, self.editor = model, tokenizer, records, base, editor
        self.frozen, self.memo = frozen, memo
        self.generation_batch_size = generation_batch_size or batch_size
        self.batch_size, self.generation, self.max_new_tokens, self.fluency = (
            batch_size,
            generation,
            max_new_tokens,
            fluency,
        )
        self.n = records.height
        self.extra: dict[str, list] = {}  # columns beside the metrics (the generated text)
        self._tf: dict[tuple, TFResult] = {}
        self._gen: dict[tuple, list[str]] = {}

    def tf(self, prompts: Sequence[str], targets: Sequence[str]) -> TFResult:
        """``teacher_forced`` through the editor (memoised)."""
        key = (tuple(prompts), tuple(targets))
        if key not in self._tf:
            self._tf[key] = (
                teacher_forced(
                    self.model,
                    self.tokenizer,
                    prompts,
                    targets,
                    editor=self.editor,
                    batch_size=self.batch_size,
                    frozen=self.frozen,
                    memo=self.memo,
                )
                if prompts
                else TFResult([], [], [])
            )
        return self._tf[key]

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy generations through the editor (memoised)."""
        key = (tuple(prompts), max_new_tokens)
        if key not in self._gen:
            self._gen[key] = generate(
                self.model,
                self.tokenizer,
                prompts,
                editor=self.editor,
                batch_size=self.generation_batch_size,
                max_new_tokens=max_new_tokens,
                memo=self.memo,
            )
        return self._gen[key]

    def flat(self, prompts_col: str, answers_col: str | None = None, answer_scalar: str | None = None):
        """(owner record, prompt, answer) of every prompt in a list column."""
        return _flat(self.records, prompts_col, answers_col, answer_scalar)

    def mean_by(self, owner: list[int], vals: list[float]) -> list[float | None]:
        """Per record: the mean of its prompts' values (None: it has none)."""
        return _mean_by(owner, vals, self.n)

    def agreement(self, owner, prompts, answers, base_col: str, positions=None) -> list[float | None]:
        """Per record: the share of answer positions whose argmax equals the unedited model's
        (``base[base_col]``, one list of argmax ids per prompt of the record, in order; ``positions``:
        each prompt's place in that list, default: consecutive). A prompt the editor provably leaves
        alone (``Editor.leaves_unchanged``) agrees without being run."""
        same = self.editor.leaves_unchanged(prompts) if self.editor is not None else [False] * len(prompts)
        todo = [k for k, s in enumerate(same) if not s]
        res = self.tf([prompts[k] for k in todo], [answers[k] for k in todo])
        base_pred = dict(zip(self.base["id"].to_list(), self.base[base_col].to_list()))
        ids = self.records["id"].to_list()
        flat_base = [base_pred[ids[o]][j] for o, j in zip(owner, _positions(owner) if positions is None else positions)]
        vals = [1.0] * len(prompts)
        for k, p in zip(todo, res.pred):
            vals[k] = float(np.mean([a == b for a, b in zip(p, flat_base[k])]))
        return self.mean_by(owner, vals)

    def locality_prompts(self):
        """(owner, prompt, answer, position among the owner's locality prompts) of every locality prompt
        that does not ask a fact an edit in force changed (``mark_locality_conflicts``)."""
        lo, lp, la = self.flat("locality_prompts", "locality_answers")
        pos = _positions(lo)
        if CONFLICT not in self.records.columns:
            return lo, lp, la, pos
        marks = self.records[CONFLICT].to_list()
        keep = [k for k, (o, j) in enumerate(zip(lo, pos)) if not marks[o][j]]
        return [lo[k] for k in keep], [lp[k] for k in keep], [la[k] for k in keep], [pos[k] for k in keep]

    def rephrases(self):
        return self.flat("rephrase_prompts", answer_scalar="target_new")

    def has_true(self) -> bool:
        """Every record has its true target (CounterFact's probability comparisons apply)."""
        return bool(self.n) and all(self.records["target_true"].is_not_null().to_list())


def _positions(owner: list[int]) -> list[int]:
    """Each entry's position among its owner's entries (0, 1, ... per record)."""
    seen: dict[int, int] = {}
    out = []
    for o in owner:
        out.append(seen.get(o, 0))
        seen[o] = out[-1] + 1
    return out


# --------------------------------------------------------------------------- the metrics
# Each is registered in ``memoe.metric_registry`` (name, description, headline flag) with ``compute``
# naming its function here; ``evaluate`` runs every registered metric that has one.


def reliability(s: Scoring):
    return s.tf(s.records["prompt"].to_list(), s.records["target_new"].to_list()).acc()


def generality(s: Scoring):
    ro, rp, ra = s.rephrases()
    return s.mean_by(ro, s.tf(rp, ra).acc())


def locality(s: Scoring):
    lo, lp, la, pos = s.locality_prompts()
    return s.agreement(lo, lp, la, "loc_base_pred", pos) if lp and s.base is not None else [None] * s.n


def locality_conflicts(s: Scoring):
    """Share of a record's locality prompts that ask a fact another edit in force changed
    (``mark_locality_conflicts``): left out of locality and neighborhood."""
    if CONFLICT not in s.records.columns:
        return None
    return [float(np.mean(row)) if row else None for row in s.records[CONFLICT].to_list()]


def specificity(s: Scoring):
    """The subject with other relations (memoe/probes.py), against the unedited model's own continuation."""
    if "specificity_prompts" not in s.records.columns or s.base is None or "spec_base_pred" not in s.base.columns:
        return None
    so, sp, _ = s.flat("specificity_prompts", answer_scalar="target_new")
    if not sp:
        return None
    answers = dict(zip(s.base["id"].to_list(), s.base["spec_answers"].to_list()))
    ids = s.records["id"].to_list()
    sa = [answers[ids[o]][j] for o, j in zip(so, _positions(so))]
    return s.agreement(so, sp, sa, "spec_base_pred")


def _probe_generality(col: str):
    def compute(s: Scoring):
        if col not in s.records.columns:
            return None
        o, p, a = s.flat(col, answer_scalar="target_new")
        return s.mean_by(o, s.tf(p, a).acc()) if p else None

    compute.__doc__ = f"The rephrases of ``{col}`` (memoe/probes.py), against the new target."
    return compute


restyled_generality = _probe_generality("restyled_prompts")
chat_generality = _probe_generality("chat_prompts")


def portability(s: Scoring):
    po, pp, pa = s.flat("portability_prompts", "portability_answers")
    return s.mean_by(po, s.tf(pp, pa).acc())


def generation_reliability(s: Scoring):
    """Greedy generation on the edit prompt starts with the new target (also writes the generated text
    and ``generation_contains``, the target anywhere in it)."""
    if not s.generation:
        return None
    prompts, new = s.records["prompt"].to_list(), s.records["target_new"].to_list()
    lens = [len(t) for t in s.tf(prompts, new).target]
    gen = s.generate(prompts, max(s.max_new_tokens, max(lens) + 2))
    s.extra["generation"] = gen
    s.extra["generation_contains"] = [contains(g, t) for g, t in zip(gen, new)]
    return [exact_match(g, t) for g, t in zip(gen, new)]


def efficacy(s: Scoring):
    """CounterFact: the new target more likely (mean log-prob) than the true one on the edit prompt."""
    if not s.has_true():
        return None
    prompts = s.records["prompt"].to_list()
    new, true = s.tf(prompts, s.records["target_new"].to_list()), s.tf(prompts, s.records["target_true"].to_list())
    return [float(a > b) for a, b in zip(new.logprob, true.logprob)]


def paraphrase(s: Scoring):
    ro, rp, ra = s.rephrases()
    if not s.has_true() or not rp:
        return None
    true = s.records["target_true"].to_list()
    new, old = s.tf(rp, ra), s.tf(rp, [true[o] for o in ro])
    return s.mean_by(ro, [float(a > b) for a, b in zip(new.logprob, old.logprob)])


def neighborhood(s: Scoring):
    """CounterFact: the true target still more likely than the new one on the neighbour prompts (where
    the neighbours' answers are the true target)."""
    if not _neighbours_answer_true(s.records):
        return None
    no, np_, _, pos = s.locality_prompts()
    vals: list[float] = [0.0] * len(np_)
    todo = list(range(len(np_)))
    if s.editor is not None and s.base is not None and "nbr_base_kept" in s.base.columns:
        # a neighbour the editor provably leaves alone compares as it did on the unedited model
        base = dict(zip(s.base["id"].to_list(), s.base["nbr_base_kept"].to_list()))
        ids = s.records["id"].to_list()
        same = s.editor.leaves_unchanged(np_)
        for k, (o, j) in enumerate(zip(no, pos)):
            if same[k]:
                vals[k] = base[ids[o]][j]
        todo = [k for k in todo if not same[k]]
    got = _neighbour_kept(None, None, s.records, [no[k] for k in todo], [np_[k] for k in todo], None, None, s.tf)
    for k, v in zip(todo, got):
        vals[k] = v
    return s.mean_by(no, vals)


def fluency(s: Scoring):
    if not s.fluency:
        return None
    go, gp, _ = s.flat("generation_prompts", answer_scalar="target_new")
    return s.mean_by(go, [ngram_entropy([t]) for t in s.generate(gp, 64)]) if gp else None


def evaluate(
    model,
    tokenizer,
    records: pl.DataFrame,
    base: pl.DataFrame | None = None,
    *,
    editor=None,
    batch_size: int = 16,
    generation: bool = True,
    max_new_tokens: int = 16,
    fluency: bool = False,
    frozen: FrozenStates | None = None,
    generation_batch_size: int | None = None,
    memo: ScoreMemo | None = None,
) -> pl.DataFrame:
    """Score every record with every registered metric that has a ``compute`` function
    (``memoe.metric_registry``); returns one row per edit with the metric columns (null where n/a),
    the generated text beside them. ``generation_batch_size``: prompts per generation batch (default:
    ``batch_size``). ``frozen``: the unedited model's states below the edit, reused and
    added to (``teacher_forced``); ``memo``: the edited model's results that still hold, reused and added
    to (``memoe.memo``)."""
    s = Scoring(
        model,
        tokenizer,
        records,
        base,
        editor=editor,
        batch_size=batch_size,
        generation=generation,
        max_new_tokens=max_new_tokens,
        fluency=fluency,
        frozen=frozen,
        generation_batch_size=generation_batch_size,
        memo=memo,
    )
    cols: dict[str, list] = {"id": records["id"].to_list()}
    for name, m in REGISTRY.items():
        vals = m.compute_fn()(s) if m.compute is not None else None
        if vals is not None:
            if len(vals) != s.n:
                raise ValueError(f"metric {name!r} returned {len(vals)} values for {s.n} records")
            cols[name] = list(vals)
        if name == "generation_reliability":
            cols |= s.extra  # the generated text beside the metric that made it
    return pl.DataFrame(cols | s.extra, strict=False)


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
