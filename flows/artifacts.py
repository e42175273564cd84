"""What a study's Prefect flow run shows in the Prefect UI: the results table (one row per round,
or per method for a compare) and a link to the study's MLflow run, as Prefect artifacts."""

from __future__ import annotations

from typing import Any

from flows.report import COSTS, HEADLINE


def mlflow_link(tracking_uri: str | None, experiment_id: str | None, run_id: str | None) -> str | None:
    """The run's page in the MLflow UI: the tracking server itself when it is one, else the
    ``memoe ui`` server on its default port (127.0.0.1:5000) over the same database."""
    if not (run_id and experiment_id):
        return None
    base = (
        tracking_uri.rstrip("/")
        if tracking_uri and tracking_uri.startswith(("http://", "https://"))
        else "http://127.0.0.1:5000"
    )
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def result_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The table the terminal prints: per method (compare) or per round, values to 3 decimals."""

    def r3(v):
        return round(v, 3) if isinstance(v, float) else v

    if "methods" in results:
        return [
            {
                "method": name,
                **{
                    k: r3((m["final"] | m.get("costs", {})).get(k))
                    for k in HEADLINE + ["avg"] + COSTS
                    if k in m["final"] | m.get("costs", {})
                },
            }
            for name, m in results["methods"].items()
        ]
    return [
        {"round": r["round"], "edits": r["edits_so_far"], **{k: r3(r[k]) for k in HEADLINE + ["avg"] if k in r}}
        for r in results["rounds"]
    ]


def publish(results: dict[str, Any], title: str, experiment_id: str | None) -> None:
    """Create the table and link artifacts on the current flow run (no-op outside a flow run)."""
    from prefect.artifacts import create_link_artifact, create_table_artifact
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    create_table_artifact(result_rows(results), key="memoe-results", description=f"**{title}**")
    ml = results.get("mlflow") or {}
    link = mlflow_link(ml.get("tracking_uri"), experiment_id, ml.get("run_id"))
    if link:
        create_link_artifact(
            link,
            link_text=f"MLflow run {ml['run_id']}",
            key="memoe-mlflow",
            description=f"MLflow run of {title} (store {ml.get('tracking_uri')}; `memoe ui` serves it)",
        )
