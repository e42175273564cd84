"""``memoe sweep [GRID.yaml | CONFIG.yaml] [--set key=a,b ...] [--pool NAME]``: a grid of studies.

Each cell (the product of the grid's values; a comma list in ``--set`` is an axis, the Hydra
convention) is one study. ``--pool NAME`` submits every cell as a flow run of the pool's
``memoe-study`` deployment (``PREFECT_API_URL`` must point at the server) and follows them; without
it the cells run here, one after the other. Every cell is validated first (a bad one is
``error: sweep cell i (...)``, exit 2, before anything runs). Exit 1 when a cell failed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def add_arguments(p):
    p.add_argument(
        "config",
        nargs="?",
        default=None,
        help="a grid file (base/set/grid) or a config file (default: configs/quickstart.yaml)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="an override; a comma list makes it a grid axis (repeatable)",
    )
    p.add_argument("--pool", default=None, help="Prefect work pool to run the cells on (default: here, in turn)")
    p.add_argument(
        "--deployment",
        default=None,
        help="memoe-study deployment to run on the pool (default: the pool's only unscheduled one)",
    )
    p.add_argument(
        "--runs-dir",
        default=None,
        help="store + MLflow folder (default: $MEMOE_RUNS or runs/; on a pool: the workers' own)",
    )
    p.add_argument("--out", default=None, help="write the sweep summary (JSON) to this file")
    p.add_argument("--timeout", type=float, default=None, help="stop following the cells after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="list the cells and exit")


def run(args) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from flows.commands_run import preflight, start_local_prefect
    from flows.sweep import SweepRunner, check_cells
    from memoe.grid import load_sweep

    t0 = time.perf_counter()
    sweep = load_sweep(args.config, args.set)
    base, cells = check_cells(sweep, preflight)
    # plain text: cell labels hold brackets (no rich markup) and links must not wrap
    console = Console(stderr=False, highlight=False, markup=False, soft_wrap=True)
    console.print(
        f"memoe sweep {sweep.sweep_id()}: {len(cells)} cell(s) of {base}"
        + "".join(f"\n  {c.cell.index + 1}: {c.cell.label}" for c in cells)
    )
    if args.dry_run:
        return 0
    if args.pool is None:
        start_local_prefect()
    runner = SweepRunner(sweep, base, cells, args.runs_dir, console)
    runner.start()
    cols = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    try:
        with Progress(*cols, console=console, transient=False) as progress:
            if args.pool:
                runner.run_pool(args.pool, args.deployment, progress, args.timeout)
            else:
                runner.run_local(progress)
    finally:
        summary = runner.finish(time.perf_counter() - t0)
    console.print(
        f"\nsweep {summary['sweep']}: {summary['completed']}/{len(cells)} cells completed in {summary['wall_s']:.1f}s"
    )
    if runner.run_id:
        console.print(f"mlflow sweep run: {runner.mlflow_link(runner.run_id)}")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1, default=str))
    for c in cells:
        if c.state != "COMPLETED":
            print(f"failed: cell {c.cell.index + 1} [{c.cell.label}]: {c.error}", file=sys.stderr)
    return 0 if summary["failed"] == 0 else 1
