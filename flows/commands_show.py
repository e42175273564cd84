"""``memoe show RUN``: one study (or a compare's method run): its settings, headline metrics, the
metrics after every round, a compare's methods, and the failed edits read from its per-edit table
(prompt, target, the model's generation). ``--csv FILE`` writes the per-edit table."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from flows import history
from flows.report import COSTS, HEADLINE


def add_arguments(p):
    p.add_argument("run", help="run id, id prefix or run name (see memoe ls)")
    history.add_store_arguments(p)
    p.add_argument("--edits", type=int, default=5, help="how many failed edits to show (default 5; 0: none)")
    p.add_argument("--csv", default=None, metavar="FILE", help="write the run's per-edit table to a CSV file")


def per_edit(client, run):
    """The per-edit table logged with the run (a study's ``per_edit.parquet``, a method's
    ``per_edit/<hash>.parquet``), or None."""
    import polars as pl

    names = [a.path for a in client.list_artifacts(run.info.run_id)]
    path = "per_edit.parquet" if "per_edit.parquet" in names else None
    if path is None and "per_edit" in names:
        files = [a.path for a in client.list_artifacts(run.info.run_id, "per_edit") if a.path.endswith(".parquet")]
        path = files[0] if files else None
    if path is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        return pl.read_parquet(client.download_artifacts(run.info.run_id, path, d))


def failures(table, n: int) -> list[dict]:
    import polars as pl

    cond = pl.lit(False)
    for m in ("reliability", "generation_reliability"):
        if m in table.columns:
            cond = cond | (pl.col(m).fill_null(1.0) < 1.0)
    cols = [
        c
        for c in ("id", "prompt", "target_new", "generation", "reliability", "generality", "locality")
        if c in table.columns
    ]
    return table.filter(cond).select(cols).head(n).to_dicts()


def run(args) -> int:
    client = history.client_for(args.uri, args.runs_dir)
    r = history.find_run(client, args.experiment, args.run)
    t, p = r.data.tags, r.data.params
    print(f"{r.info.run_name}   run {r.info.run_id}   {r.info.status.lower()}   {history.when(r)} UTC")
    if "memoe.flow" in t:
        print(
            f"flow {t['memoe.flow']}, {history.protocol(r)}, model {t.get('memoe.model')}, data {t.get('memoe.dataset')}, "
            f"config {t.get('memoe.config_hash')}, code {t.get('memoe.git_commit', '?')[:12]}"
        )
    if t.get("memoe.rerun_of"):
        print(
            f"a rerun of {t['memoe.rerun_of']}"
            + (" (every task from cache)" if t.get("memoe.cached_rerun") == "true" else "")
        )
    user = {k: v for k, v in t.items() if not k.startswith(("memoe.", "mlflow.", "prefect."))}
    if user:
        print("tags: " + ", ".join(f"{k}={v}" for k, v in sorted(user.items())))
    settings = {
        k: v
        for k, v in p.items()
        if k.startswith(("method.", "methods.", "protocol.", "data.n_edits", "eval.retention_sample"))
    }
    if settings:
        print("settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())))
    fin = history.final_metrics(r)
    if fin:
        print("\nafter the last round: " + ", ".join(f"{k} {v:.3f}" for k, v in fin.items()))
    rounds = history.curve(client, r)
    if rounds:
        cols = ["round", "edits_so_far", *(m for m in HEADLINE + ["avg"] if any(m in x for x in rounds))]
        flat = [x | {f"earlier {k}": v for k, v in (x.get("earlier") or {}).items()} for x in rounds]
        cols += [f"earlier {m}" for m in ("reliability", "generality") if any(f"earlier {m}" in x for x in flat)]
        print("\n" + "\n".join(history.print_table(flat, cols)))
    if history.is_compare(r):
        m = r.data.metrics
        rows = [
            {
                "method": k.info.run_name,
                "run": k.info.run_id[:8],
                **{c: m.get(f"{k.info.run_name}.{c}") for c in HEADLINE + ["avg"] + COSTS},
            }
            for k in history.method_children(client, r)
        ]
        cols = ["method", "run", *(c for c in HEADLINE + ["avg"] + COSTS if any(x.get(c) is not None for x in rows))]
        print("\n" + "\n".join(history.print_table(rows, cols)))
        print("(memoe show <method run> for a method's rounds and failed edits)")
    table = None if history.is_compare(r) else per_edit(client, r)
    if table is not None and args.edits:
        bad = failures(table, args.edits)
        print(
            f"\nfailed edits (reliability or exact generation below 1): {len(bad)} shown of {table.height} scored"
            if bad
            else f"\nno failed edits of {table.height} scored"
        )
        for b in bad:
            print(
                f"  [{b['id']}] {b.get('prompt')!r} -> {b.get('target_new')!r}: generated {b.get('generation')!r}"
                + "".join(
                    f", {k} {b[k]:.2f}"
                    for k in ("reliability", "generality", "locality")
                    if isinstance(b.get(k), float)
                )
            )
    if args.csv:
        if table is None:
            print("no per-edit table for this run (a compare: give one of its method runs)")
            return 1
        import polars as pl

        out = table.with_columns(
            [
                pl.col(c).map_elements(json.dumps, return_dtype=pl.String)
                for c, d in table.schema.items()
                if isinstance(d, (pl.List, pl.Struct))
            ]
        )
        print(f"csv: {history.write_csv(out.to_dicts(), Path(args.csv))}")
    return 0
