"""Load the edit records a config asks for (file, format, sampling, context check). The data files
memoe knows by name are the dataset catalogue's (``memoe.catalogue``)."""

from __future__ import annotations

import polars as pl

from memoe.config import Config, resolve_path
from memoe.data import LoadReport, load_edits, sample_edits
from memoe.probes import add_probes


def load_for_config(cfg: Config, tokenizer=None, context: int | None = None) -> tuple[pl.DataFrame, LoadReport]:
    count = None
    if tokenizer is not None:

        def count(text: str) -> int:
            return len(tokenizer(text).input_ids)

    limit = cfg.model.max_length or context
    df, report = load_edits(
        resolve_path(cfg.data.path),
        cfg.data.format,
        skip_bad=cfg.data.skip_bad,
        max_prompt_tokens=limit if count else None,
        count_tokens=count,
    )
    df = sample_edits(df, cfg.data.n_edits, cfg.data.seed, cfg.data.sample)
    if cfg.data.probes:
        df = add_probes(df, tokenizer)
    return df, report
