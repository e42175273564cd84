"""The sequential scale study: rounds x batch real edits, time per round (with a host-speed gauge) and
Rel / Gen / Loc over rounds, and the flatness figures of the per-round times."""

from __future__ import annotations

import statistics
import time
from typing import Any

import polars as pl
import torch

from benchmarks.common import StepTimes, records, say
from benchmarks.gauge import host_gauge
from memoe.anchors import normalise_subject
from memoe.editors import make_editor
from memoe.memory import PeakRSS
from memoe.metrics import locality_predictions, summarize
from memoe.protocol import run_sequential

MIXED = ("zsre", "counterfact", "counterfact-val", "counterfact-edit-dev")  # catalogue names, in order


def mixed_records(n: int, seed: int = 0) -> pl.DataFrame:
    """n real edits for studies larger than one file: ZsRE, then the CounterFact files (``MIXED``, about
    8,400 edits in all), shuffled (seeded) so that every round of a study draws the same mix of prompt
    lengths. More than the files hold is an error."""
    parts, left = [], n
    for name in MIXED:
        if left <= 0:
            break
        df = records(name, left)
        parts.append(df.with_columns((pl.lit(name + ":") + pl.col("id")).alias("id")))
        left -= df.height
    if left > 0:
        raise ValueError(f"mixed_records: {n} edits asked for, but {', '.join(MIXED)} hold {n - left}")
    return pl.concat(parts).sample(fraction=1.0, shuffle=True, seed=seed)


def sequential_scale(
    model,
    tok,
    method,
    rounds: int,
    batch: int,
    *,
    recs: pl.DataFrame | None = None,
    retention_sample: int | None = 200,
    seed: int = 0,
    gauge_every: int = 0,
    score_all: bool = False,
) -> dict[str, Any]:
    """A sequential study of rounds x batch real edits (``memoe.protocol.run_sequential``): time per
    round (training, evaluation) and Rel / Gen / Loc over rounds. Training is timed in wall-clock and
    in the process's CPU time. After each round its own edits are scored with a seeded sample of at
    most ``retention_sample`` earlier ones (the last round too, unless ``score_all``: then every edit of
    the study; logged as ``scored``), so evaluation grows no faster than the edits so far. Give the
    method a fixed step count (``early_stop_loss=0``) to measure the cost of a round rather than how soon
    it converges. ``step_s_median`` / ``step_s_mean``: the round's optimiser steps but each edit's
    (block's) first (``StepTimes``).

    ``gauge_every`` > 0: after every that many training steps of a round (counted over its blocks), the
    same fixed work (a forward and backward pass over the study's first 2 x batch edits,
    ``benchmarks.gauge.host_gauge``) is timed, so the host's speed of the moment is measured beside the
    round's own steps. Each round's training
    time (the gauge's own time left out) is then also given at the study's typical host speed:
    ``train_s_host_adjusted`` = train_s x (median gauge time over rounds) / (the round's gauge time),
    where a round's ``gauge_s`` is the mean of its gauge times (its time is the sum of its steps').
    The gauge leaves the training unchanged (same losses and metrics)."""
    recs = mixed_records(rounds * batch) if recs is None else recs.head(rounds * batch)
    base = locality_predictions(model, tok, recs)
    ed = make_editor(model, tok, method, seed=seed)
    gauge = host_gauge(ed, recs.head(2 * batch)) if gauge_every > 0 and hasattr(ed, "gradient_pass") else None
    gauge_s: list[float] = []  # this round's gauge times
    gauge_cost = [0.0, 0.0]  # this round's gauge wall and CPU seconds, taken out of its training time
    round_steps: list[float] = []  # this round's step times over all its blocks (StepTimes keeps one block's)
    n_steps = [0]  # this round's optimiser steps so far: a block of a grown adapter stops early, often before N

    def on_step(step: int, loss: float):
        n_steps[0] += 1
        if step > 1:
            round_steps.append(clock.times[-1])
        if gauge is not None and n_steps[0] % gauge_every == 0:
            t0, c0 = time.perf_counter(), time.process_time()
            gauge_s.append(gauge())
            gauge_cost[0] += time.perf_counter() - t0
            gauge_cost[1] += time.process_time() - c0

    clock = StepTimes(then=on_step)  # the optimiser steps alone (the gauge's time left out)
    ed.on_step = clock
    parts = [recs.slice(t * batch, batch) for t in range(rounds)]
    recurring = recurring_per_round(parts)
    per_round = []
    memory = PeakRSS().__enter__()  # sampled through the whole study; read after each round
    try:
        for r in run_sequential(
            model,
            tok,
            ed,
            parts,
            base,
            seed=seed,
            retention_sample=retention_sample,
            all_after_last=score_all,
            diagnostics=False,
            generation=False,
        ):
            t, st = r.index, r.edit
            train_s, train_cpu_s = r.train_s - gauge_cost[0], r.train_cpu_s - gauge_cost[1]
            m = summarize(r.scores.table)
            table = r.scores.table
            earlier = (
                summarize(table.filter(~pl.col("current")))
                if "current" in table.columns and not table["current"].all()
                else None
            )
            times = list(round_steps)
            row = {
                "round": t + 1,
                "edits_so_far": (t + 1) * batch,
                "train_s": train_s,
                "train_cpu_s": train_cpu_s,
                "eval_s": r.eval_s,
                "scored": r.scores.table.height,
                "steps": st.steps,
                "recurring": recurring[t],
                "loss_final": st.loss_final,
                "step_s_median": statistics.median(times) if times else None,
                "step_s_mean": statistics.fmean(times) if times else None,
                **{k: m.get(k) for k in ("reliability", "generality", "locality")},
            }
            if earlier is not None:  # the sample of earlier rounds' edits alone: what survives the new ones
                row["earlier"] = {k: earlier.get(k) for k in ("reliability", "generality", "locality")}
            if "adapter_bytes" in st.details:
                row["adapter_bytes"] = st.details["adapter_bytes"]
            # what a round trains beside its own edits (its cost), and what it protects without training
            for key in ("n_replayed", "n_kept", "protected_dims", "blocks_trained"):
                if key in st.details:
                    row[key] = st.details[key]
            row["peak_rss_mb_so_far"] = memory.peak
            if hasattr(ed, "adapter"):  # the gauge runs through the adapter: its size must not change
                row["adapter_params"] = sum(p.numel() for p in ed.adapter.parameters())
            if gauge_s:  # the mean: the round's time is a sum over its steps, at the host's speed of each
                row.update(gauge_s=statistics.fmean(gauge_s), gauge_times=list(gauge_s))
            per_round.append(row)
            say(
                f"round {t + 1}/{rounds} ({row['edits_so_far']} edits, RSS {memory.peak:.0f} MiB): "
                f"train {train_s:.1f}s ({st.steps} steps, {recurring[t]} recurring) eval {r.eval_s:.1f}s on {row['scored']} "
                + (f"gauge {row['gauge_s']:.3f}s " if gauge_s else "")
                + f"Rel {m.get('reliability', float('nan')):.2f} Gen {m.get('generality', float('nan')):.2f} "
                f"Loc {m.get('locality', float('nan')):.2f}"
            )
            gauge_s.clear()  # before the next round (run_sequential goes on when asked for it)
            gauge_cost[:] = [0.0, 0.0]
            round_steps.clear()
            n_steps[0] = 0
    finally:
        memory.__exit__(None, None, None)
    ed.remove()
    ed.on_step = None
    later = per_round[1:] or per_round  # flatness over the rounds after the first (nothing to replay there)
    # each round's training time over its own evaluation time (a sample of the same size, scored right
    # after, on a model whose size does not change): a rough host-speed correction, needing no gauge
    for r in per_round:
        r["train_per_eval"] = r["train_s"] / r["eval_s"]
    # the rounds that score as many edits as most do (score_all: the last scores every edit)
    usual = statistics.mode(r["scored"] for r in later)
    same_eval = [r for r in later if r["scored"] == usual]
    out = {
        "rounds": rounds,
        "batch": batch,
        "retention_sample": retention_sample,
        "replay": method.replay,
        "growth": getattr(method, "growth", None),
        "block_edits": getattr(method, "block_edits", None),
        "precision": method.precision,
        "steps": method.steps,
        "early_stop_loss": method.early_stop_loss,
        "compile": method.compile,
        "gauge_every": gauge_every,
        "score_all": score_all,
        "per_round": per_round,
        **flatness([r["train_s"] for r in later], "train_s"),
        **flatness([r["train_cpu_s"] for r in later], "train_cpu_s"),
        **flatness([r["train_per_eval"] for r in same_eval], "train_per_eval"),
        **flatness_given([r["train_s"] for r in later], [r["recurring"] for r in later], "train_s"),
        **flatness_given([float(r["steps"]) for r in later], [r["recurring"] for r in later], "steps"),
    }
    if all("gauge_s" in r for r in per_round):
        typical = statistics.median(r["gauge_s"] for r in later)
        for r in per_round:
            r["train_s_host_adjusted"] = r["train_s"] * typical / r["gauge_s"]
            if r["step_s_mean"] is not None:
                r["step_per_gauge"] = r["step_s_mean"] / r["gauge_s"]
        spread = max(r["gauge_s"] for r in later) / min(r["gauge_s"] for r in later)
        out.update(
            gauge_s_median=typical,
            gauge_s_spread=spread,
            **flatness([r["train_s_host_adjusted"] for r in later], "train_s_host_adjusted"),
            **flatness_given(
                [r["train_s_host_adjusted"] for r in later], [r["recurring"] for r in later], "train_s_host_adjusted"
            ),
        )
    return out


def flatness(times: list[float], name: str) -> dict[str, float]:
    """Median of per-round times, the largest deviation from it (a share of it), and the
    least-squares slope against the round, a share of the median per round: a host's noise spreads
    the times, growth with the edits so far tilts them."""
    med = statistics.median(times)
    slope = statistics.linear_regression(range(len(times)), times).slope / med if len(times) > 1 else 0.0
    return {
        f"{name}_median": med,
        f"{name}_max_dev": max(abs(x - med) for x in times) / med,
        f"{name}_slope_per_round": slope,
    }


def recurring_per_round(parts: list[pl.DataFrame]) -> list[int]:
    """Each round's edits whose subject (``normalise_subject``) an earlier round edited: the stream's own
    difficulty (such an edit must override its subject's earlier blocks), which rises with the subjects
    edited so far whatever the method."""
    seen: set[str] = set()
    out = []
    for part in parts:
        subjects = [normalise_subject(s) for s in part["subject"].to_list()]
        out.append(sum(s in seen for s in subjects))
        seen.update(subjects)
    return out


def flatness_given(times: list[float], recurring: list[int], name: str) -> dict[str, float]:
    """The per-round times fitted (least squares) as a + b x (the round's recurring edits) + c x round:
    ``{name}_slope_given_recurring`` is c and ``{name}_per_recurring_edit`` is b, each a share of the
    median. The first is the growth with the edits so far that the stream's rising share of recurring
    subjects does not explain; with no variation in ``recurring`` (or fewer than three rounds, too few to
    fit both) b = 0 and c is the plain slope."""
    med = statistics.median(times)
    x = torch.tensor([[1.0, float(i), float(k)] for i, k in enumerate(recurring)], dtype=torch.float64)
    if len(set(recurring)) == 1 or len(times) < 3:
        x = x[:, :2]
    coef = torch.linalg.lstsq(x, torch.tensor(times, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1)
    b = float(coef[2]) if coef.numel() == 3 else 0.0
    return {f"{name}_slope_given_recurring": float(coef[1]) / med, f"{name}_per_recurring_edit": b / med}
