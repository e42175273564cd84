"""Past studies in the MLflow store, for ``memoe ls``, ``memoe show`` and ``memoe compare``: find
runs by id, id prefix or name, read their settings, headline metrics and per-round curves."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flows.report import COSTS, HEADLINE
from memoe.metric_registry import REGISTRY as METRIC_REGISTRY

# column headings: the metrics' short names (the metric registry), then the costs'
SHORT = {
    **{n: m.short for n, m in METRIC_REGISTRY.items() if m.short},
    "avg": "avg",
    "setup_s": "setup_s",
    "edit_s_per_100": "s/100",
    "peak_memory_mb": "peak_mb",
}


class HistoryError(FileNotFoundError):
    """No store, no such run: reported by the CLI as ``error: ...`` (exit 2)."""


def add_store_arguments(p) -> None:
    p.add_argument("--runs-dir", default=None, help="folder of the MLflow database (default: $MEMOE_RUNS or runs/)")
    p.add_argument("--uri", default=None, help="MLflow tracking URI (default: sqlite:///<runs-dir>/mlflow.db)")
    p.add_argument("--experiment", default="memoe", help="MLflow experiment (default: memoe)")


def client_for(uri: str | None, runs_dir: str | None):
    from mlflow import MlflowClient

    from flows.study import default_runs_dir
    from tasks.tracking import default_uri

    if uri is None:
        rd = Path(runs_dir).resolve() if runs_dir else default_runs_dir()
        if not (rd / "mlflow.db").is_file():
            raise HistoryError(f"no MLflow store at {rd / 'mlflow.db'} (run a study first, or give --runs-dir / --uri)")
        uri = default_uri(rd)
    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise HistoryError(f"no MLflow experiment '{name}' in {client.tracking_uri}")
    return exp.experiment_id


def studies(client, experiment: str, max_results: int = 1000) -> list:
    """The studies (parent runs), newest first."""
    runs = client.search_runs(
        [experiment_id(client, experiment)],
        "tags.`memoe.flow` != ''",
        order_by=["attributes.start_time DESC"],
        max_results=max_results,
    )
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def finished_studies(client, experiment: str, chash: str) -> list:
    try:
        eid = experiment_id(client, experiment)
    except HistoryError:
        return []
    return client.search_runs(
        [eid],
        f"tags.`memoe.config_hash` = '{chash}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
        max_results=10,
    )


def find_run(client, experiment: str, ref: str):
    """A run by its id, a unique prefix of its id, or its name (the newest of that name)."""
    from mlflow.exceptions import MlflowException

    eid = experiment_id(client, experiment)
    if len(ref) == 32:
        try:
            return client.get_run(ref)
        except MlflowException:
            pass
    by_name = client.search_runs(
        [eid],
        f"attributes.run_name = '{ref.replace(chr(39), '')}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if by_name:
        return by_name[0]
    hits = [r for r in client.search_runs([eid], "", max_results=5000) if r.info.run_id.startswith(ref)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise HistoryError(f"run '{ref}' is ambiguous: {', '.join(r.info.run_id for r in hits[:5])}")
    raise HistoryError(
        f"no run '{ref}' (an id, an id prefix or a run name) in experiment '{experiment}' "
        f"of {client.tracking_uri}; `memoe ls` lists them"
    )


def when(run) -> str:
    return datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M")


def protocol(run) -> str:
    p = run.data.params
    n = run.data.tags.get("memoe.n_edits") or p.get("data.n_edits", "?")
    if p.get("protocol.mode") == "sequential":
        r = int(p.get("protocol.rounds", 1))
        b = p.get("protocol.batch_size")
        b = b if b not in (None, "None") else (int(n) // r if str(n).isdigit() else "?")
        return f"seq {r}x{b}"
    return f"batch {n}"


def is_compare(run) -> bool:
    return run.data.tags.get("memoe.flow") == "compare"


def method_children(client, run) -> list:
    """A compare study's per-method runs, in the order they ran."""
    kids = client.search_runs(
        [run.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=100,
    )
    return [k for k in kids if "memoe.round" not in k.data.tags]


def final_metrics(run) -> dict[str, float]:
    m = run.data.metrics
    return {k: m[f"final.{k}"] for k in HEADLINE + ["avg"] + COSTS if f"final.{k}" in m}


def curve(client, run) -> list[dict[str, Any]]:
    """Per-round metrics (all edits so far, and ``earlier`` = the earlier rounds' edits) at step =
    edits applied so far, as the flows log them on a study's (or a compare method's) run."""
    by_step: dict[int, dict[str, Any]] = {}
    for m in HEADLINE + ["avg"]:
        for key, into in ((m, None), (f"earlier.{m}", "earlier")):
            if key not in run.data.metrics:
                continue
            for h in client.get_metric_history(run.info.run_id, key):
                row = by_step.setdefault(h.step, {"edits_so_far": h.step})
                (row.setdefault("earlier", {}) if into else row)[m] = h.value
    rows = [by_step[s] for s in sorted(by_step)]
    for i, r in enumerate(rows):
        r["round"] = i + 1
    return rows


def fmt(v: Any) -> str:
    from flows.report import fmt as f

    return f(v)


def print_table(rows: list[dict[str, Any]], cols: list[str], widths: dict[str, int] | None = None) -> list[str]:
    """Plain fixed-width columns; floats to 3 decimals (1 above 10)."""
    widths = widths or {}
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    w = [min(widths.get(c, 60), max([len(SHORT.get(c, c))] + [len(x[i]) for x in cells])) for i, c in enumerate(cols)]
    out = ["  ".join(SHORT.get(c, c)[: w[i]].ljust(w[i]) for i, c in enumerate(cols)).rstrip()]
    for x in cells:
        out.append("  ".join(x[i][: w[i]].ljust(w[i]) for i in range(len(cols))).rstrip())
    return out


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    import polars as pl

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows, infer_schema_length=None).write_csv(p)
    return p
