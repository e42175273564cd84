"""``memoe compare RUN RUN ...``: past studies side by side: the settings that differ, the headline
metrics after the last round and the costs, and the retention curves (reliability over the edits
applied, on all edits so far and on the earlier rounds' edits) in one plot. A compare study given
alone stands for its methods. ``--csv FILE`` writes the table."""

from __future__ import annotations

from pathlib import Path

from flows import history
from flows.report import COSTS, HEADLINE, retention_plot

IGNORE = ("tracking.", "threads", "model.device")


def add_arguments(p):
    p.add_argument("runs", nargs="+", metavar="RUN", help="run ids, id prefixes or run names (see memoe ls)")
    history.add_store_arguments(p)
    p.add_argument("--metric", default="reliability", help="the metric of the retention plot (default reliability)")
    p.add_argument("--plot", default=None, metavar="FILE", help="retention plot (default: ./compare-<runs>.png)")
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the table to a CSV file")


def entries(client, experiment: str, refs: list[str]) -> list:
    runs = [history.find_run(client, experiment, ref) for ref in refs]
    if len(runs) == 1 and history.is_compare(runs[0]):
        runs = history.method_children(client, runs[0])
    if len(runs) < 2:
        raise history.HistoryError("memoe compare needs two runs or more (or one compare study)")
    return runs


def settings(run) -> dict[str, str]:
    """A run's settings as comparable keys: a compare's method run logs ``method.*`` only."""
    return {k: v for k, v in run.data.params.items() if not k.startswith(IGNORE)}


def table(client, runs: list) -> tuple[list[dict], list[str]]:
    labels = [r.info.run_name for r in runs]
    labels = [n if labels.count(n) == 1 else f"{n} {r.info.run_id[:6]}" for n, r in zip(labels, runs)]
    sets = [settings(r) for r in runs]
    keys = sorted(set().union(*sets))
    differ = [k for k in keys if len({s.get(k) for s in sets}) > 1]
    rows = []
    for label, r, s in zip(labels, runs, sets):
        rows.append(
            {
                "run": label,
                "id": r.info.run_id[:8],
                "protocol": history.protocol(r) if "memoe.flow" in r.data.tags else "method",
                **{k: s.get(k) for k in differ},
                **history.final_metrics(r),
            }
        )
    return rows, differ


def run(args) -> int:
    client = history.client_for(args.uri, args.runs_dir)
    runs = entries(client, args.experiment, args.runs)
    rows, differ = table(client, runs)
    metric_cols = [c for c in HEADLINE + ["avg"] + COSTS if any(r.get(c) is not None for r in rows)]
    print("\n".join(history.print_table(rows, ["run", "id", "protocol", *metric_cols], {"run": 44})))
    if differ:
        more = f" (the first 10 of {len(differ)}; --csv has all)" if len(differ) > 10 else ""
        print(f"\nsettings that differ{more}:")
        print("\n".join(history.print_table(rows, ["run", *differ[:10]], {"run": 44})))
    curves = {r["run"]: history.curve(client, run_) for r, run_ in zip(rows, runs)}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        plot = Path(args.plot or f"compare-{'-'.join(r['id'] for r in rows)[:60]}.png")
        retention_plot(curves, plot, f"{args.metric} over the edits applied: " + ", ".join(curves), args.metric)
        print(f"\nretention curves: {plot.resolve()}")
    if args.csv:
        print(f"csv: {history.write_csv(rows, args.csv)}")
    return 0
