"""Speed and memory (``run_bench``): seconds per training step, edit and evaluation throughput, peak
RSS per phase, adapter size, and the training step's roofline (``benchmarks/roofline.py``)."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch

from benchmarks.common import StepTimes, records, say, sync
from benchmarks.roofline import roofline, step_flops
from memoe.editors import make_editor
from memoe.editors.common import can_compile, resolve_precision
from memoe.editors.ft import FTMethod
from memoe.editors.memoe import MEMoEMethod
from memoe.memory import PeakRSS
from memoe.metrics import evaluate, generate, locality_predictions, summarize, teacher_forced
from memoe.models import load_model


def timed_edit(model, tok, method, recs, seed=0, clock: StepTimes | None = None) -> tuple[Any, dict]:
    """A fresh editor's edit of ``recs``, its wall time in the stats (``wall_s``); ``clock``: the
    editor's steps timed through ``on_step`` (editors that have it)."""
    ed = make_editor(model, tok, method, seed=seed)
    if clock is not None and hasattr(ed, "on_step"):
        ed.on_step = clock
        clock.start()
    sync(ed.device)
    t0 = time.perf_counter()
    stats = ed.edit(recs)
    sync(ed.device)
    stats = stats.as_dict()
    stats["wall_s"] = time.perf_counter() - t0
    return ed, stats


def eval_reuse(model, tok, ed, recs) -> dict[str, Any]:
    """A round's whole evaluation of ``recs`` (every registered metric, the probes of memoe/probes.py,
    generation), timed three ways one after the other: ``plain`` (no states reused, generation batches of
    16: the evaluation before ``eval.reuse_states`` and ``eval.generation_batch_size``), ``first`` (the
    states below the edit computed and kept: a round's own edits) and ``reused`` (all of them reused: the
    same edits scored in a later round). ``same_scores``: the teacher-forced columns of the three agree."""
    from memoe.frozen import FrozenStates
    from memoe.probes import add_probes

    probed = add_probes(recs, tok)
    base = locality_predictions(model, tok, probed)
    gen_cols = {"generation", "generation_reliability", "generation_contains"}
    states = FrozenStates(ed.unchanged_layers())
    secs, tables = {}, {}
    for name, kw in (
        ("plain", dict(generation_batch_size=16)),
        ("first", dict(generation_batch_size=64, frozen=states)),
        ("reused", dict(generation_batch_size=64, frozen=states)),
    ):
        t0 = time.perf_counter()
        tables[name] = evaluate(model, tok, probed, base, editor=ed, **kw)
        secs[name] = time.perf_counter() - t0
    tf_cols = [c for c in tables["plain"].columns if c not in gen_cols and c != "id"]
    same = all(tables[k].select(tf_cols).equals(tables["plain"].select(tf_cols)) for k in ("first", "reused"))
    t0 = time.perf_counter()
    generate(model, tok, probed["prompt"].to_list(), editor=ed, batch_size=16)
    g16 = time.perf_counter() - t0
    t0 = time.perf_counter()
    generate(model, tok, probed["prompt"].to_list(), editor=ed, batch_size=64)
    g64 = time.perf_counter() - t0
    n = probed.height
    res = {
        "edits": n,
        "unchanged_layers": ed.unchanged_layers(),
        "plain_s": secs["plain"],
        "first_s": secs["first"],
        "reused_s": secs["reused"],
        "speedup_first": secs["plain"] / secs["first"],
        "speedup_reused": secs["plain"] / secs["reused"],
        "generation_16_s": g16,
        "generation_64_s": g64,
        "same_scores": same,
        "states_mb_per_1000_edits": states.new_bytes() / 2**20 * 1000 / n,
    }
    say(
        f"evaluation of {n} edits with probes: plain {secs['plain']:.1f}s, first {secs['first']:.1f}s, "
        f"reused {secs['reused']:.1f}s ({res['speedup_reused']:.2f}x); generation 16 rows {g16:.1f}s, "
        f"64 rows {g64:.1f}s; states {res['states_mb_per_1000_edits']:.0f} MB per 1,000 edits; same scores {same}"
    )
    return res


def eval_study(model, tok, method, rounds: int, batch: int, recs, seed: int = 0) -> dict[str, Any]:
    """A sequential study's whole evaluation timed two ways on the same edited model: after each
    round (``rounds`` x ``batch`` of ``recs``, with the probes of memoe/probes.py), every edit so far
    is scored (the last round of a study scores all of them) with generation, once ``plain`` (nothing
    reused, generation batches of 16: the evaluation before ``eval.reuse_states``, ``eval.reuse_scores``
    and ``eval.generation_batch_size``) and once ``kept`` (the unedited model's states below the edit and
    the results that still hold kept across rounds, as a study keeps them). ``speedup``: plain / kept
    seconds over the study; ``sequences_per_s``: teacher-forced sequences and generations scored per
    second; ``same_scores``: every score column of the two agrees in every round."""
    from memoe.frozen import FrozenStates
    from memoe.memo import ScoreMemo
    from memoe.probes import add_probes
    from memoe.protocol import eval_records, overwritten_ids, score_round, seed_round

    if recs.height < rounds * batch:
        raise ValueError(f"eval_study: {rounds} x {batch} edits asked for, but the records hold {recs.height}")
    probed = add_probes(recs.head(rounds * batch), tok)
    base = locality_predictions(model, tok, probed)
    parts = [probed.slice(t * batch, batch) for t in range(rounds)]
    ed = make_editor(model, tok, method, seed=seed)
    states, memo = FrozenStates(ed.unchanged_layers()), ScoreMemo()
    per_round, same = [], True
    try:
        for t, part in enumerate(parts):
            seed_round(seed, t)
            ed.edit(part)
            todo, _ = eval_records(parts, t, None, seed, final=True)
            gone = overwritten_ids(parts[: t + 1])
            secs, tables = {}, {}
            for name, kw in (
                ("plain", dict(generation_batch_size=16)),
                ("kept", dict(generation_batch_size=64, frozen=states, memo=memo)),
            ):
                t0 = time.perf_counter()
                tables[name] = score_round(model, tok, ed, todo, base, gone, diagnostics=False, **kw).table
                secs[name] = time.perf_counter() - t0
            agree = tables["plain"].equals(tables["kept"])
            same = same and agree
            n_seq = sequences_scored(todo)
            per_round.append(
                {
                    "round": t + 1,
                    "edits_scored": todo.height,
                    "sequences": n_seq,
                    **{f"{k}_s": v for k, v in secs.items()},
                }
            )
            say(
                f"eval study round {t + 1}/{rounds}: {todo.height} edits ({n_seq} sequences) plain {secs['plain']:.1f}s, "
                f"kept {secs['kept']:.1f}s ({secs['plain'] / secs['kept']:.2f}x), same scores {agree}"
            )
    finally:
        ed.remove()
    plain, kept = sum(r["plain_s"] for r in per_round), sum(r["kept_s"] for r in per_round)
    n = sum(r["sequences"] for r in per_round)
    return {
        "rounds": rounds,
        "batch": batch,
        "growth": getattr(method, "growth", None),
        "per_round": per_round,
        "plain_s": plain,
        "kept_s": kept,
        "speedup": plain / kept,
        "plain_sequences_per_s": n / plain,
        "kept_sequences_per_s": n / kept,
        "same_scores": same,
    }


def sequences_scored(recs) -> int:
    """Sequences an evaluation of ``recs`` runs at most: each prompt teacher-forced and generated, and
    every rephrase, locality, probe and portability prompt teacher-forced (``generation_prompts`` are
    for fluency, off here)."""
    cols = [c for c in recs.columns if c.endswith("_prompts") and c != "generation_prompts"]
    return 2 * recs.height + sum(int(recs[c].list.len().sum()) for c in cols)


def step_time(model, tok, method, recs, steps: int) -> float:
    """Seconds per optimiser step. Editors that report their steps (``on_step``): the median of steps
    2.. of one edit (``StepTimes``); others: (edit with `steps` steps - edit with 1 step) / (steps - 1).
    Every editor made here is removed again: the model is left unedited."""
    fixed = dict(early_stop_loss=0.0)
    clock = StepTimes()
    ed, b = timed_edit(model, tok, method.model_copy(update=dict(fixed, steps=steps)), recs, clock=clock)
    ed.remove()
    if clock.times:
        return statistics.median(clock.times)
    ed, a = timed_edit(model, tok, method.model_copy(update=dict(fixed, steps=1)), recs)
    ed.remove()
    return (b["wall_s"] - a["wall_s"]) / (steps - 1)


def run_bench(
    quick: bool = True,
    model_name: str = "embedded:smollm2-135m",
    device: str = "auto",
    dtype: str = "auto",
    memoe: MEMoEMethod | None = None,
    scale: Callable[[], dict] | None = None,
) -> dict[str, Any]:
    torch.manual_seed(0)
    out: dict[str, Any] = {
        "quick": quick,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }
    rss: dict[str, float] = {}
    with PeakRSS() as p:
        model, tok = load_model(model_name, device, dtype)
    rss["load_model"] = p.peak
    dev = next(model.parameters()).device
    out["machine"]["device"] = str(dev)
    method = memoe or MEMoEMethod()
    n_main = 100
    zs = records("zsre", 1000 if not quick else n_main)

    # --- training step: cached vs uncached vs FT-M, and FLOP/s
    steps = 6 if quick else 21
    step_recs = zs.head(n_main)
    eager = method.model_copy(update=dict(compile=False))
    variants = {
        "cached": eager.model_copy(update=dict(layer_cache=True)),
        "uncached": eager.model_copy(update=dict(layer_cache=False)),
    }
    first = None
    if can_compile(dev):  # the same cached step through torch.compile (MEMoEMethod.compile)
        variants["compiled"] = variants["cached"].model_copy(update=dict(compile=True))
        clock = StepTimes()
        ed, st = timed_edit(
            model,
            tok,
            variants["compiled"].model_copy(update=dict(steps=2, early_stop_loss=0.0)),
            step_recs,
            clock=clock,
        )
        # the first step compiles the layers' forward and backward (or takes them from inductor's cache);
        # the clock's first step holds the edit's preparation too, which the editor reports
        first = clock.first - float(st.get("prep_s") or 0.0)
        ed.remove()
    # the variants in turns (3 each), so that drift of the host's speed falls on all of them
    ts = {k: [] for k in variants}
    for _ in range(3):
        for k, m in variants.items():
            ts[k].append(step_time(model, tok, m, step_recs, steps))
    med = {k: statistics.median(v) for k, v in ts.items()}
    t_c, t_u = med["cached"], med["uncached"]
    t_ft = step_time(model, tok, FTMethod(name="ft-m"), step_recs, steps)
    out["train_step"] = {
        "edits_per_step": n_main,
        "cached_s": t_c,
        "uncached_s": t_u,
        "ft_m_s": t_ft,
        "turns": {f"{k}_s": v for k, v in ts.items()},
    }
    out["cached_step_ratio"] = t_c / t_u
    say(
        f"training step on {n_main} edits: cached {t_c:.3f}s, uncached {t_u:.3f}s "
        f"(ratio {t_c / t_u:.2f}); FT-M {t_ft:.3f}s"
    )
    if "compiled" in med:
        out["train_step"].update(compiled_s=med["compiled"], compiled_first_step_s=first)
        out["compiled_step_ratio"] = med["compiled"] / t_c
        say(
            f"compiled: first step {first:.1f}s (compiling), then {med['compiled']:.3f}s a step against "
            f"{t_c:.3f}s eager (ratio {med['compiled'] / t_c:.2f}, same turns)"
        )
    cached = variants["cached"]
    flops = step_flops(model, tok, cached, step_recs)
    train_dtype = resolve_precision(method.precision, dev) or torch.float32
    out["flops"], out["roofline_fraction"] = roofline(model, tok, cached, step_recs, flops, train_dtype, dev, steps)
    if train_dtype != torch.float32:  # the same step in fp32, for comparison across machines
        fp32 = cached.model_copy(update=dict(precision="float32"))
        out["flops_fp32"], out["roofline_fraction_fp32"] = roofline(
            model, tok, fp32, step_recs, flops, torch.float32, dev, steps
        )
        out["train_step"]["cached_fp32_s"] = out["flops_fp32"]["step_s"]
    if "compiled" in variants:
        out["flops_compiled"], out["roofline_fraction_compiled"] = roofline(
            model, tok, variants["compiled"], step_recs, flops, train_dtype, dev, steps
        )

    # --- edit throughput
    thr = {}
    for n in [10, 100] if quick else [10, 100, 1000]:
        with PeakRSS() as p:
            ed, st = timed_edit(model, tok, method, zs.head(n))
        rss[f"edit_{n}"] = p.peak
        thr[str(n)] = {"edits": n, "seconds": st["wall_s"], "edits_per_s": n / st["wall_s"], "steps": st.get("steps")}
        say(f"edit {n:5d} edits: {st['wall_s']:.1f}s ({n / st['wall_s']:.2f} edits/s, steps {st.get('steps')})")
        if n == 100:
            adapter_params = sum(v.numel() for v in ed.state_dict().values())
            adapter_bytes = sum(v.numel() * v.element_size() for v in ed.state_dict().values())
            base_params = sum(p.numel() for p in model.parameters())
            base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            out["adapter"] = {
                "params": adapter_params,
                "bytes": adapter_bytes,
                "base_params": base_params,
                "base_bytes": base_bytes,
                "param_fraction": adapter_params / base_params,
            }
            # --- evaluation throughput with the edited model
            recs = zs.head(n)
            with PeakRSS() as p:
                t0 = time.perf_counter()
                teacher_forced(
                    model, tok, recs["prompt"].to_list(), recs["target_new"].to_list(), editor=ed, batch_size=32
                )
                tf_s = time.perf_counter() - t0
            rss["eval_teacher_forced"] = p.peak
            with PeakRSS() as p:
                t0 = time.perf_counter()
                generate(model, tok, recs["prompt"].to_list(), editor=ed, batch_size=32, max_new_tokens=8)
                g_s = time.perf_counter() - t0
            rss["eval_generation"] = p.peak
            out["eval_throughput"] = {
                "teacher_forced_prompts_per_s": n / tf_s,
                "generation_prompts_per_s": n / g_s,
                "max_new_tokens": 8,
            }
            say(f"eval: teacher-forced {n / tf_s:.1f} prompts/s, generation {n / g_s:.1f} prompts/s")
            base = locality_predictions(model, tok, recs)
            out["edit_100_metrics"] = summarize(evaluate(model, tok, recs, base, editor=ed, generation=False))
            out["eval_reuse"] = eval_reuse(model, tok, ed, recs.head(30 if quick else n))
        ed.remove()
        del ed
        gc.collect()
        if n == n_main and "compiled" in variants:  # right after the eager edit: the same state of the host
            ed, st = timed_edit(model, tok, method.model_copy(update=dict(compile=True)), zs.head(n))
            ed.remove()
            thr[f"{n}_compiled"] = {
                "edits": n,
                "seconds": st["wall_s"],
                "edits_per_s": n / st["wall_s"],
                "steps": st.get("steps"),
            }
            say(f"edit {n} edits, compiled: {st['wall_s']:.1f}s (steps {st.get('steps')})")
    out["edit_throughput"] = thr
    out["peak_rss_mb"] = rss
    if scale is not None:
        with PeakRSS() as p:
            out["scale"] = scale()
        rss["scale_study"] = p.peak
    return out
