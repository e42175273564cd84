"""The ``memoe`` command."""
from __future__ import annotations

import argparse
import os
import sys

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "MLFLOW_ENABLE_TELEMETRY": "false", "TOKENIZERS_PARALLELISM": "false",
               "TRANSFORMERS_VERBOSITY": "error"}.items():
    os.environ.setdefault(_k, _v)


def _config(args):
    from memoe.config import load_config

    return load_config(args.config, args.set or [])


def cmd_report(args) -> int:
    """Records per dataset, and the unedited model's greedy answers to five edit prompts."""
    from memoe.config import resolve_path
    from memoe.data import load_edits
    from memoe.datasets import SHARED_DATASETS, load_for_config
    from memoe.metrics import generate
    from memoe.models import context_length, load_model

    cfg = _config(args)
    print("Datasets")
    for name, (path, fmt) in SHARED_DATASETS.items():
        p = resolve_path(path)
        if p.exists():
            df, rep = load_edits(p, fmt, skip_bad=True)
            print(f"  {name:16s} {df.height:6d} records  ({fmt}, {rep.n_skipped} skipped)  {p}")
    model, tok = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
    df, rep = load_for_config(cfg, tok, context_length(model, tok))
    print(f"\nconfigured data: {df.height} edits sampled from {rep.n_kept} valid records of {cfg.data.path}")
    few = df.head(5)
    answers = generate(model, tok, few["prompt"].to_list(), max_new_tokens=12)
    print(f"\nUnedited {cfg.model.name}: greedy answers")
    for row, ans in zip(few.iter_rows(named=True), answers):
        print(f"  {row['prompt']}\n      model: {ans!r}   true: {row['target_true']!r}   new: {row['target_new']!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("config", nargs="?", default=None, help="YAML config (default: embedded defaults)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
        return p

    common(sub.add_parser("report", help="data report and the unedited model's answers"))
    common(sub.add_parser("run", help="run the main job"))
    args = parser.parse_args(argv)
    from memoe.config import ConfigError
    from memoe.data import EditDataError

    try:
        if args.command in ("report", "run"):
            return cmd_report(args)
    except (ConfigError, EditDataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
