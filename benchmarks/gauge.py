"""The host-speed gauge of the scale study (``benchmarks/scale.py``, ``gauge_every``): a fixed piece
of training work, timed between a round's steps, tells how fast the host runs at that moment, so
that a round's time can be divided by it."""

from __future__ import annotations

import time
from typing import Callable

import polars as pl
import torch

from benchmarks.common import sync


def host_gauge(editor, records: pl.DataFrame) -> Callable[[], float]:
    """Each call of the returned function runs one forward and backward pass over ``records`` as a
    training step of the MEMoE ``editor`` runs them (``MEMoEEditor.gradient_pass``) and returns its
    seconds. Call it from ``on_step`` only (inside a round; the rows are prepared on the first call).
    It leaves the adapter's gradients, noise generators and load statistics as it found them, so the
    training it interrupts goes on unchanged."""
    work = editor.gradient_pass(records)
    adapter = editor.adapter

    def run() -> float:
        params = [p for p in adapter.parameters() if p.requires_grad]
        grads = [p.grad for p in params]
        gens = [
            (m.generator, m.generator.get_state())
            for m in adapter.modules()
            if isinstance(getattr(m, "generator", None), torch.Generator)
        ]
        stats = dict(adapter.load_stats)
        for p in params:
            p.grad = None
        sync(editor.device)
        t0 = time.perf_counter()
        work()
        sync(editor.device)
        seconds = time.perf_counter() - t0
        for p, g in zip(params, grads):
            p.grad = g
        for g, state in gens:
            g.set_state(state)
        adapter.load_stats = stats
        return seconds

    return run
