"""``memoe ls``: past studies in the MLflow store, newest first: run, date, name, flow, model, data,
protocol, status and the headline metrics after the last round (a compare study: one line per
method below it). Cached reruns of a config are hidden (``--all`` shows them)."""

from __future__ import annotations

from flows import history
from flows.report import HEADLINE

COLS = ["run", "date", "name", "flow", "model", "data", "protocol", "status", *HEADLINE, "avg", "rerun_of"]


def add_arguments(p):
    history.add_store_arguments(p)
    p.add_argument("--all", action="store_true", help="also show cached reruns (tagged memoe.rerun_of)")
    p.add_argument("-n", "--limit", type=int, default=50, help="at most this many studies (default 50)")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the listing to a CSV file")


def rows(client, experiment: str, show_all: bool = False, limit: int = 50) -> list[dict]:
    out = []
    for r in history.studies(client, experiment):
        t = r.data.tags
        if not show_all and t.get("memoe.cached_rerun") == "true" and "memoe.rerun_of" in t:
            continue
        row = {
            "run": r.info.run_id[:8],
            "run_id": r.info.run_id,
            "date": history.when(r),
            "name": r.info.run_name,
            "flow": t.get("memoe.flow"),
            "model": t.get("memoe.model", "").replace("embedded:", ""),
            "data": t.get("memoe.dataset"),
            "protocol": history.protocol(r),
            "status": r.info.status.lower(),
            "rerun_of": t.get("memoe.rerun_of", "")[:8] or None,
            **history.final_metrics(r),
        }
        out.append(row)
        if history.is_compare(r):
            m = r.data.metrics
            for kid in history.method_children(client, r):
                label = kid.info.run_name
                out.append(
                    {
                        "run": kid.info.run_id[:8],
                        "run_id": kid.info.run_id,
                        "name": f"  └ {label}",
                        "flow": "method",
                        "parent": r.info.run_id[:8],
                        **{k: m[f"{label}.{k}"] for k in HEADLINE + ["avg"] if f"{label}.{k}" in m},
                    }
                )
        if sum(1 for x in out if x.get("flow") != "method") >= limit:
            break
    return out


def run(args) -> int:
    client = history.client_for(args.uri, args.runs_dir)
    table = rows(client, args.experiment, args.all, args.limit)
    if not table:
        print(f"no studies in experiment '{args.experiment}' of {client.tracking_uri}")
        return 0
    cols = [c for c in COLS if any(r.get(c) is not None for r in table)]
    print("\n".join(history.print_table(table, cols, {"name": 60, "model": 20, "data": 24})))
    if args.csv:
        print(f"csv: {history.write_csv(table, args.csv)}")
    return 0
