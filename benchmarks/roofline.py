"""The training step's FLOPs and its roofline: the step's achieved FLOP/s against the same step's
matrix multiplies replayed alone (same shapes, strides, dtype, count) and against one large matmul."""

from __future__ import annotations

import collections
import statistics
import time
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import StepTimes, say, sync
from memoe.editors import make_editor


def step_flops(model, tok, method, recs) -> float:
    """FLOPs of one training step (forward + backward), counted by torch's FlopCounterMode."""
    m1 = method.model_copy(update=dict(steps=2, early_stop_loss=0.0))
    with FlopCounterMode(display=False) as fc1:
        e = make_editor(model, tok, m1)
        e.edit(recs)
        e.remove()
    m0 = method.model_copy(update=dict(steps=1, early_stop_loss=0.0))
    with FlopCounterMode(display=False) as fc0:
        e = make_editor(model, tok, m0)
        e.edit(recs)
        e.remove()
    return float(fc1.get_total_flops() - fc0.get_total_flops())


class MatmulShapes(TorchDispatchMode):
    """Records every matrix multiply a block of code runs (op, operand shapes / strides, dtype),
    after autocast, so the same multiplies can be replayed alone (``matmul_replay``)."""

    OPS = {
        torch.ops.aten.mm.default: (0, 1),
        torch.ops.aten.bmm.default: (0, 1),
        torch.ops.aten.addmm.default: (1, 2),
        torch.ops.aten.baddbmm.default: (1, 2),
    }

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.OPS:
            i, j = self.OPS[func]
            a, b = args[i], args[j]
            self.calls[(tuple(a.shape), tuple(a.stride()), tuple(b.shape), tuple(b.stride()), a.dtype)] += 1
        return func(*args, **(kwargs or {}))


def mm_flops(key) -> int:
    a, _, b, _, _ = key
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def _operand(shape, stride, dtype, device) -> torch.Tensor:
    return torch.empty_strided(shape, stride, dtype=dtype, device=device).normal_()


def matmul_replay(calls: collections.Counter, device) -> tuple[float, Callable[[], float]]:
    """(FLOPs, run): ``run()`` times one pass of the recorded multiplies run alone as plain matmuls
    on operands of the same shapes, strides and dtype (allocated once, here)."""
    ops = []
    for key, n in calls.items():
        a_shape, a_stride, b_shape, b_stride, dtype = key
        ops.append((_operand(a_shape, a_stride, dtype, device), _operand(b_shape, b_stride, dtype, device), n))
    flops = sum(mm_flops(k) * n for k, n in calls.items())

    def run() -> float:
        sync(device)
        t0 = time.perf_counter()
        for a, b, n in ops:
            for _ in range(n):
                torch.matmul(a, b)
        sync(device)
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
            e = make_editor(model, tok, m)
            e.edit(recs)
            e.remove()
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
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = max(best, 10 * 2 * m * k * n / (time.perf_counter() - t0))
    return best


def _quartiles(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return f"{q[0]:.2f}-{q[2]:.2f}"


def roofline(model, tok, method, recs, flops: float, dtype, device, steps: int, rounds: int = 3) -> tuple[dict, float]:
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
    clock = StepTimes()  # the replay's time is left out of the next step's

    def pair(step: int, loss: float) -> None:
        if step > 1:
            step_s.append(clock.times[-1])
            mm_s.append(replay())

    clock.then = pair
    for _ in range(rounds):
        ed = make_editor(model, tok, method.model_copy(update=dict(steps=steps, early_stop_loss=0.0)))
        ed.on_step = clock
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
    fig = {
        "precision": prec,
        "step_flops": flops,
        "step_s": st,
        "step_flop_s": flops / st,
        "matmul_calls": sum(calls.values()),
        "matmul_shapes": len(calls),
        "matmul_flops": mm_flops,
        "matmul_s": mt,
        "matmul_flop_s": mm_flops / mt,
        "pairs": {"step_s": step_s, "matmul_s": mm_s, "fraction": fracs},
        "peak_matmul_shape": [ntok, h, inter],
        "peak_matmul_flop_s": peak,
        "fraction_of_peak_matmul": flops / st / peak,
    }
    say(
        f"training step ({prec}): {flops / 1e9:.1f} GFLOP in {st:.3f}s = {flops / st / 1e9:.1f} GFLOP/s; "
        f"its {fig['matmul_calls']} matmuls ({len(calls)} shapes, {mm_flops / 1e9:.1f} GFLOP) alone: {mt:.3f}s = "
        f"{mm_flops / mt / 1e9:.1f} GFLOP/s -> roofline fraction {frac:.2f} (median of {len(fracs)} "
        f"step/replay pairs; quartiles {_quartiles(fracs)}); one [{ntok}x{h}]@[{h}x{inter}] "
        f"matmul {peak / 1e9:.1f} GFLOP/s -> {fig['fraction_of_peak_matmul']:.2f} of it"
    )
    return fig, frac
