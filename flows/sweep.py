"""Sweeps: every cell of a grid (``memoe.grid``) is one study = one flow run of ``flows/study.py:study``.

With a work pool the cells are flow runs of the pool's ``memoe-study`` deployment, submitted at
once (``run_deployment(timeout=0)``) and followed until they end; without one they run here, one
after the other, in this process. An MLflow run ``sweep-<id>`` is the parent of every cell's study
run (tag ``memoe.sweep`` on both), so the MLflow UI lists and compares the cells under it; the
Prefect flow runs carry the tag ``memoe.sweep=<id>``. A failed cell is reported and the others go
on. The tasks are cached on their inputs' contents, so a rerun of the same sweep recomputes only
what no earlier run (on any worker sharing the store) has computed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memoe.config import PROJECT_ROOT, Config, ConfigError, load_config, resolve_path
from memoe.grid import Cell, Sweep

FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
SWEEP_TAG, SWEEP_RUN_TAG = "memoe.sweep=", "memoe.sweep_run="


@dataclass
class CellRun:
    cell: Cell
    cfg: Config
    flow_run_id: str | None = None
    state: str = "PENDING"
    started: float | None = None
    seconds: float | None = None
    error: str | None = None
    mlflow_run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    tasks: int | None = None
    cached_tasks: int | None = None

    def row(self) -> dict[str, Any]:
        return {
            "cell": self.cell.index,
            "values": dict(self.cell.values),
            "overrides": list(self.cell.overrides),
            "state": self.state,
            "seconds": self.seconds,
            "error": self.error,
            "flow_run_id": self.flow_run_id,
            "mlflow_run_id": self.mlflow_run_id,
            "tasks": self.tasks,
            "cached_tasks": self.cached_tasks,
            "final": {k.removeprefix("final."): v for k, v in self.metrics.items() if k.startswith("final.")},
        }


def config_path_for(base: str | None) -> str:
    """The base config as the deployment resolves it: relative to the project root when inside it."""
    p = resolve_path(base or "configs/quickstart.yaml")
    if not p.is_file():
        raise ConfigError(f"sweep base: config file not found: {p}")
    try:
        return str(p.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(p)


def check_cells(sweep: Sweep, preflight) -> tuple[str, list[CellRun]]:
    """Validate every cell's config (and its data, method, model via ``preflight``) before anything
    starts; a bad cell is an error naming it."""
    from memoe.data import EditDataError

    base = config_path_for(sweep.base)
    runs = []
    for c in sweep.cells():
        try:
            cfg = load_config(resolve_path(base), list(c.overrides))
            preflight(cfg)
        except (ConfigError, EditDataError, FileNotFoundError) as e:
            raise ConfigError(f"sweep cell {c.index + 1} ({c.label}): {e}") from None
        runs.append(CellRun(c, cfg))
    uris = {(r.cfg.tracking.mlflow_uri, r.cfg.tracking.experiment, r.cfg.tracking.enabled) for r in runs}
    if len(uris) > 1:
        raise ConfigError(
            f"sweep: the cells must share one MLflow experiment (tracking.* differs: {sorted(map(str, uris))})"
        )
    return base, runs


def sweep_tags(sweep_id: str, sweep_run: str | None) -> list[str]:
    return [f"{SWEEP_TAG}{sweep_id}"] + ([f"{SWEEP_RUN_TAG}{sweep_run}"] if sweep_run else [])


def current_sweep_tags() -> dict[str, str]:
    """The sweep tags of the running flow run or of its root (a deployment's flow run: its subflows
    do not inherit its tags), as MLflow tags of the study run."""
    from prefect.runtime import flow_run

    tags = list(flow_run.tags or [])
    root = flow_run.root_flow_run_id
    if root and str(root) != str(flow_run.id) and not any(t.startswith(SWEEP_TAG) for t in tags):
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            tags += list(client.read_flow_run(root).tags or [])
    return read_sweep_tags(tags)


def read_sweep_tags(tags) -> dict[str, str]:
    """MLflow tags of a study run from its Prefect flow run's tags (set by the sweep)."""
    out = {}
    for t in tags or []:
        if t.startswith(SWEEP_TAG):
            out["memoe.sweep"] = t[len(SWEEP_TAG) :]
        elif t.startswith(SWEEP_RUN_TAG):
            out["mlflow.parentRunId"] = t[len(SWEEP_RUN_TAG) :]
    return out


class SweepRunner:
    """Runs the cells (on a pool or here), follows them, records the sweep in MLflow."""

    def __init__(
        self, sweep: Sweep, base: str, cells: list[CellRun], runs_dir: str | None, console, poll_s: float = 2.0
    ):
        from tasks.tracking import resolve_uri, tracker

        self.sweep, self.base, self.cells, self.runs_dir = sweep, base, cells, runs_dir
        self.console, self.poll_s = console, poll_s
        self.id = sweep.sweep_id()
        cfg = cells[0].cfg
        rd = (
            Path(runs_dir).resolve()
            if runs_dir
            else Path(os.environ.get("MEMOE_RUNS") or PROJECT_ROOT / "runs").resolve()
        )
        self.tracking = {
            "uri": resolve_uri(cfg.tracking.mlflow_uri, rd),
            "experiment": cfg.tracking.experiment,
            "runs_dir": str(rd),
            "enabled": cfg.tracking.enabled,
        }
        self.tr = tracker(**self.tracking)
        self.run_id: str | None = None

    # ------------------------------------------------------------------ links
    def prefect_link(self, flow_run_id: str | None) -> str:
        from prefect.settings import PREFECT_UI_URL

        ui = PREFECT_UI_URL.value()
        if not flow_run_id:
            return "-"
        return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else f"flow run {flow_run_id}"

    def mlflow_link(self, run_id: str | None) -> str:
        if not run_id:
            return "-"
        uri = self.tracking["uri"]
        if uri.startswith("http"):
            return f"{uri.rstrip('/')}/#/experiments/{self.tr.experiment_id}/runs/{run_id}"
        return f"run {run_id} in {uri} (memoe ui)"

    # ------------------------------------------------------------------ MLflow
    def start(self) -> None:
        from memoe.config import flatten

        self.run_id = self.tr.start(
            f"sweep-{self.id}",
            {
                "memoe.sweep": self.id,
                "memoe.flow": "sweep",
                "memoe.base": self.base,
                "memoe.sweep_cells": str(len(self.cells)),
            },
        )
        flats = [flatten(c.cfg.to_dict()) for c in self.cells]
        common = {
            k: v
            for k, v in flats[0].items()  # the settings every cell shares
            if all(k in f and str(f[k]) == str(v) for f in flats[1:])
        }
        self.tr.params(
            self.run_id,
            {"base": self.base, "set": json.dumps(self.sweep.fixed)}
            | {f"grid.{k}": json.dumps(v) for k, v in self.sweep.axes.items()}
            | common,
        )

    def collect(self, c: CellRun) -> None:
        """The cell's study run in MLflow (found by its Prefect flow run) and its final metrics."""
        if not (self.tr.enabled and c.flow_run_id):
            return
        runs = self.tr.client.search_runs(
            [self.tr.experiment_id], f"tags.`prefect.root_flow_run_id` = '{c.flow_run_id}'", max_results=5
        )
        if runs:
            r = runs[0]
            c.mlflow_run_id = r.info.run_id
            c.metrics = dict(r.data.metrics)
            t = r.data.tags
            c.tasks = int(t["memoe.tasks"]) if t.get("memoe.tasks", "").isdigit() else None
            c.cached_tasks = int(t["memoe.cached_tasks"]) if t.get("memoe.cached_tasks", "").isdigit() else None

    def finish(self, wall_s: float) -> dict:
        ok = sum(c.state == "COMPLETED" for c in self.cells)
        summary = {
            "sweep": self.id,
            "base": self.base,
            "cells": [c.row() for c in self.cells],
            "completed": ok,
            "failed": len(self.cells) - ok,
            "wall_s": round(wall_s, 3),
            "mlflow": {"tracking_uri": self.tracking["uri"], "run_id": self.run_id},
        }
        if self.run_id:
            import tempfile

            self.tr.metrics(
                self.run_id, {"cells_completed": ok, "cells_failed": len(self.cells) - ok, "wall_s": wall_s}
            )
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / "sweep.json"
                p.write_text(json.dumps(summary, indent=1, default=str))
                self.tr.artifact(self.run_id, p)
            self.tr.end(self.run_id, "FINISHED" if ok == len(self.cells) else "FAILED")
        return summary

    def report(self, c: CellRun, n: int) -> None:
        secs = f" in {c.seconds:.1f}s" if c.seconds is not None else ""
        cached = f", {c.cached_tasks}/{c.tasks} tasks cached" if c.tasks is not None else ""
        msg = f"cell {c.cell.index + 1}/{n} [{c.cell.label}] {c.state}{secs}{cached}"
        if c.error:
            msg += f": {c.error}"
        self.console.print(msg)
        self.console.print(f"    prefect: {self.prefect_link(c.flow_run_id)}")
        self.console.print(f"    mlflow:  {self.mlflow_link(c.mlflow_run_id)}")

    # ------------------------------------------------------------------ running
    def run_local(self, progress) -> None:
        from tasks.progress import share

        bar = progress.add_task("sweep cells", total=len(self.cells))
        share(progress)  # the studies' round and step bars go below the sweep's (one live display)
        try:
            self._run_cells(progress, bar)
        finally:
            share(None)

    def _run_cells(self, progress, bar) -> None:
        from prefect import tags
        from rich.markup import escape

        from flows.study import study

        for c in self.cells:
            c.state, c.started = "RUNNING", time.perf_counter()
            progress.update(bar, description=escape(f"cell {c.cell.index + 1}/{len(self.cells)} [{c.cell.label}]"))
            with tags(*sweep_tags(self.id, self.run_id)):
                state = study(
                    config_path=self.base, overrides=list(c.cell.overrides), runs_dir=self.runs_dir, return_state=True
                )
            c.flow_run_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
            c.state, c.seconds = state.type.value, time.perf_counter() - c.started
            if c.state != "COMPLETED":
                c.error = _state_error(state)
            self.collect(c)
            progress.advance(bar)
            self.report(c, len(self.cells))

    def run_pool(self, pool: str, deployment: str | None, progress, timeout_s: float | None = None) -> None:
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment

        name = pick_deployment(pool, deployment)
        self.console.print(f"sweep {self.id}: {len(self.cells)} cells on work pool '{pool}' (deployment {name})")
        params_extra = {"runs_dir": self.runs_dir} if self.runs_dir else {}
        for c in self.cells:
            fr = run_deployment(
                name=name,
                parameters={"config_path": self.base, "overrides": list(c.cell.overrides)} | params_extra,
                timeout=0,
                tags=sweep_tags(self.id, self.run_id),
            )
            c.flow_run_id, c.state = str(fr.id), "SCHEDULED"
        bar = progress.add_task(f"sweep cells on {pool}", total=len(self.cells))
        t0 = time.time()
        with get_client(sync_client=True) as client:
            pending = list(self.cells)
            while pending:
                for c in list(pending):
                    fr = client.read_flow_run(c.flow_run_id)
                    st = fr.state.type.value if fr.state else "PENDING"
                    if st == "RUNNING" and c.started is None:
                        c.started = time.perf_counter()
                    c.state = st
                    if st in FINAL_STATES:
                        c.seconds = fr.total_run_time.total_seconds() if fr.total_run_time else None
                        if st != "COMPLETED":
                            c.error = (fr.state.message or st)[:500]
                        self.collect(c)
                        pending.remove(c)
                        progress.advance(bar)
                        self.report(c, len(self.cells))
                running = sum(c.state == "RUNNING" for c in pending)
                progress.update(bar, description=f"sweep cells on {pool} ({running} running)")
                if pending:
                    if timeout_s is not None and time.time() - t0 > timeout_s:
                        for c in pending:
                            c.error = f"still {c.state} after {timeout_s:.0f} s (left running)"
                        break
                    time.sleep(self.poll_s)


def _state_error(state) -> str:
    try:
        state.result()
    except BaseException as e:  # noqa: BLE001 - the cell's failure, reported
        return f"{type(e).__name__}: {e}"[:500]
    return state.message or state.type.value


def pick_deployment(pool: str, deployment: str | None) -> str:
    """The ``memoe-study`` deployment to run on ``pool``: the one named, else the pool's only
    unscheduled one (so a sweep never queues behind the nightly study's concurrency limit)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, WorkPoolFilter, WorkPoolFilterName

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except Exception:  # noqa: BLE001 - ObjectNotFound, or no server
            raise ConfigError(f"--pool {pool}: no such work pool on {client.api_url}") from None
        deps = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["memoe-study"])),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
        )
    names = {d.name: d for d in deps}
    if deployment:
        short = deployment.split("/", 1)[-1]
        if short not in names:
            raise ConfigError(
                f"--deployment {deployment}: no memoe-study deployment of that name on pool '{pool}' "
                f"(there: {sorted(names) or 'none; run prefect deploy --name quickstart'})"
            )
        return f"memoe-study/{short}"
    free = [n for n, d in names.items() if not d.schedules]
    if len(free) != 1:
        raise ConfigError(
            f"--pool {pool}: {len(free)} unscheduled memoe-study deployments there ({sorted(free)}); "
            "name one with --deployment"
            if free
            else f"--pool {pool}: no memoe-study deployment on it (run prefect --no-prompt deploy --name quickstart)"
        )
    return f"memoe-study/{free[0]}"
