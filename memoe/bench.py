"""Benchmarks of speed, memory and scale (not tests): each prints its figures and returns them.

``run_bench(quick=...)`` measures, in one process on one machine:
  edit throughput (edits/s for 10 / 100 / 1,000 edits), seconds per training step with and without
  the cache of the layers below l, FT-M's step in the same run, evaluation throughput
  (teacher-forced and generation), peak RSS per phase, adapter size against the base model,
  achieved FLOP/s of the training step against a plain matmul of the same shapes, and a sequential
  scale study (time per round, Rel / Gen / Loc over rounds).
"""
from __future__ import annotations

import collections
import gc
import os
import platform
import statistics
import time
from typing import Any, Callable

import polars as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from memoe.config import FTMethod, MEMoEMethod, resolve_path
from memoe.data import load_edits
from memoe.datasets import SHARED_DATASETS
from memoe.editors import make_editor
from memoe.editors.common import can_compile, resolve_precision
from memoe.memory import PeakRSS
from memoe.metrics import evaluate, generate, locality_predictions, summarize, teacher_forced
from memoe.models import load_model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def records(name: str, n: int, offset: int = 0) -> pl.DataFrame:
    path, fmt = SHARED_DATASETS[name]
    df, _ = load_edits(resolve_path(path), fmt)
    return df.slice(offset, n)


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


def timed_edit(model, tok, method, recs, seed=0) -> tuple[Any, dict]:
    ed = make_editor(model, tok, method, seed=seed)
    _sync(ed.device)
    t0 = time.perf_counter()
    stats = ed.edit(recs)
    _sync(ed.device)
    stats = dict(stats or {})
    stats["wall_s"] = time.perf_counter() - t0
    return ed, stats


def step_time(model, tok, method, recs, steps: int) -> float:
    """Seconds per optimiser step. Editors that time their steps (MEMoE: ``step_times``): the median
    of steps 2.. of one edit; others: (edit with `steps` steps - edit with 1 step) / (steps - 1).
    Every editor made here is removed again: the model is left unedited."""
    fixed = dict(early_stop_loss=0.0)
    ed, b = timed_edit(model, tok, method.model_copy(update=dict(fixed, steps=steps)), recs)
    times = list(getattr(ed, "step_times", None) or [])
    ed.remove()
    if len(times) >= 2:
        return statistics.median(times[1:])
    ed, a = timed_edit(model, tok, method.model_copy(update=dict(fixed, steps=1)), recs)
    ed.remove()
    return (b["wall_s"] - a["wall_s"]) / (steps - 1)


def step_flops(model, tok, method, recs) -> float:
    """FLOPs of one training step (forward + backward), counted by torch's FlopCounterMode."""
    m1 = method.model_copy(update=dict(steps=2, early_stop_loss=0.0))
    with FlopCounterMode(display=False) as fc1:
        e = make_editor(model, tok, m1); e.edit(recs); e.remove()
    m0 = method.model_copy(update=dict(steps=1, early_stop_loss=0.0))
    with FlopCounterMode(display=False) as fc0:
        e = make_editor(model, tok, m0); e.edit(recs); e.remove()
    return float(fc1.get_total_flops() - fc0.get_total_flops())


class MatmulShapes(TorchDispatchMode):
    """Records every matrix multiply a block of code runs (op, operand shapes / strides, dtype),
    after autocast, so the same multiplies can be replayed alone (``matmul_replay``)."""
    OPS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.bmm.default: (0, 1),
           torch.ops.aten.addmm.default: (1, 2), torch.ops.aten.baddbmm.default: (1, 2)}

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            i, j = self.OPS[func]
            a, b = args[i], args[j]
            self.calls[(tuple(a.shape), tuple(a.stride()), tuple(b.shape), tuple(b.stride()), a.dtype)] += 1
        return func(*args, **(kwargs or {}))


def _mm_flops(key) -> int:
    a, _, b, _, _ = key
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def matmul_replay(calls: collections.Counter, device) -> tuple[float, Callable[[], float]]:
    """(FLOPs, run): ``run()`` times one pass of the recorded multiplies run alone as plain matmuls
    on operands of the same shapes, strides and dtype (allocated once, here)."""
    ops = []
    for key, n in calls.items():
        a_shape, a_stride, b_shape, b_stride, dtype = key
        mk = lambda shape, stride: torch.empty_strided(shape, stride, dtype=dtype, device=device).normal_()
        ops.append((mk(a_shape, a_stride), mk(b_shape, b_stride), n))
    flops = sum(_mm_flops(k) * n for k, n in calls.items())

    def run() -> float:
        _sync(device); t0 = time.perf_counter()
        for a, b, n in ops:
            for _ in range(n):
                torch.matmul(a, b)
        _sync(device)
        return time.perf_counter() - t0
    return float(flops), run


def step_matmuls(model, tok, method, recs) -> collections.Counter:
    """The matrix multiplies of one training step: those of an edit with 2 steps minus those of
    an edit with 1 step (set-up and the layer cache's capture cancel out)."""
    out = []
    for steps in (2, 1):
        m = method.model_copy(update=dict(steps=steps, early_stop_loss=0.0))
        rec = MatmulShapes()
        with rec:
            e = make_editor(model, tok, m); e.edit(recs); e.remove()
        out.append(rec.calls)
    return out[0] - out[1]


def matmul_flops_per_s(m: int, k: int, n: int, device, dtype=torch.float32, seconds: float = 2.0) -> float:
    """Achieved FLOP/s of a plain (m x k) @ (k x n) matmul on this machine, best of repeated runs."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        _sync(device); t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync(device)
        best = max(best, 10 * 2 * m * k * n / (time.perf_counter() - t0))
    return best


def _quartiles(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return f"{q[0]:.2f}-{q[2]:.2f}"


def _say(msg: str):
    print(f"[bench] {msg}", flush=True)


def _roofline(model, tok, method, recs, flops: float, dtype, device, steps: int, rounds: int = 3) -> tuple[dict, float]:
    """The training step's FLOP/s against the same step's matrix multiplies run alone (same shapes,
    strides, dtype, count): the fraction of the attainable matmul speed the whole step reaches.
    Paired in time: after every training step (``rounds`` edits of ``steps`` steps; the first step
    of each is warm-up) one pass of the multiplies alone, so that each pair sees the machine in
    the same state (on a shared host the matmul speed can change by 2x within seconds); the
    fraction is the median over the pairs. Also against one large matmul (all the step's tokens
    through the MLP's up projection)."""
    calls = step_matmuls(model, tok, method.model_copy(update=dict(compile=False)), recs)  # the same multiplies
    mm_flops, replay = matmul_replay(calls, device)
    replay()  # warm-up
    step_s, mm_s = [], []
    for _ in range(rounds):
        ed = make_editor(model, tok, method.model_copy(update=dict(steps=steps, early_stop_loss=0.0)))

        def pair(step: int, loss: float, ed=ed) -> None:
            if step > 1:
                step_s.append(ed.step_times[-1])
                mm_s.append(replay())
        ed.on_step = pair
        ed.edit(recs)
        ed.remove()
    fracs = [(flops / s) / (mm_flops / m) for s, m in zip(step_s, mm_s)]
    frac = statistics.median(fracs)
    st, mt = statistics.median(step_s), statistics.median(mm_s)
    ntok = int(sum(len(tok(p + " " + t).input_ids) for p, t in zip(recs["prompt"], recs["target_new"])))
    h = model.config.hidden_size
    inter = getattr(model.config, "intermediate_size", 4 * h)
    peak = matmul_flops_per_s(ntok, h, inter, device, dtype=dtype)
    prec = str(dtype).replace("torch.", "")
    fig = {"precision": prec, "step_flops": flops, "step_s": st, "step_flop_s": flops / st,
           "matmul_calls": sum(calls.values()), "matmul_shapes": len(calls), "matmul_flops": mm_flops,
           "matmul_s": mt, "matmul_flop_s": mm_flops / mt, "pairs": {"step_s": step_s, "matmul_s": mm_s,
                                                                     "fraction": fracs},
           "peak_matmul_shape": [ntok, h, inter], "peak_matmul_flop_s": peak,
           "fraction_of_peak_matmul": flops / st / peak}
    _say(f"training step ({prec}): {flops / 1e9:.1f} GFLOP in {st:.3f}s = {flops / st / 1e9:.1f} GFLOP/s; "
         f"its {fig['matmul_calls']} matmuls ({len(calls)} shapes, {mm_flops / 1e9:.1f} GFLOP) alone: {mt:.3f}s = "
         f"{mm_flops / mt / 1e9:.1f} GFLOP/s -> roofline fraction {frac:.2f} (median of {len(fracs)} "
         f"step/replay pairs; quartiles {_quartiles(fracs)}); one [{ntok}x{h}]@[{h}x{inter}] "
         f"matmul {peak / 1e9:.1f} GFLOP/s -> {fig['fraction_of_peak_matmul']:.2f} of it")
    return fig, frac


def run_bench(quick: bool = True, model_name: str = "embedded:smollm2-135m", device: str = "auto",
              dtype: str = "auto", memoe: MEMoEMethod | None = None,
              scale: Callable[[], dict] | None = None) -> dict[str, Any]:
    torch.manual_seed(0)
    out: dict[str, Any] = {"quick": quick, "machine": {
        "platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}}
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
    variants = {"cached": eager.model_copy(update=dict(layer_cache=True)),
                "uncached": eager.model_copy(update=dict(layer_cache=False))}
    first = None
    if can_compile(dev):  # the same cached step through torch.compile (MEMoEMethod.compile)
        variants["compiled"] = variants["cached"].model_copy(update=dict(compile=True))
        ed, _ = timed_edit(model, tok, variants["compiled"].model_copy(update=dict(steps=2, early_stop_loss=0.0)),
                           step_recs)
        first = ed.step_times[0]  # compiles the layers' forward and backward (or takes them from inductor's cache)
        ed.remove()
    # the variants in turns (3 each), so that drift of the host's speed falls on all of them
    ts = {k: [] for k in variants}
    for _ in range(3):
        for k, m in variants.items():
            ts[k].append(step_time(model, tok, m, step_recs, steps))
    med = {k: statistics.median(v) for k, v in ts.items()}
    t_c, t_u = med["cached"], med["uncached"]
    t_ft = step_time(model, tok, FTMethod(name="ft-m"), step_recs, steps)
    out["train_step"] = {"edits_per_step": n_main, "cached_s": t_c, "uncached_s": t_u, "ft_m_s": t_ft,
                         "turns": {f"{k}_s": v for k, v in ts.items()}}
    out["cached_step_ratio"] = t_c / t_u
    _say(f"training step on {n_main} edits: cached {t_c:.3f}s, uncached {t_u:.3f}s "
         f"(ratio {t_c / t_u:.2f}); FT-M {t_ft:.3f}s")
    if "compiled" in med:
        out["train_step"].update(compiled_s=med["compiled"], compiled_first_step_s=first)
        out["compiled_step_ratio"] = med["compiled"] / t_c
        _say(f"compiled: first step {first:.1f}s (compiling), then {med['compiled']:.3f}s a step against "
             f"{t_c:.3f}s eager (ratio {med['compiled'] / t_c:.2f}, same turns)")
    cached = variants["cached"]
    flops = step_flops(model, tok, cached, step_recs)
    train_dtype = resolve_precision(method.precision, dev) or torch.float32
    out["flops"], out["roofline_fraction"] = _roofline(model, tok, cached, step_recs, flops, train_dtype, dev, steps)
    if train_dtype != torch.float32:  # the same step in fp32, for comparison across machines
        fp32 = cached.model_copy(update=dict(precision="float32"))
        out["flops_fp32"], out["roofline_fraction_fp32"] = _roofline(model, tok, fp32, step_recs, flops,
                                                                     torch.float32, dev, steps)
        out["train_step"]["cached_fp32_s"] = out["flops_fp32"]["step_s"]
    if "compiled" in variants:
        out["flops_compiled"], out["roofline_fraction_compiled"] = _roofline(
            model, tok, variants["compiled"], step_recs, flops, train_dtype, dev, steps)

    # --- edit throughput
    thr = {}
    for n in ([10, 100] if quick else [10, 100, 1000]):
        with PeakRSS() as p:
            ed, st = timed_edit(model, tok, method, zs.head(n))
        rss[f"edit_{n}"] = p.peak
        thr[str(n)] = {"edits": n, "seconds": st["wall_s"], "edits_per_s": n / st["wall_s"],
                       "steps": st.get("steps")}
        _say(f"edit {n:5d} edits: {st['wall_s']:.1f}s ({n / st['wall_s']:.2f} edits/s, steps {st.get('steps')})")
        if n == 100:
            adapter_params = sum(v.numel() for v in ed.state_dict().values())
            adapter_bytes = sum(v.numel() * v.element_size() for v in ed.state_dict().values())
            base_params = sum(p.numel() for p in model.parameters())
            base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            out["adapter"] = {"params": adapter_params, "bytes": adapter_bytes, "base_params": base_params,
                              "base_bytes": base_bytes, "param_fraction": adapter_params / base_params}
            # --- evaluation throughput with the edited model
            recs = zs.head(n)
            with PeakRSS() as p:
                t0 = time.perf_counter()
                teacher_forced(model, tok, recs["prompt"].to_list(), recs["target_new"].to_list(), editor=ed, batch_size=32)
                tf_s = time.perf_counter() - t0
            rss["eval_teacher_forced"] = p.peak
            with PeakRSS() as p:
                t0 = time.perf_counter()
                generate(model, tok, recs["prompt"].to_list(), editor=ed, batch_size=32, max_new_tokens=8)
                g_s = time.perf_counter() - t0
            rss["eval_generation"] = p.peak
            out["eval_throughput"] = {"teacher_forced_prompts_per_s": n / tf_s,
                                      "generation_prompts_per_s": n / g_s, "max_new_tokens": 8}
            _say(f"eval: teacher-forced {n / tf_s:.1f} prompts/s, generation {n / g_s:.1f} prompts/s")
            base = locality_predictions(model, tok, recs)
            out["edit_100_metrics"] = summarize(evaluate(model, tok, recs, base, editor=ed, generation=False))
        ed.remove()
        del ed
        gc.collect()
        if n == n_main and "compiled" in variants:  # right after the eager edit: the same state of the host
            ed, st = timed_edit(model, tok, method.model_copy(update=dict(compile=True)), zs.head(n))
            ed.remove()
            thr[f"{n}_compiled"] = {"edits": n, "seconds": st["wall_s"], "edits_per_s": n / st["wall_s"],
                                    "steps": st.get("steps")}
            _say(f"edit {n} edits, compiled: {st['wall_s']:.1f}s (steps {st.get('steps')})")
    out["edit_throughput"] = thr
    out["peak_rss_mb"] = rss
    if scale is not None:
        with PeakRSS() as p:
            out["scale"] = scale()
        rss["scale_study"] = p.peak
    return out


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
               "scored": sample.height, "steps": (st or {}).get("steps"), "loss_final": (st or {}).get("loss_final"),
               "step_s_median": statistics.median(times) if times else None,
               "step_s_mean": statistics.fmean(times) if times else None,
               **{k: m.get(k) for k in ("reliability", "generality", "locality")}}
        if hasattr(ed, "adapter"):  # the gauge runs through the adapter: its size must not change
            row["adapter_params"] = sum(p.numel() for p in ed.adapter.parameters())
        if gauge_s:  # the mean: the round's time is a sum over its steps, at the host's speed of each
            row.update(gauge_s=statistics.fmean(gauge_s), gauge_times=list(gauge_s))
        per_round.append(row)
        _say(f"round {t + 1}/{rounds}: train {train_s:.1f}s eval {eval_s:.1f}s on {sample.height} "
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
