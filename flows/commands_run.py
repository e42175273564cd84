"""``memoe run [CONFIG] [--set key=value ...] [--out DIR]``: validate everything, run the study
flow (batch, sequential, or compare when ``methods`` is set), print a summary, write results.json.

Without CONFIG the embedded default is ``configs/quickstart.yaml`` (a small sequential MEMoE study
on ZsRE with the embedded model). A bad config, data file, method or model is reported as
``error: ...`` (exit 2) before Prefect, MLflow or the model are started.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = PROJECT_ROOT / "configs" / "quickstart.yaml"


def add_arguments(p):
    from memoe.commands import add_config_arguments

    add_config_arguments(p)
    p.add_argument("--out", default=None, help="output folder (default: runs/<config hash>/)")
    p.add_argument(
        "--runs-dir",
        default=None,
        help="folder of the task cache, editor states and the MLflow database (default: $MEMOE_RUNS or runs/)",
    )
    p.add_argument(
        "--dask",
        default=None,
        metavar="N|cuda|tcp://HOST:PORT",
        help="compare: run the methods side by side on Dask (N local worker processes, one per GPU with "
        "'cuda', or a running scheduler)",
    )
    p.add_argument("--name", default=None, help="MLflow run name (default: methods-protocol-RxB-data-model)")
    p.add_argument(
        "--tag", action="append", default=[], metavar="KEY=VALUE", help="an MLflow tag on the study's run (repeatable)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything and show what would run (flow, rounds, edits, methods, earlier runs), run nothing",
    )


def parse_tags(items: list[str]) -> dict[str, str]:
    from memoe.config import ConfigError

    out = {}
    for t in items:
        k, sep, v = t.partition("=")
        if not sep or not k.strip():
            raise ConfigError(f"--tag '{t}' is not of the form key=value")
        out[k.strip()] = v
    return out


def dry_run(cfg, info: dict, args) -> int:
    """What ``memoe run`` would do, without Prefect, the model or any writes. The one cheap look at
    the cache: a finished study of the same config in the MLflow store (its rerun would be all cache
    hits unless the code changed)."""
    from flows.study import default_run_name, default_runs_dir, flow_for, method_labels
    from memoe.config import config_hash

    runs = Path(args.runs_dir).resolve() if args.runs_dir else default_runs_dir()
    chash = config_hash(cfg)
    print(
        f"dry run (nothing is run): flow {flow_for(cfg).name}, {info['rounds']} round(s) x {cfg.edits_per_round()} edits "
        f"= {info['rounds'] * cfg.edits_per_round()} of {info['n_available']} available"
    )
    print(f"  methods:  {', '.join(method_labels(cfg))}")
    data = ", ".join(f"{f} ({fmt})" for f, fmt, _ in cfg.data.files)
    print(f"  model:    {cfg.model.name}   data: {data}")
    print(
        f"  config:   {chash}   run name: {args.name or default_run_name(cfg)}"
        + (f"   tags: {parse_tags(args.tag)}" if args.tag else "")
    )
    print(f"  output:   {Path(args.out).resolve() if args.out else runs / chash}   store: {runs / 'store'}")
    db = runs / "mlflow.db"
    if cfg.tracking.enabled and not cfg.tracking.mlflow_uri and db.is_file():
        from flows.history import client_for, finished_studies

        done = finished_studies(client_for(None, str(runs)), cfg.tracking.experiment, chash)
        if done:
            r = done[0]
            print(
                f"  cache:    a finished study of this config exists (run {r.info.run_id}, "
                f"{r.info.run_name}): a rerun is all cache hits unless the code changed"
            )
        else:
            print("  cache:    no finished study of this config in the store")
    return 0


def preflight(cfg, out: str | None = None) -> dict:
    """Everything that can be checked without loading the model's weights or starting Prefect: the
    methods, the model's name, device and layers (from its config file), the output folder, and every
    data record, with the prompts' lengths against the model's context (its tokenizer)."""
    from memoe.checks import LONG_PROMPT_TOKENS, check_device, check_layers, context_of, layer_count, model_folder
    from memoe.config import METHODS, ConfigError
    from memoe.datasets import load_for_config

    for m in cfg.methods or [cfg.method]:
        if m.name not in METHODS:
            raise ConfigError(f"method.name: no editor '{m.name}' is registered (available: {sorted(METHODS)})")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out: {out} exists and is not a folder")
    check_device(cfg.model.device)
    name = cfg.model.name
    if not name.startswith("embedded:"):
        p = Path(name).expanduser()
        looks_local = name.startswith((".", "/", "~")) or p.exists()
        if looks_local and not (p / "config.json").is_file():
            raise ConfigError(f"model.name: {name} is not a model folder (no config.json)")
    folder = model_folder(name)
    if folder is None:
        raise ConfigError(
            f"model.name: '{name}' is neither a local folder nor in the Hugging Face cache "
            "(the hub is offline: HF_HUB_OFFLINE=1)"
        )
    for path, _, name in cfg.data.files:
        if not path.is_file():
            raise ConfigError(f"{'data.mix: ' + name if name else 'data.path'}: file not found: {path}")
    from transformers import AutoConfig, AutoTokenizer

    model_cfg, tok = AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    n_layers = layer_count(model_cfg)
    if n_layers:
        for i, m in enumerate(cfg.methods or [cfg.method]):
            check_layers(m, n_layers, f"methods[{i}]" if cfg.methods else "method")
    long: list[int] = []

    def count(text: str) -> int:
        n = len(tok(text).input_ids)
        if n > LONG_PROMPT_TOKENS:
            long.append(n)
        return n

    df, report = load_for_config(cfg, tok, context_of(model_cfg, tok), count_tokens=count, probes=False)
    rounds = cfg.protocol.rounds if cfg.protocol.mode == "sequential" else 1
    need = rounds * cfg.edits_per_round()
    if need < 1:
        raise ConfigError("data.n_edits / protocol.batch_size: the study has no edits")
    if need > df.height:
        raise ConfigError(
            f"protocol: {rounds} rounds x {cfg.edits_per_round()} edits = {need} edits, "
            f"but only {df.height} are available in {cfg.data.label}"
            + (f" ({report.n_skipped} bad records skipped)" if report.n_skipped else "")
        )
    return {
        "n_available": df.height,
        "n_skipped": report.n_skipped,
        "skipped": report.skipped,
        "rounds": rounds,
        "long_prompts": long,
    }


def print_warnings(info: dict) -> None:
    """Skipped records (the first few and the count) and very long prompts, on stderr."""
    from memoe.checks import LONG_PROMPT_TOKENS

    if info["n_skipped"]:
        print(
            f"warning: {info['n_skipped']} bad record(s) skipped (data.skip_bad), the first "
            f"{min(3, info['n_skipped'])}:",
            file=sys.stderr,
        )
        for line in info["skipped"][:3]:
            print(f"  {line}", file=sys.stderr)
    if info["long_prompts"]:
        print(
            f"warning: {len(info['long_prompts'])} prompt(s) over {LONG_PROMPT_TOKENS} tokens (longest "
            f"{max(info['long_prompts'])}): training and evaluation cost grows with them",
            file=sys.stderr,
        )


def start_local_prefect() -> None:
    """With no PREFECT_API_URL, start this process's temporary Prefect server now, one process at a
    time per PREFECT_HOME: two studies started together against a fresh Prefect home would otherwise
    both create its database and one of them fails ("index ... already exists"). The flow then uses
    the same server (Prefect keeps one per process)."""
    import fcntl

    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "memoe-server-start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            SubprocessASGIServer().start()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def summary_lines(results: dict) -> list[str]:
    from flows.report import AVERAGES, COSTS, HEADLINE, fmt

    out = []
    if "methods" in results:
        ms = {name: m["final"] | m.get("costs", {}) for name, m in results["methods"].items()}
        cols = [c for c in HEADLINE + AVERAGES + COSTS if any(c in m for m in ms.values())]
        label = {"setup_s": "setup s", "edit_s_per_100": "s/100 edits", "peak_memory_mb": "peak MiB"}
        out.append("method".ljust(14) + "".join(label.get(c, c)[:12].rjust(13) for c in cols))
        for name, m in ms.items():
            out.append(name[:14].ljust(14) + "".join(fmt(m.get(c)).rjust(13) for c in cols))
        return out
    cols = [c for c in HEADLINE + AVERAGES if c in results["final"]]
    out.append("round  edits" + "".join(c[:12].rjust(13) for c in cols) + "   cached")
    for r in results["rounds"]:
        cached = "yes" if all(r["cached"].values()) else "no"
        out.append(
            f"{r['round']:5d}  {r['edits_so_far']:5d}" + "".join(fmt(r.get(c)).rjust(13) for c in cols) + f"   {cached}"
        )
    out.append(
        "final  "
        + f"{int(results['final']['n_edits']):5d}"[-5:]
        + "".join(fmt(results["final"].get(c)).rjust(13) for c in cols)
    )
    return out


def run(args) -> int:
    t0 = time.perf_counter()
    from memoe.config import load_config

    cfg_path = args.config if args.config is not None else (QUICKSTART if QUICKSTART.exists() else None)
    cfg = load_config(cfg_path, args.set)
    info = preflight(cfg, args.out)
    print_warnings(info)
    tags = parse_tags(args.tag)
    if args.dry_run:
        return dry_run(cfg, info, args)

    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from flows.study import flow_for
    from memoe.config import config_hash

    start_local_prefect()
    fl = flow_for(cfg, getattr(args, "dask", None))
    print(
        f"memoe run: {getattr(fl, 'name', 'compare')}, {info['rounds']} round(s) x {cfg.edits_per_round()} edits, "
        f"method(s) {', '.join(m.name for m in (cfg.methods or [cfg.method]))}, model {cfg.model.name}, "
        f"config {config_hash(cfg)}",
        flush=True,
    )
    from prefect.exceptions import ExternalSignal

    try:
        results = fl(cfg.to_dict(), args.out, args.runs_dir, name=args.name, tags=tags)
    except (KeyboardInterrupt, ExternalSignal):
        print(
            "interrupted: the study stopped; its MLflow runs are marked KILLED. The same command resumes it "
            "from the last finished task.",
            file=sys.stderr,
        )
        return 130
    except Exception as e:  # noqa: BLE001 - Prefect has logged the traceback already
        print(f"error: the study failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    out = Path(results["out"])
    tm = results["timings"]
    tm["command_total"] = round(time.perf_counter() - t0, 3)
    work = tm.get("train_compute", 0.0) + tm.get("evaluate_compute", 0.0)
    if "methods" not in results:
        fresh = not any(r["cached"]["train"] or r["cached"]["evaluate"] for r in results["rounds"])
        if fresh:
            tm["outside_train_eval_share"] = round(1 - work / tm["command_total"], 3)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print()
    print("\n".join(summary_lines(results)))
    hits = sum(s == "Cached" for s in results["tasks"].values())
    print(
        f"\ntasks: {len(results['tasks'])} ({hits} from cache)   time: {tm['command_total']:.1f}s "
        f"(train {tm.get('train', 0):.1f}s, evaluate {tm.get('evaluate', 0):.1f}s)"
    )
    if results["mlflow"]["run_id"]:
        print(
            f"mlflow: run {results['mlflow']['run_id']} in {results['mlflow']['tracking_uri']}  "
            f"(memoe show {results['mlflow']['run_id'][:8]}; memoe ui)"
        )
    print(f"results: {out / 'results.json'}")
    return 0
