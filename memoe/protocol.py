"""The sequential-editing protocol, once (``protocol.mode: sequential``; batch editing is one round).

The edits come in rounds (``memoe.data.split_rounds``); round t trains the editor from its state
after round t-1. After round t the round's own edits are scored (``current``) together with the
earlier rounds' edits (retention): a seeded sample of at most ``retention_sample`` of them, except
after the last round, where every edit is scored. A re-edit (an earlier edit's prompt with a new
target, id ``<id>#re<round>``) supersedes the edit it re-edits: from its round on, the earlier edit
is no longer in force and its old target is scored apart (``overwritten_reliability``: it should be
gone), the re-edit as any edit and also as ``reedit_reliability``. Each round has its own seed
(``round_seed``).

The pieces, as plain functions on polars frames and editors: ``round_seed`` / ``seed_round`` (the
round's seed, and seeding the global generators with it), ``eval_records`` (what is scored after
round t), ``overwritten_ids`` / ``split_overwritten`` (the re-edit bookkeeping), ``score_round``
(scoring one round: the metrics, ``overwritten_reliability``, ``reedit_reliability`` and the
editor's diagnostics) and ``run_sequential``, the whole protocol as an in-process loop over one
editor (benchmarks and scripts). The pipeline (``flows/study.py``, ``tasks/steps.py``) runs the same
pieces as one cached task per round, so that a study killed in round k resumes at round k.

At the top of the library: it uses the editors and the metrics; no Prefect, no MLflow.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import polars as pl

from memoe.data import RE_EDIT
from memoe.metrics import Scoring, evaluate, generation_reliability, mark_locality_conflicts, reliability

log = logging.getLogger(__name__)

# the columns an edit brings beside its scores, so that failures can be read from the table
SHOWN = ("subject", "prompt", "target_new", "target_true")


def round_seed(seed: int, round_index: int) -> int:
    """The seed of round ``round_index`` (0-based) of a study seeded ``seed``: its editor's seed, the
    global generators' seed while it trains, and the seed of its sample of earlier edits."""
    return seed * 1000 + round_index


def seed_round(seed: int, round_index: int) -> int:
    """Seed Python's, numpy's and torch's global generators for round ``round_index``; returns the
    round's seed (``round_seed``)."""
    import random

    import numpy as np
    import torch

    s = round_seed(seed, round_index)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


def eval_records(
    rounds: Sequence[pl.DataFrame], round_index: int, retention_sample: int | None, seed: int, final: bool
) -> tuple[pl.DataFrame, int]:
    """What is scored after round t (``rounds``: the rounds' edits, at least up to t): round t's own
    edits plus the earlier ones, a seeded sample of at most ``retention_sample`` of them unless
    ``final`` (after the last round every edit is scored). Columns ``round_of_edit`` (0-based) and
    ``current`` (round t's own) are added, and ``locality_conflict`` where the data names relations
    (``memoe.metrics.mark_locality_conflicts``: the locality prompts that ask a fact one of the edits
    applied so far changed); earlier edits come first. Returns (records, number of earlier edits among
    them)."""
    in_force = pl.concat(rounds[: round_index + 1], how="diagonal_relaxed")
    own = rounds[round_index].with_columns(pl.lit(round_index).alias("round_of_edit"), pl.lit(True).alias("current"))
    earlier = [
        r.with_columns(pl.lit(i).alias("round_of_edit"), pl.lit(False).alias("current"))
        for i, r in enumerate(rounds[:round_index])
    ]
    if not earlier:
        return mark_locality_conflicts(own, in_force), 0
    prev = pl.concat(earlier)
    if retention_sample is not None and not final and prev.height > retention_sample:
        prev = prev.sample(n=retention_sample, seed=round_seed(seed, round_index), shuffle=False)
    return mark_locality_conflicts(pl.concat([prev, own]), in_force), prev.height


def overwritten_ids(rounds: Sequence[pl.DataFrame]) -> set[str]:
    """The ids of the edits that a re-edit among ``rounds`` (the rounds applied so far) supersedes:
    no longer in force."""
    return {i.rsplit(RE_EDIT, 1)[0] for r in rounds for i in r["id"].to_list() if RE_EDIT in i}


def split_overwritten(records: pl.DataFrame, overwritten: set[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(the records in force, the overwritten ones)."""
    gone = pl.col("id").is_in(list(overwritten))
    return records.filter(~gone), records.filter(gone)


@dataclass
class Scores:
    table: pl.DataFrame  # one row per scored edit (an overwritten edit: overwritten_reliability only)
    diagnostics: dict = field(default_factory=dict)  # the editor's own figures (Editor.diagnostics)


def score_round(
    model,
    tok,
    editor,
    records: pl.DataFrame,
    base: pl.DataFrame,
    overwritten: set[str] = frozenset(),
    *,
    batch_size: int = 16,
    generation: bool = True,
    max_new_tokens: int = 16,
    fluency: bool = False,
    diagnostics: bool = True,
    frozen=None,
    generation_batch_size: int | None = None,
    memo=None,
) -> Scores:
    """Score the edited model after a round on ``records`` (``eval_records``; ``base``: the unedited
    model's locality predictions). The edits in ``overwritten`` (``overwritten_ids``) are scored
    apart: only their old target's reliability (``overwritten_reliability``); when there are any,
    ``reedit_reliability`` is the reliability of the re-edits. ``diagnostics``: the editor's own
    (``Editor.diagnostics``; MEMoE: expert load, anchor hit rates) on the round's own edits in force;
    a failure there is logged, never fails the scoring. ``editor`` None: the unedited model. ``frozen``: a
    ``memoe.frozen.FrozenStates`` the teacher-forced scores reuse and add to; ``memo``: a ``memoe.memo.ScoreMemo``
    of the edited model's results that still hold, reused and added to."""
    records, old = split_overwritten(records, overwritten)
    options = dict(
        batch_size=batch_size,
        generation=generation,
        max_new_tokens=max_new_tokens,
        fluency=fluency,
        generation_batch_size=generation_batch_size,
    )
    table = evaluate(
        model, tok, records.drop("round_of_edit", "current"), base, editor=editor, frozen=frozen, memo=memo, **options
    )
    old_cols = _overwritten_scores(
        model, tok, editor, old, records, batch_size, generation, max_new_tokens, generation_batch_size
    )
    diag = {}
    if diagnostics and editor is not None:
        diag = editor_diagnostics(
            editor, records.filter(pl.col("current")).drop("round_of_edit", "current"), batch_size
        )
    # the edit itself beside its scores and generations (whatever columns evaluate() returns come along)
    shown = [c for c in SHOWN if c not in table.columns]
    table = table.with_columns(records["round_of_edit"], records["current"], *(records[c] for c in shown))
    table = table.select(["id", *shown, *(c for c in table.columns if c not in ("id", *shown))])
    if overwritten:
        table = table.with_columns(
            pl.when(pl.col("id").str.contains(RE_EDIT, literal=True))
            .then(pl.col("reliability"))
            .otherwise(None)
            .alias("reedit_reliability")
        )
    if old.height:
        table = pl.concat(
            [
                table,
                old.select("id", "round_of_edit", "current", *shown).with_columns(
                    *(pl.Series(k, v, pl.Float64) for k, v in old_cols.items())
                ),
            ],
            how="diagonal_relaxed",
        )
    return Scores(table, diag)


def _overwritten_scores(
    model,
    tok,
    editor,
    old: pl.DataFrame,
    in_force: pl.DataFrame,
    batch_size: int,
    generation: bool,
    max_new_tokens: int,
    generation_batch_size: int | None = None,
) -> dict[str, list]:
    """An overwritten edit's old target on its prompt: its reliability (teacher-forced: the share of the
    old target's tokens predicted, each after the old target's own earlier tokens, so a multi-token name
    keeps some credit for its continuation even when its first token is gone), whether it is more likely
    than the latest target (``overwritten_preferred``; None where the re-edit is not among the scored
    records), and whether greedy generation starts with it (``overwritten_generation``, with generation)."""
    if not old.height:
        return {}
    # the old rows as records of their own (target_new: the old target): the evaluation's own metrics
    s = Scoring(
        model,
        tok,
        old,
        None,
        editor=editor,
        batch_size=batch_size,
        generation=generation,
        max_new_tokens=max_new_tokens,
        generation_batch_size=generation_batch_size,
    )
    prompts, targets = old["prompt"].to_list(), old["target_new"].to_list()
    res = s.tf(prompts, targets)
    out: dict[str, list] = {"overwritten_reliability": reliability(s)}
    latest = {}  # the newest re-edit of each overwritten edit among the scored records
    for i, t in sorted(zip(in_force["id"].to_list(), in_force["target_new"].to_list())):
        if RE_EDIT in i:
            latest[i.rsplit(RE_EDIT, 1)[0]] = t
    rows = [k for k, i in enumerate(old["id"].to_list()) if i in latest]
    pref: list[float | None] = [None] * old.height
    if rows:
        now = s.tf([prompts[k] for k in rows], [latest[old["id"][k]] for k in rows])
        for k, lp in zip(rows, now.logprob):
            pref[k] = float(res.logprob[k] > lp)
    out["overwritten_preferred"] = pref
    if generation:
        out["overwritten_generation"] = generation_reliability(s)
    return out


def editor_diagnostics(editor, records: pl.DataFrame, batch_size: int) -> dict:
    """``editor.diagnostics(records)``, or {"error": ...} when it fails (logged)."""
    try:
        return editor.diagnostics(records, batch_size=batch_size)
    except Exception as e:  # noqa: BLE001 - diagnostics are informative, never fatal
        log.warning("router diagnostics failed: %s", e)
        return {"error": str(e)}


@dataclass
class Round:
    """One round of ``run_sequential``."""

    index: int  # 0-based
    edit: Any  # what editor.edit() returned (None for the unedited model)
    train_s: float  # wall-clock seconds of editor.edit()
    train_cpu_s: float  # the process's CPU seconds of it
    scores: Scores | None  # None when the round is not scored
    n_earlier: int = 0  # earlier edits among the scored
    eval_s: float = 0.0  # seconds of score_round


def run_sequential(
    model,
    tok,
    editor,
    rounds: Sequence[pl.DataFrame],
    base: pl.DataFrame,
    *,
    seed: int = 0,
    retention_sample: int | None = None,
    every_round: bool = True,
    all_after_last: bool = True,
    diagnostics: bool = True,
    after_edit: Callable[[int], None] | None = None,
    **eval_kw,
) -> Iterator[Round]:
    """The protocol in one process, on one editor: for each round, seed it (``seed_round``), edit on
    its records, score it (``eval_records`` + ``score_round``; ``eval_kw``: ``score_round``'s
    batch_size, generation_batch_size, generation, max_new_tokens, fluency); yields a ``Round`` after each. Code run
    between two rounds (the consumer's, before asking for the next) is not timed.
    ``every_round`` False: only the last round is scored. ``all_after_last`` False: the last round
    scores a sample of the earlier edits as every other round does (a scale study's evaluation
    that grows no faster than the edits). ``after_edit(t)``: called after round t's edit, before its
    scoring (a reading of the peak memory). ``editor`` None: the unedited model, scored the same way.
    Unlike the pipeline, the editor is the caller's, built once with its own seed (the pipeline
    builds round t's editor with ``round_seed(seed, t)`` and loads state t-1 into it)."""
    last = len(rounds) - 1
    for t, part in enumerate(rounds):
        seed_round(seed, t)
        t0, c0 = time.perf_counter(), time.process_time()
        res = editor.edit(part) if editor is not None else None
        train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        if after_edit is not None:
            after_edit(t)
        if not every_round and t < last:
            yield Round(t, res, train_s, train_cpu_s, None)
            continue
        t0 = time.perf_counter()
        recs, n_earlier = eval_records(rounds, t, retention_sample, seed, final=all_after_last and t == last)
        scores = score_round(
            model, tok, editor, recs, base, overwritten_ids(rounds[: t + 1]), diagnostics=diagnostics, **eval_kw
        )
        yield Round(t, res, train_s, train_cpu_s, scores, n_earlier, time.perf_counter() - t0)
