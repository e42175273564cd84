"""``memoe report``: records per dataset, and the unedited model's greedy answers to five edit prompts."""

from __future__ import annotations


def add_arguments(p):
    from memoe.commands import add_config_arguments

    add_config_arguments(p)


def run(args) -> int:
    from memoe.catalogue import datasets
    from memoe.config import load_config
    from memoe.data import load_edits
    from memoe.datasets import load_for_config
    from memoe.metrics import generate
    from memoe.models import context_length, load_model

    cfg = load_config(args.config, args.set)
    print("Datasets")
    for ds in datasets().values():
        p = ds.resolved()
        if p.exists():
            df, rep = load_edits(p, ds.format, skip_bad=True)
            print(f"  {ds.name:16s} {df.height:6d} records  ({ds.format}, {rep.n_skipped} skipped)  {p}")
    model, tok = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    df, rep = load_for_config(cfg, tok, context_length(model, tok))
    print(f"\nconfigured data: {df.height} edits sampled from {rep.n_kept} valid records of {cfg.data.path}")
    few = df.head(5)
    answers = generate(model, tok, few["prompt"].to_list(), max_new_tokens=12)
    print(f"\nUnedited {cfg.model.name}: greedy answers")
    for row, ans in zip(few.iter_rows(named=True), answers):
        print(f"  {row['prompt']}\n      model: {ans!r}   true: {row['target_true']!r}   new: {row['target_new']!r}")
    return 0
