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
from flows.hooks import HOOKS
from memoe.config import METHODS, Config, config_hash, flatten, resolve_path
from tasks import steps
from tasks.integrity import check_record, outputs_intact
from tasks.progress import Reporter
from tasks.tracking import git_commit, resolve_uri, tracker

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
    inline: bool = False  # inside a task (a Dask worker): tracking calls run in place, not submitted
    name: str | None = None  # the MLflow run name (--name); default: the study's settings
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags (--tag k=v)
    runs: list = field(default_factory=list)  # nested MLflow runs started (closed on an interruption)

    def track(self, *args, **kwargs) -> None:
        if self.inline:
            track(*args, **kwargs)
        else:
            self.pending.append(track.submit(*args, **kwargs))

    @classmethod
    def make(
        cls, cfg: Config, out: str | None, runs_dir: str | None, name: str | None = None, tags: dict | None = None
    ) -> "Ctx":
        rd = Path(runs_dir).resolve() if runs_dir else default_runs_dir()
        o = Path(out).resolve() if out else rd / config_hash(cfg)
        o.mkdir(parents=True, exist_ok=True)
        uri = resolve_uri(cfg.tracking.mlflow_uri, rd)
        _clean_tmp(rd / "store" / "tmp")
        return cls(cfg, rd, o, rd / "store", uri, name=name, tags={str(k): str(v) for k, v in (tags or {}).items()})

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
        if (
            phase not in ("train", "evaluate")
            and state.name != "Cached"
            and isinstance(res, dict)
            and isinstance(res.get("seconds"), (int, float))
        ):
            self.tick(f"{phase}_compute", res["seconds"])  # the library's own work inside the task
        self.task_states[label] = state.name
        return res


def _artifact_key(name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for this flow run."""
    import re

    from prefect.runtime import flow_run

    return re.sub(r"[^a-z0-9-]+", "-", f"memoe-{str(flow_run.id or '')[:8]}-{name}".lower()).strip("-")


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
def track(
    tracking: dict,
    run_id: str | None,
    metrics: dict | None = None,
    step: int = 0,
    params: dict | None = None,
    tags: dict | None = None,
    artifacts: list | None = None,
    end: str | None = None,
) -> None:
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
    return {
        "uri": ctx.tracking_uri,
        "experiment": ctx.cfg.tracking.experiment,
        "runs_dir": str(ctx.runs_dir),
        "enabled": ctx.cfg.tracking.enabled,
    }


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
    runs = _running(tr, f"tags.`memoe.config_hash` = '{chash}'", 50)
    if runs is None:
        return
    host = socket.gethostname()
    for r in runs:
        pid = r.data.tags.get("memoe.pid")
        if r.data.tags.get("memoe.host") == host and pid and pid.isdigit() and not _alive(int(pid)):
            _end_tree(tr, r.info.run_id, "KILLED")


def _running(tr, where: str, limit: int) -> list | None:
    """The RUNNING runs of the study's experiment that match ``where`` (None: the store could not be read;
    best effort)."""
    try:
        return tr.client.search_runs(
            [tr.experiment_id], f"{where} and attributes.status = 'RUNNING'", max_results=limit
        )
    except Exception:  # noqa: BLE001 - best effort
        return None


def _end_tree(tr, run_id: str | None, status: str) -> None:
    """End a run and every nested run below it (method runs, round runs) still RUNNING."""
    if not run_id:
        return
    for c in _running(tr, f"tags.`mlflow.parentRunId` = '{run_id}'", 1000) or []:  # the run itself is ended anyway
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
    data = ctx.call(
        steps.prepare_dataset,
        "prepare_dataset",
        "prepare",
        data_cfg=cfg.data.model_dump(mode="json"),
        model_cfg=md,
        rounds=rounds,
        batch_size=batch,
        store=str(ctx.store),
        re_edit=[cfg.protocol.re_edit.round, cfg.protocol.re_edit.of_round] if cfg.protocol.re_edit else None,
    )
    base = ctx.call(
        steps.base_locality,
        "base_locality",
        "locality_base",
        edits=data["edits"],
        model_cfg=md,
        batch_size=cfg.eval.batch_size,
        store=str(ctx.store),
        threads=cfg.threads,
    )
    anchors = None
    methods = cfg.methods or [cfg.method]
    if any(METHODS[m.name].editor_class().uses_anchors for m in methods) and steps.anchors_available():
        anchors = ctx.call(
            steps.extract_anchors, "extract_anchors", "anchors", edits=data["edits"], store=str(ctx.store)
        )
    return data, base, anchors


def _run_rounds(ctx: Ctx, method, data: dict, base: dict, parent_run: str | None, label: str = "") -> dict:
    """Train round t from state t-1 and evaluate it, for every round; log a nested run per round.
    The protocol itself (the round's seed, what is scored, re-edits) is ``memoe.protocol``, called by
    the tasks; this loop is its cached form: one task per round and step, so a study resumes where it
    stopped (the in-process form is ``memoe.protocol.run_sequential``)."""
    cfg, log = ctx.cfg, get_run_logger()
    tracking = _tracking(ctx)
    tr = tracker(**tracking)
    md, mc, ec = cfg.model.model_dump(mode="json"), method.model_dump(mode="json"), cfg.eval.model_dump(mode="json")
    prev, rounds, table_path = None, [], None
    frozen: list[str] = []  # the unedited model's states below the edit, per round (memoe.frozen)
    memo: list[str] = []  # the edited model's results that still hold, per round (memoe.memo)
    n_rounds, batch = len(data["rounds"]), data["n_edits"] // len(data["rounds"])
    train_compute = eval_compute = peak_mb = setup_s = 0.0
    pfx = f"{label}." if label else ""
    common = dict(method_cfg=mc, seed=cfg.seed, model_cfg=md, store=str(ctx.store), threads=cfg.threads)
    bar = Reporter(f"{label or method.name}: rounds", 2 * n_rounds, key=_artifact_key(f"{label or method.name}-rounds"))
    for t in range(n_rounds):
        bar.update(2 * t, f"{label or method.name}: round {t + 1}/{n_rounds} training")
        progress = {
            "tracking": tracking,
            "run_id": parent_run,
            "label": label,
            "step_offset": t * int(mc.get("steps") or 1),
        }
        tr_res = ctx.call(
            steps.train_round,
            f"{pfx}train_round_{t}",
            "train",
            round_index=t,
            records=data["rounds"][t],
            prev_state=prev,
            progress=progress,
            **common,
        )
        bar.update(2 * t + 1, f"{label or method.name}: round {t + 1}/{n_rounds} evaluation", force=True)
        ev = ctx.call(
            steps.evaluate_round,
            f"{pfx}evaluate_round_{t}",
            "evaluate",
            round_index=t,
            rounds=data["rounds"],
            state=tr_res["state"],
            base=base["table"],
            eval_cfg=ec,
            frozen=list(frozen),
            memo=list(memo),
            **common,
        )
        prev, table_path = tr_res["state"], ev["table"]
        if ev.get("frozen"):
            frozen.append(ev["frozen"])
        if ev.get("memo"):
            memo.append(ev["memo"])
        train_compute += tr_res["seconds"]
        setup_s += float((tr_res["stats"] or {}).get("setup_s") or 0.0)  # one-time cost (MEMIT's key statistics)
        peak_mb = max(peak_mb, tr_res.get("peak_memory_mb") or 0.0)
        eval_compute += ev["seconds"]
        import polars as pl

        summ = report.summaries(pl.read_parquet(ev["table"]))
        entry = {
            "round": t + 1,
            "edits_so_far": (t + 1) * batch,
            **summ,
            "n_scored": ev["n_scored"],
            "n_earlier_scored": ev["n_earlier_scored"],
            "train": tr_res["stats"],
            "diagnostics": ev.get("diagnostics") or {},
            "evaluation": {  # seconds; sequences whose states below the edit were reused / computed; and
                # sequences (teacher-forced and generated) whose results still held / were scored
                "seconds": ev["seconds"],
                "states_reused": ev.get("frozen_reused", 0),
                "states_computed": ev.get("frozen_computed", 0),
                "scores_reused": ev.get("scores_reused", 0),
                "scores_computed": ev.get("scores_computed", 0),
            },
            "cached": {
                "train": ctx.task_states[f"{pfx}train_round_{t}"] == "Cached",
                "evaluate": ctx.task_states[f"{pfx}evaluate_round_{t}"] == "Cached",
            },
        }
        rounds.append(entry)
        log.info(
            f"{label or method.name} round {t + 1}/{n_rounds}: {entry['edits_so_far']} edits, "
            + ", ".join(f"{m}={entry[m]:.3f}" for m in report.HEADLINE if m in entry)
            + (" (cached)" if entry["cached"]["train"] and entry["cached"]["evaluate"] else "")
        )
        t0 = time.perf_counter()
        rid = tr.start(f"round-{t + 1}", {"memoe.round": str(t + 1), "memoe.method": method.name}, parent=parent_run)
        ctx.runs.append(rid)
        metrics = (
            _metric_dict({k: v for k, v in summ.items()})
            | {f"train.{k}": v for k, v in _metric_dict(tr_res["stats"]).items()}
            | {f"diag.{k}": v for k, v in _metric_dict(ev.get("diagnostics") or {}).items()}
            | {
                "train.seconds": tr_res["seconds"],
                "eval.seconds": ev["seconds"],
                "eval.n_scored": ev["n_scored"],
                "eval.retention_sample_size": ev["n_earlier_scored"],
            }
        )
        ctx.track(
            tracking,
            rid,
            metrics=metrics,
            step=entry["edits_so_far"],
            params={"round": t + 1, "edits_in_round": batch},
            artifacts=[(ev["table"], "per_edit")],
            end="FINISHED",
        )
        ctx.track(
            tracking,
            parent_run,
            step=entry["edits_so_far"],
            metrics=_metric_dict(
                {k: summ[k] for k in summ if k in report.HEADLINE or k in (*report.AVERAGES, "earlier", "current")}
            ),
        )
        ctx.tick("tracking", time.perf_counter() - t0)
        bar.update(2 * t + 2, force=True)
    bar.close()
    import polars as pl

    final = {k: v for k, v in report.summaries(pl.read_parquet(table_path)).items() if not isinstance(v, dict)}
    costs = {
        "setup_s": round(setup_s, 2),
        "edit_s_per_100": round(100 * (train_compute - setup_s) / max(1, data["n_edits"]), 2),
        "peak_memory_mb": round(peak_mb, 1),
    }
    return {
        "final": final,
        "rounds": rounds,
        "state": prev,
        "table": table_path,
        "costs": costs,
        "compute": {"train_compute": train_compute, "evaluate_compute": eval_compute},
    }


def _write_common(ctx: Ctx, results: dict) -> None:
    (ctx.out / "config.yaml").write_text(yaml.safe_dump(ctx.cfg.to_dict(), sort_keys=False))
    (ctx.out / "results.json").write_text(json.dumps(results, indent=2, default=str))


def method_labels(cfg: Config) -> list[str]:
    """compare: each method's label (its name, or name-i when a method appears twice)."""
    names = [m.name for m in cfg.methods or [cfg.method]]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def default_run_name(cfg: Config) -> str:
    """e.g. ``memoe-sequential-3x5-zsre-smollm2-135m``: the settings that tell studies apart."""
    rounds = cfg.protocol.rounds if cfg.protocol.mode == "sequential" else 1
    model = cfg.model.name.replace("embedded:", "").rstrip("/").rsplit("/", 1)[-1]
    data = "+".join(cfg.data.mix) if cfg.data.mix else cfg.data.format
    return f"{'+'.join(method_labels(cfg))}-{cfg.protocol.mode}-{rounds}x{cfg.edits_per_round()}-{data}-{model}"


def parent_params(cfg: Config) -> dict[str, Any]:
    """The parent run's params: the flattened config; for compare each method's settings under
    ``methods.<label>.`` instead of the unused default ``method.*``."""
    flat = {k: v for k, v in flatten(cfg.to_dict()).items() if k != "methods"}
    if cfg.methods:
        flat = {k: v for k, v in flat.items() if not k.startswith("method.")}
        for label, m in zip(method_labels(cfg), cfg.methods):
            flat |= flatten(m.model_dump(mode="json"), f"methods.{label}.")
    return flat


def _first_finished(tr, chash: str) -> str | None:
    """The first FINISHED study of this config that is not itself a rerun, if any."""
    try:
        runs = tr.client.search_runs(
            [tr.experiment_id],
            f"tags.`memoe.config_hash` = '{chash}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time ASC"],
            max_results=50,
        )
    except Exception:  # noqa: BLE001 - best effort
        return None
    return next(
        (
            r.info.run_id
            for r in runs
            if "memoe.rerun_of" not in r.data.tags and "mlflow.parentRunId" not in r.data.tags
        ),
        None,
    )


def _start_parent(ctx: Ctx, kind: str, data: dict | None = None) -> str | None:
    cfg, chash = ctx.cfg, config_hash(ctx.cfg)
    tr = tracker(**_tracking(ctx))
    _mark_stale_runs(ctx, tr, chash)
    if not tr.enabled:
        return None
    tags = {
        "memoe.config_hash": chash,
        "memoe.git_commit": git_commit(),
        "memoe.model": cfg.model.name,
        "memoe.dataset": cfg.data.label,
        "memoe.data_format": "+".join(f for _, f, _ in cfg.data.files),
        "memoe.protocol": cfg.protocol.mode,
        "memoe.flow": kind,
        "memoe.host": socket.gethostname(),
        "memoe.pid": str(os.getpid()),
        "memoe.out": str(ctx.out),
        "memoe.method": ",".join(m.name for m in (cfg.methods or [cfg.method])),
    } | ctx.tags
    name = ctx.name or default_run_name(cfg)
    first = _first_finished(tr, chash)
    if first:  # the same config again: marked, so that `memoe ls` and the UI tell it from the first
        tags["memoe.rerun_of"] = first
        name += " (rerun)"
    try:
        from prefect.runtime import flow_run

        from flows.sweep import current_sweep_tags

        if flow_run.id:
            tags["prefect.flow_run_id"] = str(flow_run.id)
            tags["prefect.root_flow_run_id"] = str(flow_run.root_flow_run_id or flow_run.id)
            tags |= current_sweep_tags()  # a sweep's cell: memoe.sweep + the sweep run as parent
    except Exception:  # noqa: BLE001
        pass
    rid = tr.start(name, tags)
    tr.params(rid, parent_params(cfg))
    return rid


def _finish_parent(ctx: Ctx, rid: str | None, data: dict, results: dict, extra: list[tuple[str, str | None]]) -> None:
    tr = tracker(**_tracking(ctx))
    t0 = time.perf_counter()
    for f in ctx.pending:
        f.result()
    ctx.pending.clear()
    if rid:
        try:
            tr.dataset(
                rid,
                data["edits"],
                name=f"{Path(ctx.cfg.data.label).stem}-{data['frame_hash']}",
                source=" + ".join(str(f) for f, _, _ in ctx.cfg.data.files),
            )
        except Exception as e:  # noqa: BLE001 - the dataset input is informative, never fatal
            get_run_logger().warning(f"could not log the dataset input: {e}")
        n_cached = sum(s == "Cached" for s in ctx.task_states.values())
        tr.tags(
            rid,
            {
                "memoe.cached_tasks": str(n_cached),
                "memoe.cached_rerun": str(n_cached == len(ctx.task_states)).lower(),
                "memoe.tasks": str(len(ctx.task_states)),
                "memoe.n_edits": str(data["n_edits"]),
            },
        )
        tr.metrics(
            rid, {"final." + k: v for k, v in _metric_dict(results.get("final", {})).items()}, step=data["n_edits"]
        )
        _write_common(ctx, results)
        for path, folder in [(ctx.out / "config.yaml", None), (ctx.out / "results.json", None)] + extra:
            tr.artifact(rid, path, folder)
        tr.end(rid, "FINISHED")
    ctx.tick("tracking", time.perf_counter() - t0)
    try:
        from flows import artifacts

        artifacts.publish(
            results, tr.client.get_run(rid).info.run_name if rid else config_hash(ctx.cfg), tr.experiment_id
        )
    except Exception as e:  # noqa: BLE001 - the Prefect UI's view is informative, never fatal
        get_run_logger().warning(f"could not publish the Prefect artifacts: {e}")


def _results_base(ctx: Ctx, rid: str | None) -> dict:
    return {
        "config_hash": config_hash(ctx.cfg),
        "protocol": ctx.cfg.protocol.mode,
        "mlflow": {
            "tracking_uri": ctx.tracking_uri if ctx.cfg.tracking.enabled else None,
            "run_id": rid,
            "experiment": ctx.cfg.tracking.experiment,
        },
        "out": str(ctx.out),
    }


def _timings(ctx: Ctx, t_start: float, compute: dict) -> dict:
    tm = {k: round(v, 3) for k, v in ctx.timings.items()}
    tm["flow_total"] = round(time.perf_counter() - t_start, 3)
    tm.update({k: round(v, 3) for k, v in compute.items()})
    return tm


def _single(
    config: dict, out: str | None, runs_dir: str | None, kind: str, name: str | None = None, tags: dict | None = None
) -> dict:
    t_start = time.perf_counter()
    cfg = Config.model_validate(config)
    ctx = Ctx.make(cfg, out, runs_dir, name, tags)
    rid = _start_parent(ctx, kind)
    try:
        data, base, anchors = _prepare(ctx)
        res = _run_rounds(ctx, cfg.method, data, base, rid)
        results = _results_base(ctx, rid) | {
            "method": cfg.method.name,
            "final": res["final"],
            "rounds": res["rounds"],
            "edited_model": res["state"],
            "data": {k: data[k] for k in ("n_edits", "n_read", "n_kept", "n_skipped", "frame_hash")},
            "anchors": anchors["coverage"] if anchors else None,
            "tasks": ctx.task_states,
        }
        shutil.copyfile(res["table"], ctx.out / "per_edit.parquet")
        plots = [
            (
                report.rounds_plot(
                    res["rounds"],
                    ctx.out / "rounds.png",
                    f"{report.method_title(cfg.method)}\n{cfg.data.label}, {kind}, {cfg.model.name}",
                ),
                "plots",
            )
        ]
        el = report.expert_load_plot(res["rounds"], ctx.out / "expert_load.png")
        if el:
            plots.append((el, "plots"))
        extra = (
            [(str(ctx.out / "per_edit.parquet"), None), (res["state"], "adapter")]
            + [(str(p), f) for p, f in plots]
            + ([(anchors["table"], "anchors")] if anchors else [])
        )
        results["timings"] = _timings(ctx, t_start, res["compute"])
        _write_common(ctx, results)
        _finish_parent(ctx, rid, data, results, extra)
        results["timings"] = _timings(ctx, t_start, res["compute"])
        _write_common(ctx, results)
        return results
    except BaseException as e:
        _interrupted(ctx, rid, e)
        raise


@flow(name="batch_edit", **HOOKS)
def batch_edit(
    config: dict, out: str | None = None, runs_dir: str | None = None, name: str | None = None, tags: dict | None = None
) -> dict:
    """All edits in one batch, then evaluation (the batch-editing protocol)."""
    cfg = Config.model_validate(config)
    cfg.protocol.mode = "batch"
    return _single(cfg.to_dict(), out, runs_dir, "batch", name, tags)


@flow(name="sequential_study", **HOOKS)
def sequential_study(
    config: dict, out: str | None = None, runs_dir: str | None = None, name: str | None = None, tags: dict | None = None
) -> dict:
    """T rounds of B edits; round t's editor state feeds round t+1; evaluation after every round
    on the round's edits and the earlier ones (retention)."""
    return _single(config, out, runs_dir, "sequential", name, tags)


def _one_method(ctx: Ctx, i: int, m, label: str, data: dict, base: dict, rid: str | None) -> dict:
    """One method of a comparison: its nested MLflow run, its rounds, its final figures."""
    tracking = _tracking(ctx)
    tr = tracker(**tracking)
    mrid = tr.start(label, {"memoe.method": m.name}, parent=rid)
    ctx.runs.append(mrid)
    if mrid:
        tr.params(mrid, flatten({"method": m.model_dump(mode="json")}))
    before = dict(ctx.timings)
    res = _run_rounds(ctx, m, data, base, mrid, label)
    tm = {k: round(v - before.get(k, 0.0), 3) for k, v in ctx.timings.items()}
    tm.update({k: round(v, 3) for k, v in res["compute"].items()})
    ctx.track(
        tracking,
        mrid,
        metrics={"final." + k: v for k, v in _metric_dict(res["final"] | res["costs"]).items()},
        step=data["n_edits"],
        artifacts=[(res["state"], "adapter"), (res["table"], "per_edit")],
        end="FINISHED",
    )
    return {
        "label": label,
        "compute": res["compute"],
        "entry": {
            "method": m.model_dump(mode="json"),
            "final": res["final"],
            "rounds": res["rounds"],
            "timings": tm,
            "costs": res["costs"],
            "worker": _worker_name(),
        },
        "row": {
            "method": label,
            **{k: res["final"].get(k) for k in report.HEADLINE + report.AVERAGES + ["n_edits"]},
            **res["costs"],
        },
    }


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return f"dask:{get_worker().name}:{os.getpid()}"
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


@task(name="method_study", cache_policy=NO_CACHE)
def method_study(ctx: Ctx, i: int, m, label: str, data: dict, base: dict, rid: str | None) -> dict:
    """``_one_method`` as a task, so a task runner (Dask) can run the methods side by side; its
    cached steps run as nested tasks in the worker, its tracking in place. Returns the method's
    result plus the timings and task states to merge into the flow's."""
    ctx = Ctx(ctx.cfg, ctx.runs_dir, ctx.out, ctx.store, ctx.tracking_uri, inline=True)
    import torch

    if ctx.cfg.threads:
        torch.set_num_threads(ctx.cfg.threads)
    out = _one_method(ctx, i, m, label, data, base, rid)
    return out | {"timings": ctx.timings, "task_states": ctx.task_states}


@flow(name="compare", **HOOKS)
def compare(
    config: dict,
    out: str | None = None,
    runs_dir: str | None = None,
    parallel: bool = False,
    name: str | None = None,
    tags: dict | None = None,
) -> dict:
    """Several methods (``methods:``) on the same edits and protocol, side by side. ``parallel``:
    the methods run as tasks on the flow's task runner (``with_options(task_runner=dask_runner(...))``),
    each in its own worker process; else one after the other in this process."""
    t_start = time.perf_counter()
    cfg = Config.model_validate(config)
    ctx = Ctx.make(cfg, out, runs_dir, name, tags)
    tracking = _tracking(ctx)
    tr = tracker(**tracking)
    rid = _start_parent(ctx, "compare")
    try:
        data, base, anchors = _prepare(ctx)
        methods: dict[str, Any] = {}
        table_rows, extra, compute = [], [], {}
        labels = method_labels(cfg)
        if parallel:
            futures = [method_study.submit(ctx, i, m, labels[i], data, base, rid) for i, m in enumerate(cfg.methods)]
            done = [f.result() for f in futures]
            for d in done:
                for k, v in d["timings"].items():
                    ctx.tick(k, v)
                ctx.task_states.update(d["task_states"])
        else:
            done = [_one_method(ctx, i, m, labels[i], data, base, rid) for i, m in enumerate(cfg.methods)]
        for d in done:
            for k, v in d["compute"].items():
                compute[k] = compute.get(k, 0.0) + v
            methods[d["label"]] = d["entry"]
            table_rows.append(d["row"])
        import polars as pl

        cols = [
            c for c in report.HEADLINE + report.AVERAGES + report.COSTS if any(r.get(c) is not None for r in table_rows)
        ]
        md_text = (
            f"# Comparison ({cfg.protocol.mode}, {data['n_edits']} edits, {cfg.data.label}, "
            f"{cfg.model.name})\n\n" + report.markdown_table(table_rows, cols, "method") + "\n"
        )
        (ctx.out / "comparison.md").write_text(md_text)
        pl.DataFrame(table_rows).write_parquet(ctx.out / "comparison.parquet")
        protocol = (
            f"{cfg.protocol.mode}, {len(data['rounds'])} x {data['n_edits'] // len(data['rounds'])} edits"
            if cfg.protocol.mode == "sequential"
            else f"batch of {data['n_edits']} edits"
        )
        report.compare_plot(
            {r["method"]: r for r in table_rows},
            ctx.out / "comparison.png",
            f"{cfg.data.label}, {protocol}, {cfg.model.name}",
        )
        plots = ["comparison.md", "comparison.parquet", "comparison.png"]
        if len(data["rounds"]) > 1:  # sequential: one retention curve per method
            report.retention_plot(
                {k: v["rounds"] for k, v in methods.items()},
                ctx.out / "retention.png",
                f"retention: {cfg.data.label}, {protocol}, {cfg.model.name}",
            )
            plots.append("retention.png")
        extra = [(str(ctx.out / n), None) for n in plots]
        if rid:  # each method's headline metrics and costs on the parent, prefixed by its label
            tr.metrics(
                rid,
                {
                    f"{r['method']}.{k}": r[k]
                    for r in table_rows
                    for k in report.HEADLINE + ["avg"] + report.COSTS
                    if isinstance(r.get(k), (int, float))
                },
                step=data["n_edits"],
            )
        results = _results_base(ctx, rid) | {
            "methods": methods,
            "tasks": ctx.task_states,
            "data": {k: data[k] for k in ("n_edits", "n_read", "n_kept", "n_skipped", "frame_hash")},
            "anchors": anchors["coverage"] if anchors else None,
        }
        results["timings"] = _timings(ctx, t_start, compute)
        _finish_parent(ctx, rid, data, results, extra)
        results["timings"] = _timings(ctx, t_start, compute)
        _write_common(ctx, results)
        return results
    except BaseException as e:
        _interrupted(ctx, rid, e)
        raise


def dask_runner(spec: str):
    """A ``prefect_dask.DaskTaskRunner`` from ``--dask SPEC``: ``N`` (a LocalCluster of N worker
    processes, one thread each), ``cuda`` (dask-cuda's LocalCUDACluster: one worker per GPU, each
    seeing only its own), or a scheduler address ``tcp://host:8786``."""
    from memoe.config import ConfigError

    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError("--dask: prefect-dask is not installed (pip install -e '.[team]')") from None
    # the workers report to this process's Prefect server (without it each would start its own)
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    if not api:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        api = server.api_url if server.running else None
    env = {"PREFECT_API_URL": api} if api else {}
    if spec.isdigit() and int(spec) >= 1:
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": int(spec), "threads_per_worker": 1, "processes": True, "env": env}
        )
    if spec == "cuda":
        return DaskTaskRunner(
            cluster_class="dask_cuda.LocalCUDACluster", cluster_kwargs={"threads_per_worker": 1, "env": env}
        )
    if "://" in spec:
        return DaskTaskRunner(address=spec)
    raise ConfigError(f"--dask {spec}: a number of local workers, 'cuda', or a scheduler address (tcp://host:port)")


def flow_for(cfg: Config, dask: str | None = None):
    """The flow that runs ``cfg``; with ``dask``, compare's methods in parallel on that task runner."""
    if cfg.methods:
        if dask:
            import functools

            return functools.partial(compare.with_options(task_runner=dask_runner(dask)), parallel=True)
        return compare
    if dask:
        from memoe.config import ConfigError

        raise ConfigError("--dask: only a comparison (methods:) has methods to run side by side")
    return sequential_study if cfg.protocol.mode == "sequential" else batch_edit


@flow(name="memoe-study", **HOOKS)
def study(
    config_path: str | None = "configs/quickstart.yaml",
    overrides: list[str] | None = None,
    out: str | None = None,
    runs_dir: str | None = None,
    dask: str | None = None,
    name: str | None = None,
    tags: dict | None = None,
) -> dict:
    """Deployment entry point: load a config file (relative to the project) plus overrides and run
    the matching flow (compare when ``methods`` is set, else batch or sequential). ``dask``: run a
    comparison's methods side by side on a Dask task runner (see ``dask_runner``)."""
    from memoe.config import load_config

    path = resolve_path(config_path) if config_path else None
    cfg = load_config(path, overrides or [])
    return flow_for(cfg, dask)(cfg.to_dict(), out, runs_dir, name=name, tags=tags)
