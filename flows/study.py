"""The study flows: ``batch_edit``, ``sequential_study`` and ``compare``, plus ``study`` (the
deployment entry point: a config file + overrides, dispatched to the right flow).

Round t's task loads the editor state folder of round t-1, edits, saves a new content-addressed
folder; every task is cached on its inputs' contents, so a study killed at round k and restarted
with the same config re-executes nothing before round k, and a finished study reruns from cache.
Tracking goes through explicit MLflow run ids (tasks never rely on an active run).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE

from flows import report
from memoe.config import Config, config_hash, flatten, resolve_path
from tasks import steps
from tasks.integrity import check_record, outputs_intact
from tasks.tracking import default_uri, git_commit, tracker

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_runs_dir() -> Path:
    return Path(os.environ.get("MEMOE_RUNS") or PROJECT_ROOT / "runs").resolve()


@dataclass
class Ctx:
    cfg: Config
    runs_dir: Path
    out: Path
    store: Path
    tracking_uri: str
    timings: dict[str, float] = field(default_factory=dict)
    task_states: dict[str, str] = field(default_factory=dict)
    pending: list = field(default_factory=list)
    runs: list = field(default_factory=list)  # nested MLflow runs started (closed on an interruption)

    @classmethod
    def make(cls, cfg: Config, out: str | None, runs_dir: str | None) -> "Ctx":
        rd = Path(runs_dir).resolve() if runs_dir else default_runs_dir()
        o = Path(out).resolve() if out else rd / config_hash(cfg)
        o.mkdir(parents=True, exist_ok=True)
        uri = cfg.tracking.mlflow_uri or default_uri(rd)
        _clean_tmp(rd / "store" / "tmp")
        return cls(cfg, rd, o, rd / "store", uri)

    def tick(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    def call(self, fn, label: str, phase: str, **params) -> dict:
        """Run a cached task; record whether it was a cache hit; recompute if its files are gone or
        damaged (``tasks.integrity``). A result record memoe did not write is set aside unread."""
        t = fn.with_options(result_storage=self.store / "results")
        t0 = time.perf_counter()
        check_record(self.store / "results", fn.cache_key_fn(None, params))
        state = t(**params, return_state=True)
        res = state.result()
        if not outputs_intact(res):
            state = t.with_options(refresh_cache=True)(**params, return_state=True)
            res = state.result()
        self.tick(phase, time.perf_counter() - t0)
        if phase not in ("train", "evaluate") and state.name != "Cached" and isinstance(res, dict) \
                and isinstance(res.get("seconds"), (int, float)):
            self.tick(f"{phase}_compute", res["seconds"])  # the library's own work inside the task
        self.task_states[label] = state.name
        return res


def _clean_tmp(folder: Path, older_than_s: float = 6 * 3600) -> None:
    """Half-written task outputs of killed studies (never of a running one: those are young)."""
    if not folder.is_dir():
        return
    now = time.time()
    for p in folder.iterdir():
        try:
            if now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        except OSError:
            pass


# ------------------------------------------------------------------ tracking tasks (never cached)

@task(name="track", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def track(tracking: dict, run_id: str | None, metrics: dict | None = None, step: int = 0,
          params: dict | None = None, tags: dict | None = None, artifacts: list | None = None,
          end: str | None = None) -> None:
    """Log to an MLflow run given by id (tasks cannot see the flow thread's active run)."""
    tr = tracker(**tracking)
    if params:
        tr.params(run_id, params)
    if tags:
        tr.tags(run_id, tags)
    if metrics:
        tr.metrics(run_id, metrics, step)
    for a in artifacts or []:
        tr.artifact(run_id, a[0], a[1])
    if end:
        tr.end(run_id, end)


def _tracking(ctx: Ctx) -> dict:
    return {"uri": ctx.tracking_uri, "experiment": ctx.cfg.tracking.experiment, "runs_dir": str(ctx.runs_dir),
            "enabled": ctx.cfg.tracking.enabled}


def _metric_dict(summary: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            out.update(_metric_dict(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = float(v)
    return out


def _mark_stale_runs(ctx: Ctx, tr, chash: str) -> None:
    """Runs of this config left RUNNING by a killed process on this host become KILLED."""
    if not tr.enabled:
        return
    try:
        runs = tr.client.search_runs([tr.experiment_id], f"tags.`memoe.config_hash` = '{chash}' "
                                     "and attributes.status = 'RUNNING'", max_results=50)
    except Exception:  # noqa: BLE001 - best effort
        return
    host = socket.gethostname()
    for r in runs:
        pid = r.data.tags.get("memoe.pid")
        if r.data.tags.get("memoe.host") == host and pid and pid.isdigit() and not _alive(int(pid)):
            _end_tree(tr, r.info.run_id, "KILLED")


def _end_tree(tr, run_id: str | None, status: str) -> None:
    """End a run and every nested run below it (method runs, round runs) still RUNNING."""
    if not run_id:
        return
    try:
        children = tr.client.search_runs([tr.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}' "
                                         "and attributes.status = 'RUNNING'", max_results=1000)
    except Exception:  # noqa: BLE001 - best effort: the run itself is still ended
        children = []
    for c in children:
        _end_tree(tr, c.info.run_id, status)
    tr.end(run_id, status)


def _interrupted(ctx: "Ctx", rid: str | None, exc: BaseException) -> None:
    """A study that stops early: its runs end KILLED (a signal, Ctrl-C) or FAILED (an error), the
    parent and every nested run alike."""
    from prefect.exceptions import ExternalSignal

    status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit, ExternalSignal)) else "FAILED"
    tr = tracker(**_tracking(ctx))
    if not tr.enabled:
        return
    for r in ctx.runs:
        try:
            if tr.client.get_run(r).info.status == "RUNNING":
                tr.end(r, status)
        except Exception:  # noqa: BLE001 - best effort
            pass
    _end_tree(tr, rid, status)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------ the shared steps

def _prepare(ctx: Ctx) -> tuple[dict, dict, dict | None]:
    cfg = ctx.cfg
    rounds = cfg.protocol.rounds if cfg.protocol.mode == "sequential" else 1
    batch = cfg.edits_per_round()
    md = cfg.model.model_dump(mode="json")
    data = ctx.call(steps.prepare_dataset, "prepare_dataset", "prepare", data_cfg=cfg.data.model_dump(mode="json"),
                    model_cfg=md, rounds=rounds, batch_size=batch, store=str(ctx.store))
    base = ctx.call(steps.base_locality, "base_locality", "locality_base", edits=data["edits"], model_cfg=md,
                    batch_size=cfg.eval.batch_size, store=str(ctx.store), threads=cfg.threads)
    anchors = None
    methods = cfg.methods or [cfg.method]
    if any(m.name == "memoe" for m in methods) and steps.anchors_available():
        anchors = ctx.call(steps.extract_anchors, "extract_anchors", "anchors", edits=data["edits"],
                           store=str(ctx.store))
    return data, base, anchors


def _run_rounds(ctx: Ctx, method, data: dict, base: dict, parent_run: str | None, label: str = "") -> dict:
    """Train round t from state t-1 and evaluate it, for every round; log a nested run per round."""
    cfg, log = ctx.cfg, get_run_logger()
    tracking = _tracking(ctx)
    tr = tracker(**tracking)
    md, mc, ec = cfg.model.model_dump(mode="json"), method.model_dump(mode="json"), cfg.eval.model_dump(mode="json")
    prev, rounds, table_path = None, [], None
    n_rounds, batch = len(data["rounds"]), data["n_edits"] // len(data["rounds"])
    train_compute = eval_compute = peak_mb = 0.0
    pfx = f"{label}." if label else ""
    for t in range(n_rounds):
        tr_res = ctx.call(steps.train_round, f"{pfx}train_round_{t}", "train", round_index=t,
                          records=data["rounds"][t], prev_state=prev, method_cfg=mc, seed=cfg.seed, model_cfg=md,
                          store=str(ctx.store), threads=cfg.threads)
        ev = ctx.call(steps.evaluate_round, f"{pfx}evaluate_round_{t}", "evaluate", round_index=t,
                      rounds=data["rounds"], state=tr_res["state"], base=base["table"], method_cfg=mc, eval_cfg=ec,
                      seed=cfg.seed, model_cfg=md, store=str(ctx.store), threads=cfg.threads)
        prev, table_path = tr_res["state"], ev["table"]
        train_compute += tr_res["seconds"]
        peak_mb = max(peak_mb, tr_res.get("peak_memory_mb") or 0.0)
        eval_compute += ev["seconds"]
        import polars as pl

        summ = report.summaries(pl.read_parquet(ev["table"]))
        entry = {"round": t, "edits_so_far": (t + 1) * batch, **summ, "n_scored": ev["n_scored"],
                 "n_earlier_scored": ev["n_earlier_scored"], "train": tr_res["stats"],
                 "diagnostics": ev.get("diagnostics") or {},
                 "cached": {"train": ctx.task_states[f"{pfx}train_round_{t}"] == "Cached",
                            "evaluate": ctx.task_states[f"{pfx}evaluate_round_{t}"] == "Cached"}}
        rounds.append(entry)
        log.info(f"{label or method.name} round {t + 1}/{n_rounds}: {entry['edits_so_far']} edits, "
                 + ", ".join(f"{m}={entry[m]:.3f}" for m in report.HEADLINE if m in entry)
                 + (" (cached)" if entry["cached"]["train"] and entry["cached"]["evaluate"] else ""))
        t0 = time.perf_counter()
        rid = tr.start(f"round-{t}", {"memoe.round": str(t), "memoe.method": method.name}, parent=parent_run)
        ctx.runs.append(rid)
        metrics = _metric_dict({k: v for k, v in summ.items()}) | {
            f"train.{k}": v for k, v in _metric_dict(tr_res["stats"]).items()} | {
            f"diag.{k}": v for k, v in _metric_dict(ev.get("diagnostics") or {}).items()} | {
            "train.seconds": tr_res["seconds"], "eval.seconds": ev["seconds"],
            "eval.n_scored": ev["n_scored"], "eval.retention_sample_size": ev["n_earlier_scored"]}
        ctx.pending.append(track.submit(tracking, rid, metrics=metrics, step=entry["edits_so_far"],
                                        params={"round": t, "edits_in_round": batch},
                                        artifacts=[(ev["table"], "per_edit")], end="FINISHED"))
        ctx.pending.append(track.submit(tracking, parent_run, step=entry["edits_so_far"],
                                        metrics=_metric_dict({k: summ[k] for k in summ if k in report.HEADLINE
                                                              or k in ("avg", "earlier", "current")})))
        ctx.tick("tracking", time.perf_counter() - t0)
    import polars as pl

    final = {k: v for k, v in report.summaries(pl.read_parquet(table_path)).items()
             if not isinstance(v, dict)}
    costs = {"edit_s_per_100": round(100 * train_compute / max(1, data["n_edits"]), 2),
             "peak_memory_mb": round(peak_mb, 1)}
    return {"final": final, "rounds": rounds, "state": prev, "table": table_path, "costs": costs,
            "compute": {"train_compute": train_compute, "evaluate_compute": eval_compute}}


def _write_common(ctx: Ctx, results: dict) -> None:
    (ctx.out / "config.yaml").write_text(yaml.safe_dump(ctx.cfg.to_dict(), sort_keys=False))
    (ctx.out / "results.json").write_text(json.dumps(results, indent=2, default=str))


def _start_parent(ctx: Ctx, kind: str, data: dict | None = None) -> str | None:
    cfg, chash = ctx.cfg, config_hash(ctx.cfg)
    tr = tracker(**_tracking(ctx))
    _mark_stale_runs(ctx, tr, chash)
    tags = {"memoe.config_hash": chash, "memoe.git_commit": git_commit(), "memoe.model": cfg.model.name,
            "memoe.dataset": Path(cfg.data.path).name, "memoe.data_format": cfg.data.format,
            "memoe.protocol": cfg.protocol.mode, "memoe.flow": kind, "memoe.host": socket.gethostname(),
            "memoe.pid": str(os.getpid()), "memoe.out": str(ctx.out),
            "memoe.method": ",".join(m.name for m in (cfg.methods or [cfg.method]))}
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            tags["prefect.flow_run_id"] = str(flow_run.id)
            tags["prefect.root_flow_run_id"] = str(flow_run.root_flow_run_id or flow_run.id)
    except Exception:  # noqa: BLE001
        pass
    rid = tr.start(f"{kind}-{chash}", tags)
    tr.params(rid, flatten(cfg.to_dict()))
    return rid


def _finish_parent(ctx: Ctx, rid: str | None, data: dict, results: dict, extra: list[tuple[str, str | None]]) -> None:
    tr = tracker(**_tracking(ctx))
    t0 = time.perf_counter()
    for f in ctx.pending:
        f.result()
    ctx.pending.clear()
    if rid:
        try:
            tr.dataset(rid, data["edits"], name=f"{Path(ctx.cfg.data.path).stem}-{data['frame_hash']}",
                       source=str(resolve_path(ctx.cfg.data.path)))
        except Exception as e:  # noqa: BLE001 - the dataset input is informative, never fatal
            get_run_logger().warning(f"could not log the dataset input: {e}")
        tr.tags(rid, {"memoe.cached_tasks": str(sum(s == "Cached" for s in ctx.task_states.values())),
                      "memoe.tasks": str(len(ctx.task_states)), "memoe.n_edits": str(data["n_edits"])})
        tr.metrics(rid, {"final." + k: v for k, v in _metric_dict(results.get("final", {})).items()},
                   step=data["n_edits"])
        _write_common(ctx, results)
        for path, folder in [(ctx.out / "config.yaml", None), (ctx.out / "results.json", None)] + extra:
            tr.artifact(rid, path, folder)
        tr.end(rid, "FINISHED")
    ctx.tick("tracking", time.perf_counter() - t0)


def _results_base(ctx: Ctx, rid: str | None) -> dict:
    return {"config_hash": config_hash(ctx.cfg), "protocol": ctx.cfg.protocol.mode,
            "mlflow": {"tracking_uri": ctx.tracking_uri if ctx.cfg.tracking.enabled else None, "run_id": rid,
                       "experiment": ctx.cfg.tracking.experiment},
            "out": str(ctx.out)}


def _timings(ctx: Ctx, t_start: float, compute: dict) -> dict:
    tm = {k: round(v, 3) for k, v in ctx.timings.items()}
    tm["flow_total"] = round(time.perf_counter() - t_start, 3)
    tm.update({k: round(v, 3) for k, v in compute.items()})
    return tm


def _single(config: dict, out: str | None, runs_dir: str | None, kind: str) -> dict:
    t_start = time.perf_counter()
    cfg = Config.model_validate(config)
    ctx = Ctx.make(cfg, out, runs_dir)
    rid = _start_parent(ctx, kind)
    try:
        data, base, anchors = _prepare(ctx)
        res = _run_rounds(ctx, cfg.method, data, base, rid)
        results = _results_base(ctx, rid) | {
            "method": cfg.method.name, "final": res["final"], "rounds": res["rounds"],
            "data": {k: data[k] for k in ("n_edits", "n_read", "n_kept", "n_skipped", "frame_hash")},
            "anchors": anchors["coverage"] if anchors else None, "tasks": ctx.task_states}
        shutil.copyfile(res["table"], ctx.out / "per_edit.parquet")
        plots = [(report.rounds_plot(res["rounds"], ctx.out / "rounds.png",
                                     f"{cfg.method.name} on {Path(cfg.data.path).name} ({kind})"), "plots")]
        el = report.expert_load_plot(res["rounds"], ctx.out / "expert_load.png")
        if el:
            plots.append((el, "plots"))
        extra = [(str(ctx.out / "per_edit.parquet"), None), (res["state"], "adapter")] + \
            [(str(p), f) for p, f in plots] + ([(anchors["table"], "anchors")] if anchors else [])
        results["timings"] = _timings(ctx, t_start, res["compute"])
        _write_common(ctx, results)
        _finish_parent(ctx, rid, data, results, extra)
        results["timings"] = _timings(ctx, t_start, res["compute"])
        _write_common(ctx, results)
        return results
    except BaseException as e:
        _interrupted(ctx, rid, e)
        raise


@flow(name="batch_edit")
def batch_edit(config: dict, out: str | None = None, runs_dir: str | None = None) -> dict:
    """All edits in one batch, then evaluation (the batch-editing protocol)."""
    cfg = Config.model_validate(config)
    cfg.protocol.mode = "batch"
    return _single(cfg.to_dict(), out, runs_dir, "batch")


@flow(name="sequential_study")
def sequential_study(config: dict, out: str | None = None, runs_dir: str | None = None) -> dict:
    """T rounds of B edits; round t's editor state feeds round t+1; evaluation after every round
    on the round's edits and the earlier ones (retention)."""
    return _single(config, out, runs_dir, "sequential")


@flow(name="compare")
def compare(config: dict, out: str | None = None, runs_dir: str | None = None) -> dict:
    """Several methods (``methods:``) on the same edits and protocol, side by side."""
    t_start = time.perf_counter()
    cfg = Config.model_validate(config)
    ctx = Ctx.make(cfg, out, runs_dir)
    tracking = _tracking(ctx)
    tr = tracker(**tracking)
    rid = _start_parent(ctx, "compare")
    try:
        data, base, anchors = _prepare(ctx)
        methods: dict[str, Any] = {}
        table_rows, extra, compute = [], [], {}
        names = [m.name for m in cfg.methods]
        for i, m in enumerate(cfg.methods):
            label = m.name if names.count(m.name) == 1 else f"{m.name}-{i}"
            mrid = tr.start(label, {"memoe.method": m.name}, parent=rid)
            ctx.runs.append(mrid)
            if mrid:
                tr.params(mrid, flatten({"method": m.model_dump(mode="json")}))
            before = dict(ctx.timings)
            res = _run_rounds(ctx, m, data, base, mrid, label)
            tm = {k: round(v - before.get(k, 0.0), 3) for k, v in ctx.timings.items()}
            tm.update({k: round(v, 3) for k, v in res["compute"].items()})
            for k, v in res["compute"].items():
                compute[k] = compute.get(k, 0.0) + v
            methods[label] = {"method": m.model_dump(mode="json"), "final": res["final"], "rounds": res["rounds"],
                              "timings": tm, "costs": res["costs"]}
            ctx.pending.append(track.submit(tracking, mrid, metrics={
                "final." + k: v for k, v in _metric_dict(res["final"] | res["costs"]).items()}, step=data["n_edits"],
                artifacts=[(res["state"], "adapter"), (res["table"], "per_edit")], end="FINISHED"))
            table_rows.append({"method": label, **{k: res["final"].get(k) for k in report.HEADLINE + ["avg", "n_edits"]},
                               **res["costs"]})
        import polars as pl

        cols = [c for c in report.HEADLINE + ["avg"] + report.COSTS if any(r.get(c) is not None for r in table_rows)]
        md_text = (f"# Comparison ({cfg.protocol.mode}, {data['n_edits']} edits, {Path(cfg.data.path).name}, "
                   f"{cfg.model.name})\n\n" + report.markdown_table(table_rows, cols, "method") + "\n")
        (ctx.out / "comparison.md").write_text(md_text)
        pl.DataFrame(table_rows).write_parquet(ctx.out / "comparison.parquet")
        report.compare_plot({r["method"]: r for r in table_rows}, ctx.out / "comparison.png")
        extra = [(str(ctx.out / n), None) for n in ("comparison.md", "comparison.parquet", "comparison.png")]
        results = _results_base(ctx, rid) | {
            "methods": methods, "tasks": ctx.task_states,
            "data": {k: data[k] for k in ("n_edits", "n_read", "n_kept", "n_skipped", "frame_hash")},
            "anchors": anchors["coverage"] if anchors else None}
        results["timings"] = _timings(ctx, t_start, compute)
        _finish_parent(ctx, rid, data, results, extra)
        results["timings"] = _timings(ctx, t_start, compute)
        _write_common(ctx, results)
        return results
    except BaseException as e:
        _interrupted(ctx, rid, e)
        raise


def flow_for(cfg: Config):
    if cfg.methods:
        return compare
    return sequential_study if cfg.protocol.mode == "sequential" else batch_edit


@flow(name="memoe-study")
def study(config_path: str | None = "configs/quickstart.yaml", overrides: list[str] | None = None,
          out: str | None = None, runs_dir: str | None = None) -> dict:
    """Deployment entry point: load a config file (relative to the project) plus overrides and run
    the matching flow (compare when ``methods`` is set, else batch or sequential)."""
    from memoe.config import load_config

    path = resolve_path(config_path) if config_path else None
    cfg = load_config(path, overrides or [])
    return flow_for(cfg)(cfg.to_dict(), out, runs_dir)
