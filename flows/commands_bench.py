"""``memoe bench [--quick] [--out DIR] [--mlflow]``: benchmarks of speed, memory and scale.

Prints every figure and writes them to ``DIR/bench.json`` (default runs/bench/). ``--quick``
measures the ratios (cached step, roofline fraction) and a short sequential study in minutes;
the full run adds 1,000-edit batches, the 2,000-edit sequential study on CPU (10,000 on a GPU)
and the orchestration overhead of a 1,000-edit study through the pipeline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def add_arguments(p):
    p.add_argument("--quick", action="store_true", help="a few minutes: ratios and a short study")
    p.add_argument("--out", default="runs/bench", help="output folder for bench.json")
    p.add_argument("--mlflow", action="store_true", help="also log the figures to MLflow")
    p.add_argument("--model", default="embedded:smollm2-135m")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-scale", action="store_true", help="skip the sequential scale study")
    p.add_argument(
        "--only-scale",
        action="store_true",
        help="run the sequential scale study alone (a long study: 10,000 edits with --scale-rounds 100 on a GPU)",
    )
    p.add_argument("--scale-steps", type=int, default=40, help="optimiser steps per round of the scale study")
    p.add_argument("--compile", action="store_true", help="the scale study trains with compile: true")
    p.add_argument(
        "--scale-growth",
        choices=["shared", "round", "both"],
        default="both",
        help="the scale study's adapter (MEMoE growth): the shared one (the paper's protocol), the grown one, or both "
        "side by side (default)",
    )
    p.add_argument(
        "--scale-rounds",
        type=int,
        default=None,
        help="rounds of the scale study (default: 20 on CPU, 100 on a GPU, 4 with --quick)",
    )
    p.add_argument("--scale-batch", type=int, default=None, help="edits per round (default 100; 25 with --quick)")
    p.add_argument(
        "--scale-retention",
        type=int,
        default=200,
        help="earlier edits (a seeded sample) scored after each round of the scale study, beside the round's own",
    )
    p.add_argument(
        "--scale-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a MEMoE setting of the scale study (repeatable; e.g. rank=96, or early_stop_loss=0.05 to let rounds stop early)",
    )
    p.add_argument(
        "--scale-block-edits",
        type=int,
        default=None,
        help="growth 'round': at most this many edits per new block (MEMoE block_edits; default: one block a round)",
    )
    p.add_argument(
        "--gauge-every",
        type=int,
        default=2,
        help="time a fixed training pass after every N steps of the scale study, to divide the host's "
        "speed of the moment out of each round's time (0: off)",
    )
    p.add_argument(
        "--scale-score-all",
        action="store_true",
        help="score every edit of the scale study after its last round (not only the round's own and the sample)",
    )
    p.add_argument(
        "--only-eval-study",
        action="store_true",
        help="time a sequential study's evaluation alone, plain against with its states and results kept "
        "(benchmarks.speed.eval_study)",
    )
    p.add_argument(
        "--eval-study-config",
        default="configs/lifelong_zsre.yaml",
        help="the config whose method and data the evaluation study edits with",
    )
    p.add_argument("--eval-study-rounds", type=int, default=4, help="rounds of the evaluation study")
    p.add_argument("--eval-study-batch", type=int, default=50, help="edits per round of the evaluation study")
    p.add_argument("--skip-overhead", action="store_true", help="skip the orchestration-overhead study")


def eval_study_of(args) -> dict:
    """``--only-eval-study``: the method and data of ``--eval-study-config`` (its data file, or the first
    dataset of its mix), ``--eval-study-rounds`` x ``--eval-study-batch`` edits."""
    from benchmarks.speed import eval_study
    from memoe.config import load_config
    from memoe.data import load_edits
    from memoe.memory import PeakRSS
    from memoe.models import load_model

    cfg = load_config(args.eval_study_config)
    path, fmt, _ = cfg.data.files[0]
    recs, _ = load_edits(path, fmt)
    model, tok = load_model(args.model, args.device)
    with PeakRSS() as p:
        res = eval_study(model, tok, cfg.method, args.eval_study_rounds, args.eval_study_batch, recs, seed=cfg.seed)
    res.update(config=args.eval_study_config, data=str(path), peak_rss_mb=p.peak)
    return res


def parse_value_pair(kv: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``--scale-set``, the value read as in a config's ``--set``."""
    from memoe.config import parse_value

    if "=" not in kv:
        raise SystemExit(f"memoe bench: --scale-set {kv!r} is not KEY=VALUE")
    k, v = kv.split("=", 1)
    return k, parse_value(v)


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def orchestration_overhead(n_edits: int, rounds: int, out: Path, model_load_s: float) -> dict:
    """Run a sequential study through ``memoe run`` (Prefect flow, MLflow tracking) in a fresh
    process. Library work = training + evaluation + the unedited model's locality predictions (as
    timed inside the tasks) + one model load (timed in this process); the rest of the command's
    wall time (process start, imports, Prefect server and task machinery, MLflow, hashing for
    cache keys, file I/O) is counted as orchestration and tracking."""
    import resource
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "flows.cli",
        "run",
        "--out",
        str(out),
        "--runs-dir",
        str(out / "runs"),
        "--set",
        f"data.n_edits={n_edits}",
        "--set",
        "protocol.mode=sequential",
        "--set",
        f"protocol.rounds={rounds}",
        "--set",
        f"protocol.batch_size={n_edits // rounds}",
        "--set",
        "eval.generation=false",
        "--set",
        "eval.retention_sample=200",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    t = json.loads((out / "results.json").read_text())["timings"]
    library = sum(t.get(k, 0.0) for k in ("train_compute", "evaluate_compute", "locality_base_compute")) + model_load_s
    return {
        "n_edits": n_edits,
        "rounds": rounds,
        "wall_s": wall,
        "timings": t,
        "library_s": library,
        "orchestration_s": wall - library,
        "orchestration_share": (wall - library) / wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }  # the study's process


def run(args) -> int:
    import torch

    from benchmarks.scale import sequential_scale
    from benchmarks.speed import run_bench
    from memoe.editors.memoe import MEMoEMethod
    from memoe.models import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available() and args.device != "cpu"

    def scale():
        model, tok = load_model(args.model, args.device)
        rounds = args.scale_rounds or (4 if args.quick else (100 if gpu else 20))
        batch = args.scale_batch or (25 if args.quick else 100)
        growths = ["shared", "round"] if args.scale_growth == "both" else [args.scale_growth]
        extra = dict(parse_value_pair(kv) for kv in args.scale_set)
        out = {}
        for growth in growths:
            # a fixed number of steps per round (no early stop): the round's cost, not its convergence
            method = MEMoEMethod(
                **{
                    "steps": args.scale_steps,
                    "early_stop_loss": 0.0,
                    "compile": args.compile,
                    "growth": growth,
                    "block_edits": args.scale_block_edits if growth == "round" else None,
                    **extra,
                }
            )
            out[growth] = sequential_scale(
                model,
                tok,
                method,
                rounds,
                batch,
                retention_sample=args.scale_retention,
                gauge_every=args.gauge_every,
                score_all=args.scale_score_all,
            )
        return out

    if args.only_scale and args.skip_scale:
        raise SystemExit("memoe bench: --only-scale and --skip-scale exclude each other")
    if args.only_scale and args.only_eval_study:
        raise SystemExit("memoe bench: --only-scale and --only-eval-study exclude each other")
    t0 = time.perf_counter()
    if args.only_eval_study:
        res = {"eval_study": eval_study_of(args)}
    elif args.only_scale:
        from memoe.memory import PeakRSS

        with PeakRSS() as p:
            res = {"scale": scale()}
        res["peak_rss_mb"] = {"scale_study": p.peak}
    else:
        res = run_bench(
            quick=args.quick, model_name=args.model, device=args.device, scale=None if args.skip_scale else scale
        )
    if not args.skip_overhead and not args.only_scale and not args.only_eval_study:
        from memoe.models import load_model as _load

        t1 = time.perf_counter()
        _load(args.model, args.device)
        load_s = time.perf_counter() - t1
        n, r = (100, 4) if args.quick else (1000, 10)
        res["orchestration"] = orchestration_overhead(n, r, out / "overhead_study", load_s)
        print(
            f"[bench] orchestration + tracking: {res['orchestration']['orchestration_share']:.1%} of a "
            f"{n}-edit study ({res['orchestration']['wall_s']:.0f}s)"
        )
    res["bench_wall_s"] = time.perf_counter() - t0
    path = out / "bench.json"
    path.write_text(json.dumps(res, indent=2))
    if "cached_step_ratio" in res:
        print(f"\ncached_step_ratio   {res['cached_step_ratio']:.3f}")
        print(f"roofline_fraction   {res['roofline_fraction']:.3f}")
        if "roofline_fraction_compiled" in res:
            print(
                f"  compiled          {res['roofline_fraction_compiled']:.3f} (step {res['train_step']['compiled_s']:.3f} s "
                f"against {res['train_step']['cached_s']:.3f} s eager: compiled_step_ratio {res['compiled_step_ratio']:.2f})"
            )
        for n, v in res["edit_throughput"].items():
            print(f"edit {n:>5} edits     {v['seconds']:.1f} s ({v['edits_per_s']:.2f} edits/s)")
        if "eval_reuse" in res:
            ev = res["eval_reuse"]
            print(
                f"evaluation {ev['edits']} edits   plain {ev['plain_s']:.1f} s, states reused {ev['reused_s']:.1f} s "
                f"({ev['speedup_reused']:.2f}x; first time {ev['speedup_first']:.2f}x), same scores {ev['same_scores']}"
            )
    if "eval_study" in res:
        ev = res["eval_study"]
        print(
            f"evaluation study    {ev['rounds']} x {ev['batch']} edits, every edit scored after each round: plain "
            f"{ev['plain_s']:.1f} s ({ev['plain_sequences_per_s']:.1f} sequences/s), kept {ev['kept_s']:.1f} s "
            f"({ev['kept_sequences_per_s']:.1f} sequences/s): {ev['speedup']:.2f}x, same scores {ev['same_scores']}"
        )
    if "peak_rss_mb" in res:
        print("peak RSS (MiB)      " + ", ".join(f"{k} {v:.0f}" for k, v in res["peak_rss_mb"].items()))
    for growth, sc in res.get("scale", {}).items():
        last = sc["per_round"][-1]
        print(
            f"scale ({growth}) {sc['rounds']} x {sc['batch']} edits: training per round median {sc['train_s_median']:.1f} s, "
            f"largest deviation {sc['train_s_max_dev']:.1%}, trend {sc['train_s_slope_per_round']:+.1%} of it per round "
            f"(rounds 2-{sc['rounds']}); CPU time: largest deviation {sc['train_cpu_s_max_dev']:.1%}, trend "
            f"{sc['train_cpu_s_slope_per_round']:+.1%}; over the round's own evaluation time: largest deviation "
            f"{sc.get('train_per_eval_max_dev', float('nan')):.1%}, "
            f"trend {sc.get('train_per_eval_slope_per_round', float('nan')):+.1%}; "
            + (
                f"at the host's typical speed (gauge): largest deviation {sc['train_s_host_adjusted_max_dev']:.1%}, "
                f"trend {sc['train_s_host_adjusted_slope_per_round']:+.1%}; "
                if "train_s_host_adjusted_max_dev" in sc
                else ""
            )
            + (
                f"with the round's recurring-subject edits held fixed: trend "
                f"{sc['train_s_slope_given_recurring']:+.1%} per round, {sc['train_s_per_recurring_edit']:+.1%} "
                f"per recurring edit (steps {sc['steps_slope_given_recurring']:+.1%}, "
                f"{sc['steps_per_recurring_edit']:+.1%}); "
                if "train_s_slope_given_recurring" in sc
                else ""
            )
            + f"after {last['edits_so_far']} "
            f"edits Rel {last['reliability']:.2f} Gen {last['generality']:.2f} Loc {last['locality']:.2f}"
            + (
                f"; adapter {last['adapter_bytes'] / 1e6 * 1000 / last['edits_so_far']:.1f} MB per 1,000 edits"
                if "adapter_bytes" in last
                else ""
            )
        )
    plots = []
    if res.get("scale"):
        from flows.report import retention_plot

        curves = {f"MEMoE growth {g}": sc["per_round"] for g, sc in res["scale"].items()}
        for metric in ("reliability", "generality", "locality"):
            plots.append(
                retention_plot(
                    curves,
                    out / f"scale_retention_{metric}.png",
                    f"scale study, {metric}: the round's edits and a sample of earlier ones (teacher-forced)",
                    metric,
                )
            )
        print("retention plots     " + ", ".join(str(p) for p in plots))
    if args.mlflow:
        import mlflow

        from memoe.config import load_config

        uri = load_config(None).tracking.mlflow_uri or f"sqlite:///{Path('runs').resolve()}/mlflow.db"
        Path("runs").mkdir(exist_ok=True)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("memoe-bench")
        with mlflow.start_run(run_name=f"bench-{'quick' if args.quick else 'full'}"):
            mlflow.log_metrics(_flat(res))
            mlflow.log_artifact(str(path))
            for plot in plots:
                mlflow.log_artifact(str(plot))
    print(f"wrote {path}")
    return 0
