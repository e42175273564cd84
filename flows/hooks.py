"""Prefect flow-run state hooks: a study whose flow run crashes (its process killed, out of memory,
SIGTERM) or is cancelled leaves no MLflow run ``RUNNING``: the hook marks the study's MLflow runs
``KILLED``. Prefect runs the hooks where the flow ran, or, when the process died without running
them, in the worker's runner that started it, so this works across machines (unlike the host+pid
check of ``flows.study._mark_stale_runs``, kept as the fallback for studies run without a worker).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("memoe.hooks")


def _config_of(params: dict):
    from memoe.config import Config, load_config, resolve_path

    if isinstance(params.get("config"), dict):
        return Config.model_validate(params["config"])
    path = params.get("config_path", "configs/quickstart.yaml")
    return load_config(resolve_path(path) if path else None, params.get("overrides") or [])


def mark_mlflow_killed(flow, flow_run, state) -> list[str]:
    """The MLflow runs of this flow run (the study's parent, found by its Prefect ids, and its
    children) that are not FINISHED become KILLED. Returns their ids; never raises."""
    try:
        from flows.study import default_runs_dir
        from tasks.tracking import resolve_uri, tracker

        params = dict(flow_run.parameters or {})
        cfg = _config_of(params)
        if not cfg.tracking.enabled:
            return []
        rd = Path(params["runs_dir"]).resolve() if params.get("runs_dir") else default_runs_dir()
        tr = tracker(resolve_uri(cfg.tracking.mlflow_uri, rd), cfg.tracking.experiment, str(rd), True)
        fid = str(flow_run.id)
        found = {}
        for tag in ("prefect.flow_run_id", "prefect.root_flow_run_id"):
            for r in tr.client.search_runs([tr.experiment_id], f"tags.`{tag}` = '{fid}'", max_results=20):
                found[r.info.run_id] = r
        killed = []
        for rid, r in found.items():
            children = tr.client.search_runs(
                [tr.experiment_id],
                f"tags.`mlflow.parentRunId` = '{rid}' and attributes.status = 'RUNNING'",
                max_results=200,
            )
            for c in children:
                tr.end(c.info.run_id, "KILLED")
                killed.append(c.info.run_id)
            if r.info.status != "FINISHED":
                tr.end(rid, "KILLED")
                tr.tags(rid, {"memoe.end_state": f"{state.type.value}: {(state.message or '')[:200]}"})
                killed.append(rid)
        if killed:
            log.warning("flow run %s %s: MLflow run(s) %s marked KILLED", fid, state.type.value, ", ".join(killed))
        return killed
    except Exception as e:  # noqa: BLE001 - a hook must not mask the crash it reports
        log.warning("could not mark the MLflow runs of flow run %s: %s", getattr(flow_run, "id", "?"), e)
        return []


HOOKS = {"on_crashed": [mark_mlflow_killed], "on_cancellation": [mark_mlflow_killed]}
