"""Summaries, tables and plots of study results (no Prefect, no MLflow)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

HEADLINE = ["reliability", "generality", "locality", "specificity", "restyled_generality", "chat_generality",
            "portability", "generation_reliability"]
AVERAGES = ["avg", "fact_avg"]  # mean of Rel/Gen/Loc; mean of Rel/Gen/subject specificity
COSTS = ["edit_s_per_100", "peak_memory_mb"]  # training seconds per 100 edits; peak memory while training (MiB)


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


def rounds_plot(rounds: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["edits_so_far"] for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for m, c in (("reliability", "C0"), ("generality", "C1"), ("locality", "C2")):
        ys = [r.get(m) for r in rounds]
        if any(y is not None for y in ys):
            ax.plot(x, ys, "o-", color=c, label=f"{m} (all edits so far)")
        old = [r.get("earlier", {}).get(m) for r in rounds]
        if any(y is not None for y in old):
            ax.plot(x, old, "x--", color=c, alpha=0.6, label=f"{m} (earlier rounds)")
    ax.set_xlabel("edits applied")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
            ax.bar(np.arange(len(load)) + i * w, load, w, label=f"after round {r['round'] + 1}")
    ax.set_xticks(np.arange(n) + w * (len(rounds) - 1) / 2)
    ax.set_xticklabels([f"expert {e}" for e in range(n)], fontsize=8)
    ax.set_ylabel("share of routed tokens\n(the round's edit prompts)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_plot(finals: dict[str, dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = [m for m in HEADLINE if any(m in f for f in finals.values())]
    names = list(finals)
    w = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, n in enumerate(names):
        ax.bar(np.arange(len(metrics)) + i * w, [finals[n].get(m) or 0.0 for m in metrics], w, label=n)
    ax.set_xticks(np.arange(len(metrics)) + w * (len(names) - 1) / 2)
    ax.set_xticklabels([m.replace("_", "\n") for m in metrics], fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
