"""Tune / measure MEMoE on the embedded model (CPU-friendly): one JSON line per run.

    .venv/bin/python scripts/tune_memoe.py --data zsre --start 500 --n 50 --set steps=40 --set lr=5e-3
    .venv/bin/python scripts/tune_memoe.py --data zsre --start 0 --n 100 --rounds 10   # sequential
    .venv/bin/python scripts/tune_memoe.py --data zsre --start 600 --n 100 --set scope_negatives=4 --set 'augment=[chat]'

``--set`` keys are MEMoEMethod fields. Tune on a slice you will not report (e.g. --start 500);
report on --start 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv=None) -> int:
    from memoe.catalogue import dataset, datasets

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="zsre", choices=sorted(datasets()))
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=1, help=">1: sequential, n/rounds edits per round")
    ap.add_argument("--config", default=None, help="YAML whose method section is the starting point")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-generation", action="store_true")
    ap.add_argument("--diagnostics", action="store_true")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    import torch
    import yaml

    torch.set_num_threads(args.threads)
    from memoe.config import parse_value
    from memoe.data import load_edits
    from memoe.editors.memoe import MEMoEMethod
    from memoe.editors.memoe.editor import MEMoEEditor
    from memoe.metrics import locality_predictions, summarize
    from memoe.models import load_model
    from memoe.probes import add_probes
    from memoe.protocol import run_sequential

    raw = {}
    if args.config:
        raw = dict((yaml.safe_load(open(args.config)) or {}).get("method", {}))
    for kv in args.set:
        k, v = kv.split("=", 1)
        raw[k] = parse_value(v)
    raw.setdefault("name", "memoe")
    cfg = MEMoEMethod.model_validate(raw)
    ds = dataset(args.data)
    df = load_edits(ds.resolved(), ds.format)
    df = df[0] if isinstance(df, tuple) else df
    model, tok = load_model("embedded:smollm2-135m", device="cpu")
    recs = add_probes(df.slice(args.start, args.n), tok)  # subject specificity, restyled, chat-template
    base = locality_predictions(model, tok, recs)
    ed = MEMoEEditor(model, tok, cfg, seed=args.seed)
    per = args.n // args.rounds
    done = list(
        run_sequential(
            model,
            tok,
            ed,
            [recs.slice(r * per, per) for r in range(args.rounds)],
            base,
            seed=args.seed,
            every_round=False,
            diagnostics=False,
            generation=not args.no_generation,
        )
    )  # scored after the last round, on all edits
    stats = [r.edit for r in done]
    t_edit = sum(r.train_s for r in done)
    c_edit = sum(r.train_cpu_s for r in done)  # CPU seconds: comparable when the machine is shared
    table, t_eval = done[-1].scores.table, done[-1].eval_s
    out = {
        "tag": args.tag,
        "data": args.data,
        "start": args.start,
        "n": args.n,
        "rounds": args.rounds,
        "set": args.set,
        "config": args.config,
        "edit_s": round(t_edit, 1),
        "edit_cpu_s": round(c_edit, 1),
        "eval_s": round(t_eval, 1),
        "steps": [s.steps for s in stats],
        "loss_final": [round(s.loss_final, 4) for s in stats],
        "curve": stats[-1].details["loss_curve"],
    }
    out.update({k: round(v, 4) for k, v in summarize(table).items()})
    if args.diagnostics:
        out["diag"] = {k: round(v, 3) for k, v in ed.diagnostics(recs.head(32)).items()}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
