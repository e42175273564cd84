"""What the benchmarks share: the catalogue datasets' records, a device sync, the progress line, the
optimiser steps' times (``StepTimes``)."""

from __future__ import annotations

import time

import polars as pl
import torch

from memoe.catalogue import dataset
from memoe.data import load_edits


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def records(name: str, n: int, offset: int = 0) -> pl.DataFrame:
    ds = dataset(name)
    df, _ = load_edits(ds.resolved(), ds.format)
    return df.slice(offset, n)


def say(msg: str):
    print(f"[bench] {msg}", flush=True)


class StepTimes:
    """Seconds of each optimiser step of an edit, measured through the editor's ``on_step(step, loss)``
    callback (set ``editor.on_step`` to it; the editor calls it after each step): a step's time runs
    from the end of the previous call to this one, so that the work of ``then(step, loss)`` (called
    from it: a gauge, a replay) is left out. ``times``: steps 2.. of the current (or last) edit;
    ``first``: step 1 timed from ``start()`` (call it right before ``edit()``), so with the edit's
    preparation in it (None without ``start()``)."""

    def __init__(self, then=None):
        self.then = then
        self.times: list[float] = []
        self.first: float | None = None
        self._started: float | None = None
        self._last = 0.0

    def start(self) -> None:
        self._started = time.perf_counter()

    def __call__(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        if step == 1:  # a new edit
            self.times = []
            self.first = now - self._started if self._started is not None else None
            self._started = None
        else:
            self.times.append(now - self._last)
        if self.then is not None:
            self.then(step, loss)
        self._last = time.perf_counter()
