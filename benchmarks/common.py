"""What the benchmarks share: the shared data files' records, a device sync, the progress line."""
from __future__ import annotations

import polars as pl
import torch

from memoe.config import resolve_path
from memoe.data import load_edits
from memoe.datasets import SHARED_DATASETS


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def records(name: str, n: int, offset: int = 0) -> pl.DataFrame:
    path, fmt = SHARED_DATASETS[name]
    df, _ = load_edits(resolve_path(path), fmt)
    return df.slice(offset, n)


def say(msg: str):
    print(f"[bench] {msg}", flush=True)
