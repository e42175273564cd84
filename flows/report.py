"""Summaries, tables and plots of study results (no Prefect, no MLflow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memoe.metric_registry import HEADLINE  # the headline metrics (the registry's flag), in their order

AVERAGES = ["avg", "fact_avg"]  # mean of Rel/Gen/Loc; mean of Rel/Gen/subject specificity
# one-time set-up seconds (MEMIT's key statistics); training seconds per 100 edits without them; peak memory (MiB)
COSTS = ["setup_s", "edit_s_per_100", "peak_memory_mb"]
# Lifelong-editing figures published by peers, as quoted in memoe's issue 16 (their models and protocols,
# not ours): drawn beside a sequential study's curves where their edit count is inside the plot's range
PUBLISHED = [
    {
        "name": "WISE",
        "protocol": "LLaMA-2-7B, ZsRE, 1,000 single edits",
        "edits": 1000,
        "reliability": 0.77,
        "generality": 0.72,
        "locality": 1.00,
    },
    {
        "name": "LEMoE",
        "protocol": "LLaMA-2-7B, ZsRE, 1,000 edits",
        "edits": 1000,
        "reliability": 0.80,
        "generality": 0.60,
        "locality": 1.00,
    },
    {
        "name": "AlphaEdit",
        "protocol": "8B, 2,000 edits in batches of 100",
        "edits": 2000,
        "reliability": 0.94,
        "generality": 0.91,
    },
    {"name": "UltraEdit", "protocol": "7-8B, 20,000 edits", "edits": 20000, "reliability": 0.90, "generality": 0.87},
]
PEER_MARKERS = ["s", "^", "D", "v"]
KEY_SETTINGS = ("layers", "layer", "steps", "lr", "rank", "num_experts", "top_k", "target_modules", "eps")


def summaries(table) -> dict[str, Any]:
    """'all' (every scored edit), 'current' (the round's own edits), 'earlier' (retention)."""
    import polars as pl

    from memoe.metrics import summarize

    out = summarize(table)
    if "current" in table.columns:
        cur, old = table.filter(pl.col("current")), table.filter(~pl.col("current"))
        out["current"] = summarize(cur)
        if old.height:
            out["earlier"] = summarize(old)
    return out


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return "-" if v is None else str(v)


def markdown_table(rows: list[dict[str, Any]], cols: list[str], first: str) -> str:
    lines = ["| " + " | ".join([first] + cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        lines.append("| " + " | ".join([str(r[first])] + [fmt(r.get(c)) for c in cols]) + " |")
    return "\n".join(lines)


def method_title(method) -> str:
    """A method and its settings that tell runs apart: the key ones, and any set away from its default."""
    d = method.model_dump(mode="json")
    default = type(method)(name=method.name).model_dump(mode="json")
    keys = [k for k in d if k != "name" and (k in KEY_SETTINGS or d[k] != default.get(k))]
    return method.name + " (" + ", ".join(f"{k}={d[k]}" for k in keys) + ")"


def y_range(values: list[float | None]) -> tuple[float, float]:
    """A y-range that shows the differences: the data's range plus a margin, within [0, 1]."""
    vs = [v for v in values if v is not None]
    if not vs:
        return 0.0, 1.02
    lo, hi = min(vs), max(vs)
    pad = max(0.05, 0.15 * (hi - lo))
    return max(-0.02, lo - pad), min(1.02, hi + pad)


def _finish(fig, ax, path: Path, title: str, shown: list) -> Path:
    """A curve plot's common end: a y-range that shows the differences, grid, title, the legend beside
    the axes, saved and closed."""
    import matplotlib.pyplot as plt

    ax.set_ylim(*y_range(shown))
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def rounds_plot(rounds: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["edits_so_far"] for r in rounds]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    shown: list[float | None] = []
    for m, c in (("reliability", "C0"), ("generality", "C1"), ("locality", "C2")):
        ys = [r.get(m) for r in rounds]
        if any(y is not None for y in ys):
            ax.plot(x, ys, "o-", color=c, label=f"{m} (all edits so far)")
            shown += ys
        old = [r.get("earlier", {}).get(m) for r in rounds]
        if any(y is not None for y in old):
            ax.plot(x, old, "x--", color=c, alpha=0.6, label=f"{m} (earlier rounds)")
            shown += old
    shown += _peers(ax, x, [("reliability", "C0"), ("generality", "C1"), ("locality", "C2")])
    ax.set_xlabel("edits applied")
    ax.set_ylabel("score (share of edits)")
    ax.set_xticks(x)
    return _finish(fig, ax, path, title, shown)


def _peers(ax, x: list, metrics: list[tuple[str, str]]) -> list[float]:
    """The published lifelong figures (``PUBLISHED``) inside the x range of a sequential plot (two rounds
    or more), hollow markers in each metric's colour, named with their protocol in the legend."""
    if len(x) < 2:
        return []
    shown = []
    for peer, marker in zip(PUBLISHED, PEER_MARKERS):
        if not min(x) <= peer["edits"] <= 1.05 * max(x):
            continue
        first = True
        for m, c in metrics:
            if m in peer:
                ax.plot(
                    [peer["edits"]],
                    [peer[m]],
                    marker,
                    mfc="none",
                    mec=c,
                    ms=8,
                    ls="none",
                    label=f"{peer['name']} ({peer['protocol']}, published)" if first else None,
                )
                first = False
                shown.append(peer[m])
    return shown


def expert_load(round_: dict[str, Any]) -> list[float] | None:
    """Per-expert routing load after a round: the editor's diagnostics (``load_expert_e``) or a
    ``*load*`` list in its training stats."""
    diag = round_.get("diagnostics") or {}
    keys = sorted((k for k in diag if k.startswith("load_expert_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if keys:
        return [float(diag[k]) for k in keys]
    for k, v in (round_.get("train") or {}).items():
        if "load" in k.lower() and "loss" not in k.lower() and isinstance(v, (list, dict)):
            vals = list(v.values()) if isinstance(v, dict) else v
            flat: list[float] = []
            for x in vals:
                flat.extend(x if isinstance(x, list) else [x])
            if flat and all(isinstance(x, (int, float)) for x in flat):
                return [float(x) for x in flat]
    return None


def expert_load_plot(rounds: list[dict[str, Any]], path: Path) -> Path | None:
    loads = [expert_load(r) for r in rounds]
    if not any(loads):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.6))
    n = max(len(x) for x in loads if x)
    w = 0.8 / len(rounds)
    for i, (r, load) in enumerate(zip(rounds, loads)):
        if load:
            ax.bar(np.arange(len(load)) + i * w, load, w, label=f"after round {r['round']}")
    ax.set_xticks(np.arange(n) + w * (len(rounds) - 1) / 2)
    ax.set_xticklabels([f"expert {e}" for e in range(n)], fontsize=8)
    ax.set_ylabel("share of routed tokens\n(the round's edit prompts)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend sits beside the axes
    plt.close(fig)
    return path


def retention_plot(
    curves: dict[str, list[dict[str, Any]]], path: Path, title: str, metric: str = "reliability"
) -> Path:
    """One curve per method (or run): ``metric`` over all edits so far after every round (solid)
    and on the earlier rounds' edits only (dashed): how much of the old edits survive new ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    shown: list[float | None] = []
    for i, (label, rounds) in enumerate(curves.items()):
        x = [r["edits_so_far"] for r in rounds]
        ys = [r.get(metric) for r in rounds]
        ax.plot(x, ys, "o-", color=f"C{i % 10}", label=f"{label}: all edits so far")
        old = [(r["edits_so_far"], (r.get("earlier") or {}).get(metric)) for r in rounds]
        old = [(a, b) for a, b in old if b is not None]
        if old:
            ax.plot(*zip(*old), "x--", color=f"C{i % 10}", alpha=0.6, label=f"{label}: earlier rounds' edits")
        shown += ys + [b for _, b in old]
    xs = sorted({r["edits_so_far"] for rounds in curves.values() for r in rounds})
    shown += _peers(ax, xs, [(metric, "0.3")])
    ax.set_xlabel("edits applied")
    ax.set_ylabel(f"{metric} (share of edits)")
    return _finish(fig, ax, path, title, shown)


def compare_plot(finals: dict[str, dict[str, Any]], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = [m for m in HEADLINE if any(m in f for f in finals.values())]
    names = list(finals)
    w = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, n in enumerate(names):
        ax.bar(
            np.arange(len(metrics)) + i * w, [finals[n].get(m) or 0.0 for m in metrics], w, label=n, color=f"C{i % 10}"
        )
    ax.set_xticks(np.arange(len(metrics)) + w * (len(names) - 1) / 2)
    ax.set_xticklabels([m.replace("_", "\n") for m in metrics], fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("score after the last round (share of edits)", fontsize=8)
    ax.set_title("Comparison: " + title if title else "Comparison", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend sits beside the axes
    plt.close(fig)
    return path
