"""The fact gate's decisions alone, with no training: on held-out records, how often the gate opens where it
should (the edit prompt, rephrases, restyled rephrases, chat-template rephrases) and stays shut where it should
(the subject with other relations, the specificity probes), for several margins at once. The gate's keys come
from the frozen model's states, so a scan takes minutes where a training run takes tens of minutes; train the
settings it picks with ``scripts/tune_memoe.py``.

    .venv/bin/python scripts/gate_scan.py --data counterfact --start 600 --n 100 --margins=-0.1,-0.05,0
    .venv/bin/python scripts/gate_scan.py --data zsre --start 600 --n 100 --set fact_gate_sentence=false -v

One JSON line per margin: the open rate of each column that should open, 1 - the open rate of the
specificity probes, and their mean. ``-v`` lists every wrong decision.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SHOULD_OPEN = ["prompt", "rephrase_prompts", "restyled_prompts", "chat_prompts"]
SHOULD_SHUT = ["specificity_prompts"]


def main(argv=None) -> int:
    from memoe.catalogue import datasets

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="counterfact", choices=sorted(datasets()))
    ap.add_argument("--start", type=int, default=600)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--margins", default="-0.05", help="comma-separated fact_gate_margin values")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a MEMoEMethod field")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from memoe.catalogue import dataset
    from memoe.config import parse_value
    from memoe.data import load_edits
    from memoe.editors.memoe import MEMoEMethod
    from memoe.editors.memoe.editor import MEMoEEditor
    from memoe.models import load_model
    from memoe.probes import add_probes

    raw = {"fact_gate": True, "augment": ["chat", "lower"]}
    for kv in args.set:
        k, v = kv.split("=", 1)
        raw[k] = parse_value(v)
    cfg = MEMoEMethod.model_validate(raw)
    ds = dataset(args.data)
    df = load_edits(ds.resolved(), ds.format)
    df = df[0] if isinstance(df, tuple) else df
    if args.start + args.n > df.height:
        raise SystemExit(f"--start {args.start} --n {args.n}: {ds.resolved()} holds {df.height} records")
    model, tok = load_model("embedded:smollm2-135m", device="cpu")
    recs = add_probes(df.slice(args.start, args.n), tok)
    ed = MEMoEEditor(model, tok, cfg)
    ed.extractor.add(recs["subject"].to_list())
    by_subject: dict[str, list[str]] = {}
    for r in recs.iter_rows(named=True):  # the keys edit() would build: every edit prompt of each subject
        by_subject.setdefault(ed.extractor.canonical(r["subject"]), []).append(r["prompt"])
    ed.gate.update(by_subject, salt="0")
    texts: dict[str, tuple[list[str], list[str]]] = {}
    for col in SHOULD_OPEN + SHOULD_SHUT:
        if col not in recs.columns:
            continue
        t, s = [], []
        for r in recs.iter_rows(named=True):
            v = r[col]
            for x in [v] if isinstance(v, str) else v or []:
                t.append(x)
                s.append(ed.extractor.canonical(r["subject"]))
        texts[col] = (t, s)
    for margin in [float(m) for m in args.margins.split(",")]:
        ed.gate.margin = margin
        out: dict = {"data": args.data, "start": args.start, "n": args.n, "margin": margin, "set": args.set}
        for col, (t, s) in texts.items():
            opens = [o is not None for o in ed.gate.open_from(t, s)]
            right = [o if col in SHOULD_OPEN else not o for o in opens]
            out[col] = round(sum(right) / max(len(right), 1), 3)
            if args.verbose:
                for x, subj, ok, o in zip(t, s, right, opens):
                    if not ok:
                        print(
                            f"  {col} {'opened' if o else 'shut'}: {x!r} | edits: {by_subject[subj]}", file=sys.stderr
                        )
        scored = [out[c] for c in texts if c != "prompt"]
        out["mean"] = round(sum(scored) / max(len(scored), 1), 3)
        print(json.dumps(out), flush=True)
    ed.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
