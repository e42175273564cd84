"""MLflow tracking through ``MlflowClient`` with explicit run ids (never the fluent active run,
which is per thread and invisible to tasks run with ``.submit()``).

Layout: a parent run per study (flattened config as params; tags: config hash, git commit, model,
dataset; the dataset as an input; artifacts: resolved config, results.json, per-edit table,
final editor state, plots), a nested run per round (metrics at step = edits applied so far), and
for ``compare`` a nested run per method with its rounds nested below it.
"""

from __future__ import annotations

import fcntl
import functools
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_uri(runs_dir: Path) -> str:
    return f"sqlite:///{(runs_dir / 'mlflow.db').resolve()}"


def resolve_uri(config_uri: str | None, runs_dir: Path) -> str:
    """The MLflow tracking URI of a study: the config's ``tracking.mlflow_uri``, else
    ``$MLFLOW_TRACKING_URI`` (a team server), else the SQLite file in the runs folder."""
    import os

    return config_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(runs_dir)


def _retry(fn: Callable[[], T], tries: int = 6) -> T:
    """SQLite under two concurrent studies can answer 'database is locked'; try again."""
    for i in range(tries):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            msg = str(e).lower()
            if i == tries - 1 or not ("locked" in msg or "busy" in msg or "unique constraint" in msg):
                raise
            time.sleep(0.3 * (i + 1))
    raise AssertionError("unreachable")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "memoe", "tasks", "flows"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """A thin wrapper; ``enabled=False`` makes every call a no-op."""

    def __init__(self, uri: str, experiment: str, runs_dir: Path, enabled: bool = True):
        self.uri, self.enabled, self.experiment_id = uri, enabled, None
        self.client = None
        if not enabled:
            return
        from mlflow import MlflowClient

        lock = None
        if uri.startswith("sqlite:///"):
            db = Path(uri[len("sqlite:///") :])
            db.parent.mkdir(parents=True, exist_ok=True)
            lock = open(db.with_suffix(".lock"), "w")
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process creates the schema / experiment at a time
        try:
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                art = (runs_dir / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
                try:
                    self.experiment_id = self.client.create_experiment(experiment, artifact_location=art)
                except Exception:  # noqa: BLE001 - another worker created it first (a shared server)
                    exp = self.client.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
                    self.experiment_id = exp.experiment_id
            else:
                self.experiment_id = exp.experiment_id
        finally:
            if lock:
                lock.close()

    # runs
    def start(self, name: str, tags: dict[str, str], parent: str | None = None) -> str | None:
        if not self.enabled:
            return None
        tags = dict(tags)
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=name, tags=tags))
        return run.info.run_id

    def end(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id:
            _retry(lambda: self.client.set_terminated(run_id, status))

    # data
    def params(self, run_id: str | None, params: dict[str, Any]) -> None:
        if not run_id:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            _retry(lambda i=i: self.client.log_batch(run_id, params=items[i : i + 100], synchronous=True))

    def metrics(self, run_id: str | None, values: dict[str, float], step: int = 0) -> None:
        if not run_id:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(k, float(v), ts, step) for k, v in sorted(values.items()) if isinstance(v, (int, float)) and v == v
        ]
        for i in range(0, len(items), 1000):
            _retry(lambda i=i: self.client.log_batch(run_id, metrics=items[i : i + 1000], synchronous=True))

    def tags(self, run_id: str | None, tags: dict[str, str]) -> None:
        if not run_id:
            return
        from mlflow.entities import RunTag

        _retry(
            lambda: self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)
        )

    def artifact(self, run_id: str | None, path: str | Path, folder: str | None = None) -> None:
        if not run_id:
            return
        p = Path(path)
        if p.is_dir():
            _retry(lambda: self.client.log_artifacts(run_id, str(p), folder))
        elif p.exists():
            _retry(lambda: self.client.log_artifact(run_id, str(p), folder))

    def dataset(self, run_id: str | None, parquet: str | Path, name: str, source: str, context: str = "edits") -> None:
        """Log the edit records as an MLflow dataset input (list columns as JSON text)."""
        if not run_id:
            return
        import json

        import mlflow.data
        import polars as pl
        from mlflow.entities import DatasetInput, InputTag

        df = pl.read_parquet(parquet)
        pdf = df.select([c for c, t in df.schema.items() if not isinstance(t, pl.List)]).to_pandas()
        for c, t in df.schema.items():
            if isinstance(t, pl.List):
                pdf[c] = [json.dumps(x) for x in df[c].to_list()]
        import warnings

        with warnings.catch_warnings():  # "source can be interpreted in multiple ways": a local file
            warnings.simplefilter("ignore", UserWarning)
            ds = mlflow.data.from_pandas(pdf[df.columns], source=source, name=name)
        inp = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        _retry(lambda: self.client.log_inputs(run_id, datasets=[inp]))


@functools.lru_cache(maxsize=8)
def tracker(uri: str, experiment: str, runs_dir: str, enabled: bool) -> Tracker:
    return Tracker(uri, experiment, Path(runs_dir), enabled)
