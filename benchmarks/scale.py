"""The sequential scale study: rounds x batch real edits, time per round (with a host-speed gauge) and
Rel / Gen / Loc over rounds, and the flatness figures of the per-round times."""
from __future__ import annotations

import statistics
import time
from typing import Any

import polars as pl

from benchmarks.common import records, say
from memoe.editors import make_editor
from memoe.metrics import evaluate, locality_predictions, summarize


def mixed_records(n: int, seed: int = 0) -> pl.DataFrame:
    """n real edits for studies larger than one file: ZsRE, then CounterFact, shuffled (seeded) so
    that every round of a study draws the same mix of prompt lengths."""
    parts, left = [], n
    for name in ("zsre", "counterfact", "counterfact-val"):
        if left <= 0:
            break
        df = records(name, left)
        parts.append(df.with_columns((pl.lit(name + ":") + pl.col("id")).alias("id")))
        left -= df.height
    return pl.concat(parts).sample(fraction=1.0, shuffle=True, seed=seed)


def sequential_scale(model, tok, method, rounds: int, batch: int, *, recs: pl.DataFrame | None = None,
                     retention_sample: int | None = 200, seed: int = 0, gauge_every: int = 0) -> dict[str, Any]:
    """A sequential study of rounds x batch real edits: time per round (training, evaluation) and
    Rel / Gen / Loc over rounds. Training is timed in wall-clock and in the process's CPU time.
    Earlier edits are scored on a seeded sample of at most ``retention_sample`` (logged), so
    evaluation grows no faster than the edits so far. Give the method a fixed step count
    (``early_stop_loss=0``) to measure the cost of a round rather than how soon it converges.

    ``gauge_every`` > 0: after every that many training steps, the same fixed work (a forward and
    backward pass over the study's first 2 x batch edits, ``MEMoEEditor.timing_probe``) is timed, so
    the host's speed of the moment is measured beside the round's own steps. Each round's training
    time (the gauge's own time left out) is then also given at the study's typical host speed:
    ``train_s_host_adjusted`` = train_s x (median gauge time over rounds) / (the round's gauge time),
    where a round's ``gauge_s`` is the mean of its gauge times (its time is the sum of its steps').
    The gauge leaves the training unchanged (same losses and metrics)."""
    recs = mixed_records(rounds * batch) if recs is None else recs.head(rounds * batch)
    base = locality_predictions(model, tok, recs)
    ed = make_editor(model, tok, method, seed=seed)
    gauge = ed.timing_probe(recs.head(2 * batch)) if gauge_every > 0 and hasattr(ed, "timing_probe") else None
    gauge_s: list[float] = []  # this round's gauge times
    gauge_cost = [0.0, 0.0]  # this round's gauge wall and CPU seconds, taken out of its training time

    def on_step(step: int, loss: float):
        if step % gauge_every == 0:
            t0, c0 = time.perf_counter(), time.process_time()
            gauge_s.append(gauge())
            gauge_cost[0] += time.perf_counter() - t0
            gauge_cost[1] += time.process_time() - c0

    if gauge is not None:
        ed.on_step = on_step
    per_round = []
    for t in range(rounds):
        cur = recs.slice(t * batch, batch)
        gauge_s.clear()
        gauge_cost[:] = [0.0, 0.0]
        t0, c0 = time.perf_counter(), time.process_time()
        st = ed.edit(cur)
        train_s = time.perf_counter() - t0 - gauge_cost[0]
        train_cpu_s = time.process_time() - c0 - gauge_cost[1]
        seen = recs.head((t + 1) * batch)
        sample = seen if retention_sample is None or seen.height <= retention_sample else \
            seen.sample(retention_sample, seed=seed + t)
        t0 = time.perf_counter()
        m = summarize(evaluate(model, tok, sample, base.filter(pl.col("id").is_in(sample["id"].implode())),
                               editor=ed, generation=False))
        eval_s = time.perf_counter() - t0
        times = list(getattr(ed, "step_times", None) or [])  # the optimiser steps alone
        row = {"round": t + 1, "edits_so_far": (t + 1) * batch, "train_s": train_s,
               "train_cpu_s": train_cpu_s, "eval_s": eval_s,
               "scored": sample.height, "steps": st.steps, "loss_final": st.loss_final,
               "step_s_median": statistics.median(times) if times else None,
               "step_s_mean": statistics.fmean(times) if times else None,
               **{k: m.get(k) for k in ("reliability", "generality", "locality")}}
        if hasattr(ed, "adapter"):  # the gauge runs through the adapter: its size must not change
            row["adapter_params"] = sum(p.numel() for p in ed.adapter.parameters())
        if gauge_s:  # the mean: the round's time is a sum over its steps, at the host's speed of each
            row.update(gauge_s=statistics.fmean(gauge_s), gauge_times=list(gauge_s))
        per_round.append(row)
        say(f"round {t + 1}/{rounds}: train {train_s:.1f}s eval {eval_s:.1f}s on {sample.height} "
             + (f"gauge {row['gauge_s']:.3f}s " if gauge_s else "")
             + f"Rel {m.get('reliability', float('nan')):.2f} Gen {m.get('generality', float('nan')):.2f} "
             f"Loc {m.get('locality', float('nan')):.2f}")
    ed.remove()
    ed.on_step = None
    later = per_round[1:] or per_round  # flatness over the rounds after the first (nothing to replay there)
    # each round's training time over its own evaluation time (a sample of the same size, scored right
    # after, on a model whose size does not change): a rough host-speed correction, needing no gauge
    for r in per_round:
        r["train_per_eval"] = r["train_s"] / r["eval_s"]
    same_eval = [r for r in later if r["scored"] == later[-1]["scored"]]
    out = {"rounds": rounds, "batch": batch, "retention_sample": retention_sample, "replay": method.replay,
           "precision": method.precision, "steps": method.steps, "early_stop_loss": method.early_stop_loss,
           "compile": method.compile, "gauge_every": gauge_every, "per_round": per_round,
           **flatness([r["train_s"] for r in later], "train_s"),
           **flatness([r["train_cpu_s"] for r in later], "train_cpu_s"),
           **flatness([r["train_per_eval"] for r in same_eval], "train_per_eval")}
    if all("gauge_s" in r for r in per_round):
        typical = statistics.median(r["gauge_s"] for r in later)
        for r in per_round:
            r["train_s_host_adjusted"] = r["train_s"] * typical / r["gauge_s"]
            if r["step_s_mean"] is not None:
                r["step_per_gauge"] = r["step_s_mean"] / r["gauge_s"]
        spread = max(r["gauge_s"] for r in later) / min(r["gauge_s"] for r in later)
        out.update(gauge_s_median=typical, gauge_s_spread=spread,
                   **flatness([r["train_s_host_adjusted"] for r in later], "train_s_host_adjusted"))
    return out


def flatness(times: list[float], name: str) -> dict[str, float]:
    """Median of per-round times, the largest deviation from it (a share of it), and the
    least-squares slope against the round, a share of the median per round: a host's noise spreads
    the times, growth with the edits so far tilts them."""
    med = statistics.median(times)
    slope = statistics.linear_regression(range(len(times)), times).slope / med if len(times) > 1 else 0.0
    return {f"{name}_median": med, f"{name}_max_dev": max(abs(x - med) for x in times) / med,
            f"{name}_slope_per_round": slope}
