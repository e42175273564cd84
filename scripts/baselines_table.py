"""Real-model numbers for the editors on the same model, edits and protocol (until the compare flow lands).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/baselines_table.py --data zsre --n 100 \
        --methods ft-l ft-m lora grace memit --out runs/baselines_zsre.jsonl

Each method runs in its own subprocess (so the peak RSS is that method's), with the method section of
``configs/<method>.yaml`` (``--set key=value`` overrides apply to every method, e.g. ``--set steps=10``).
Protocol (``memoe.protocol.run_sequential``): batch (all N edits in one round) or ``--rounds T``
sequential rounds of N/T edits, scored after the last round on all of them. Prints one JSON line per
method and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def method_cfg(name: str, overrides: list[str]):
    import yaml

    from memoe.config import parse_value, validate_method

    p = ROOT / "configs" / f"{name}.yaml"
    raw = (yaml.safe_load(p.read_text()).get("method") if p.exists() else None) or {"name": name}
    for o in overrides:
        k, v = o.split("=", 1)
        raw[k] = parse_value(v)
    return validate_method(raw)


def run_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from memoe.catalogue import dataset
    from memoe.data import load_edits, sample_edits, split_rounds
    from memoe.editors import make_editor
    from memoe.metrics import locality_predictions, summarize
    from memoe.models import load_model
    from memoe.protocol import run_sequential

    model, tok = load_model(args.model, device=args.device)
    ds = dataset(args.data)
    df, _ = load_edits(ds.resolved(), ds.format)
    df = sample_edits(df, args.n)
    base = locality_predictions(model, tok, df)
    cfg = method_cfg(args.method, args.set) if args.method != "none" else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ed = make_editor(model, tok, cfg, seed=args.seed) if cfg is not None else None  # "none": the unedited model
    rss1 = [rss0]

    def after_edit(t: int) -> None:
        rss1[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    parts = split_rounds(df, args.rounds, args.n // args.rounds) if ed is not None else [df]
    done = list(
        run_sequential(
            model,
            tok,
            ed,
            parts,
            base,
            seed=args.seed,
            every_round=False,
            diagnostics=False,
            after_edit=after_edit,
            generation=not args.no_generation,
        )
    )
    edit_s = sum(r.train_s for r in done)
    s = summarize(done[-1].scores.table)
    stats = [{}] + [r.edit.as_dict() for r in done if r.edit is not None]
    out = {
        "method": args.method,
        "data": args.data,
        "n": args.n,
        "rounds": args.rounds,
        **s,
        "edit_s": edit_s,
        "edit_s_per_100": edit_s * 100 / args.n,
        "peak_rss_mb_before_edit": rss0,
        "peak_rss_mb_after_edit": rss1[0],
        "cfg": cfg.model_dump(mode="json") if cfg is not None else None,
        "stats_last": {k: v for k, v in stats[-1].items() if isinstance(v, (int, float))},
    }
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    from memoe.catalogue import datasets

    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["ft-l", "ft-m", "lora", "grace", "memit"])
    ap.add_argument("--method", help="run one method in this process ('none': the unedited model)")
    ap.add_argument("--data", choices=sorted(datasets()), default="zsre")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--model", default="embedded:smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-generation", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="method field override key=value")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.method:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    rows = []
    for m in args.methods:
        cmd = [sys.executable, __file__, "--method", m] + [
            a for a in sys.argv[1:] if a not in args.methods and a != "--methods"
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{m} failed:\n{p.stderr[-3000:]}", file=sys.stderr)
            continue
        r = json.loads(line[7:])
        rows.append(r)
        print(json.dumps(r), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(r) + "\n")
    cols = [
        "reliability",
        "generality",
        "locality",
        "generation_reliability",
        "efficacy",
        "paraphrase",
        "neighborhood",
        "avg",
    ]
    print("| method | " + " | ".join(cols) + " | edit s/100 | peak RSS MB |")
    print("|" + "---|" * (len(cols) + 3))
    for r in rows:
        vals = [f"{r[c]:.3f}" if c in r else "-" for c in cols]
        print(
            f"| {r['method']} | "
            + " | ".join(vals)
            + f" | {r['edit_s_per_100']:.1f} | {r['peak_rss_mb_after_edit']:.0f} |"
        )


if __name__ == "__main__":
    main()
