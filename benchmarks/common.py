"""What the benchmarks share: the catalogue datasets' records, a device sync, the progress line."""
from __future__ import annotations

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
