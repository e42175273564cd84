"""Sweep benchmark: the same grid on a process work pool with 1 worker, then with 2, each from an
empty store (nothing cached), against the team server (``flows.team.TeamServer``: PostgreSQL,
Prefect, MLflow) started here on 127.0.0.1 and stopped at the end.

    .venv/bin/python scripts/bench_sweep.py                      # tiny random model, 2 x 2 cells
    .venv/bin/python scripts/bench_sweep.py --model embedded:smollm2-135m --set data.n_edits=10

Reports the sweep's wall time per worker count and, per cell, the orchestration share: the part
of the cell's time (from the worker picking the flow run up to its end) that is not the library's
work inside the tasks (training, evaluation, the unedited model's locality predictions, as timed in
them): process start, imports, Prefect, MLflow, hashing, model load. Writes runs/bench/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tiny_model(folder: Path) -> str:
    """The tests' tiny LLaMA with the embedded model's tokenizer, saved once in ``folder``."""
    from transformers import AutoTokenizer

    from benchmarks.tiny import tiny_model as build
    from memoe.models import embedded_checkpoint

    if not (folder / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(embedded_checkpoint("smollm2-135m"))
        build("llama", len(tok)).save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: a tiny random LLaMA (4 layers, width 64)")
    ap.add_argument("--set", action="append", default=[], help="more overrides / grid axes (comma lists)")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "sweep.json"))
    args = ap.parse_args()

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.team import TeamServer, free_port, stop_process

    work = Path(tempfile.mkdtemp(prefix="memoe-bench-sweep-", dir="/tmp"))
    work.chmod(0o755)
    model = args.model or tiny_model(work / "tiny")
    layer = "[2]" if args.model is None else "[20]"
    sets = [
        f"model.name={model}",
        f"method.layers={layer}",
        "method.steps=5",
        "data.n_edits=4",
        "data.sample=random",
        "protocol.rounds=2",
        "protocol.batch_size=2",
        "eval.max_new_tokens=4",
        "threads=1",
        "method.rank=4,8",
        "data.seed=0,1",
    ] + args.set
    srv = TeamServer(work / "team", prefect_port=free_port(), mlflow_port=free_port(), prefect_ui=False)
    report: dict = {"model": model, "set": sets, "runs": {}}
    with srv:
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING"))}
        base_env |= srv.client_env() | {
            "PREFECT_HOME": str(work / "prefect-home"),
            "OMP_NUM_THREADS": "1",
            "PWD": str(ROOT),
            "DO_NOT_TRACK": "1",
        }
        py = [sys.executable, "-m"]
        subprocess.run(
            py + ["prefect", "work-pool", "create", "memoe-process", "--type", "process"],
            env=base_env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        subprocess.run(
            py + ["prefect", "--no-prompt", "deploy", "--name", "quickstart"],
            env=base_env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        for n in [int(x) for x in args.workers.split(",")]:
            store = work / f"store-{n}"  # empty: nothing cached
            env = base_env | {"MEMOE_RUNS": str(store)}
            workers = [
                subprocess.Popen(
                    py
                    + [
                        "prefect",
                        "worker",
                        "start",
                        "--pool",
                        "memoe-process",
                        "--limit",
                        "1",
                        "--name",
                        f"bench-{n}-{i}",
                    ],
                    env=env,
                    cwd=ROOT,
                    start_new_session=True,
                    stdout=open(work / f"worker-{n}-{i}.log", "w"),
                    stderr=subprocess.STDOUT,
                )
                for i in range(n)
            ]
            try:
                cmd = py + ["flows.cli", "sweep", "--pool", "memoe-process", "--out", str(work / f"sweep-{n}.json")]
                for s in sets:
                    cmd += ["--set", s]
                t0 = time.perf_counter()
                subprocess.run(cmd, env=env, cwd=ROOT, check=True)
                wall = time.perf_counter() - t0
            finally:
                for w in workers:
                    stop_process(w)
            summary = json.loads((work / f"sweep-{n}.json").read_text())
            cells = []
            # the flow runs' states, read back from the team server (prefect's settings were read at
            # import: without this the client would start a temporary server of its own)
            with temporary_settings(updates={PREFECT_API_URL: srv.prefect_api}), get_client(sync_client=True) as client:
                for c in summary["cells"]:
                    states = client.read_flow_run_states(c["flow_run_id"])
                    picked = min(s.timestamp for s in states if s.type.value == "PENDING")
                    end = max(s.timestamp for s in states if s.is_final())
                    cell_s = (end - picked).total_seconds()
                    lib = None  # the cell's results.json in the store's output folders, found by its MLflow run
                    for p in store.glob("*/results.json"):
                        r = json.loads(p.read_text())
                        if r["mlflow"]["run_id"] == c["mlflow_run_id"]:
                            t = r["timings"]
                            lib = sum(
                                t.get(k, 0.0) for k in ("train_compute", "evaluate_compute", "locality_base_compute")
                            )
                    cells.append(
                        {
                            "cell": c["values"],
                            "state": c["state"],
                            "cell_s": round(cell_s, 2),
                            "library_s": round(lib, 2) if lib is not None else None,
                            "orchestration_share": round(1 - lib / cell_s, 3) if lib is not None else None,
                        }
                    )
            shares = sorted(x["orchestration_share"] for x in cells if x["orchestration_share"] is not None)
            report["runs"][str(n)] = {
                "workers": n,
                "wall_s": round(wall, 2),
                "cells": cells,
                "median_orchestration_share": shares[len(shares) // 2] if shares else None,
            }
            print(
                f"{n} worker(s): sweep of {len(cells)} cells in {wall:.1f}s; per cell "
                + ", ".join(f"{x['cell_s']:.1f}s ({x['orchestration_share']:.0%} orchestration)" for x in cells),
                flush=True,
            )
    runs = report["runs"]
    if "1" in runs and "2" in runs:
        report["speedup_2_vs_1"] = round(runs["1"]["wall_s"] / runs["2"]["wall_s"], 2)
        print(f"2 workers vs 1: {report['speedup_2_vs_1']}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
