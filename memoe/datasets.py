"""Load the edit records a config asks for (file, format, sampling, context check). The data files
memoe knows by name are the dataset catalogue's (``memoe.catalogue``)."""

from __future__ import annotations

import polars as pl

from memoe.config import Config
from memoe.data import LoadReport, load_edits, sample_edits
from memoe.probes import add_probes


def load_for_config(
    cfg: Config, tokenizer=None, context: int | None = None, *, count_tokens=None, probes: bool | None = None
) -> tuple[pl.DataFrame, LoadReport]:
    """The config's edits: its file (or ``data.mix``'s files), checked against the context length
    (``count_tokens``: a prompt's token count; default: the tokenizer's), sampled, with the probes
    (``probes``: default ``data.probes``)."""
    count = count_tokens
    if count is None and tokenizer is not None:

        def count(text: str) -> int:
            return len(tokenizer(text).input_ids)

    limit = cfg.model.max_length or context
    frames, reports = [], []
    for path, fmt, prefix in cfg.data.files:
        df, rep = load_edits(
            path, fmt, skip_bad=cfg.data.skip_bad, max_prompt_tokens=limit if count else None, count_tokens=count
        )
        frames.append(df.with_columns((pl.lit(prefix + ":") + pl.col("id")).alias("id")) if prefix else df)
        reports.append(rep)
    if len(frames) == 1:
        df, report = frames[0], reports[0]
    else:  # a mix: the datasets' records shuffled together, so every round draws the same mix of them
        df = pl.concat(frames).sample(fraction=1.0, shuffle=True, seed=cfg.data.seed)
        report = LoadReport(
            path=" + ".join(r.path for r in reports),
            format="+".join(r.format for r in reports),
            n_read=sum(r.n_read for r in reports),
            n_kept=sum(r.n_kept for r in reports),
            skipped=[s for r in reports for s in r.skipped],
        )
    df = sample_edits(df, cfg.data.n_edits, cfg.data.seed, cfg.data.sample)
    if cfg.data.probes if probes is None else probes:
        df = add_probes(df, tokenizer)
    return df, report
