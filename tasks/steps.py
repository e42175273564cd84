"""The pipeline's Prefect tasks. Each one wraps a library call, writes its output under the store
folder with a content-addressed name and returns the path (plus small JSON-able facts).

    prepare_dataset   load + validate + sample + split the edits       -> data/<hash>/{edits,round_k}.parquet
    extract_anchors   knowledge anchor of every prompt (MEMoE only)    -> anchors/<hash>.parquet
    base_locality     the unedited model's locality argmax (once)      -> locality/<hash>.parquet
    train_round       editor state after round t (from state t-1)      -> states/<hash>/ (Editor.save)
    evaluate_round    per-edit metrics of round t's and earlier edits  -> evals/<hash>.parquet

Cache keys (``*_key``) hash what determines the output and nothing else: file contents, the
config parts the task reads, the model fingerprint and the code version. The store folder, run
ids and paths stay out of them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from tasks.integrity import intact
from tasks.keys import code_version, digest, file_digest, folder_digest, model_fingerprint

TRANSIENT = (OSError, TimeoutError, ConnectionError)
# OSErrors a second try cannot fix: a missing file stays missing, a permission stays refused
PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class DamagedStoreError(ValueError):
    """A store file does not have the content its name is the hash of (permanent: not retried)."""


def verified(path: str | Path) -> str:
    """``path`` if it has the content it is named by, else a DamagedStoreError naming it."""
    if not intact(path):
        raise DamagedStoreError(
            f"run store: {path} is damaged or missing (its content does not match the hash it "
            "is named by); delete it and run again to recompute it"
        )
    return str(path)


def _transient(task_, task_run, state) -> bool:
    """Retry only faults that a second try can fix (I/O, a locked database), not a bad config or a
    missing file."""
    try:
        state.result()
    except PERMANENT:
        return False
    except TRANSIENT:
        return True
    except Exception as e:  # noqa: BLE001
        return "database is locked" in str(e)
    return False


COMMON = dict(
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=_transient,
    cache_result_in_memory=False,
)


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=2)
def _load(name: str, device: str, dtype: str):
    from memoe.models import load_model

    return load_model(name, device, dtype)


def model_and_tokenizer(model_cfg: dict[str, Any], threads: int | None = None):
    import torch

    if threads:
        torch.set_num_threads(threads)
    return _load(model_cfg["name"], model_cfg["device"], model_cfg["dtype"])


def _model_key(model_cfg: dict[str, Any], store: str) -> dict[str, Any]:
    return {
        "fingerprint": model_fingerprint(model_cfg["name"], Path(store)),
        "device": model_cfg["device"],
        "dtype": model_cfg["dtype"],
    }


def method_from_dict(d: dict[str, Any]):
    from memoe.config import validate_method

    return validate_method(d)


def publish_file(tmp: Path, folder: Path, suffix: str) -> Path:
    """Move ``tmp`` to ``folder/<content hash><suffix>`` (atomic; equal content -> same name)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{file_digest(tmp)}{suffix}"
    if intact(final):
        tmp.unlink()
    else:  # absent, or damaged under the right name: the fresh bytes replace it
        os.replace(tmp, final)
    return final


def publish_folder(tmp: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / folder_digest(tmp)
    if intact(final):
        shutil.rmtree(tmp)
    else:
        if final.exists():  # damaged under the right name: move it aside, then the fresh copy in
            aside = Path(tempfile.mkdtemp(prefix="damaged-", dir=tmp.parent))
            os.rename(final, aside / final.name)
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # a concurrent study published the same content first
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _tmp(store: str, kind: str, suffix: str = "") -> Path:
    d = Path(store) / "tmp"
    d.mkdir(parents=True, exist_ok=True)
    if suffix:
        fd, name = tempfile.mkstemp(prefix=kind + "-", suffix=suffix, dir=d)
        os.close(fd)
        return Path(name)
    return Path(tempfile.mkdtemp(prefix=kind + "-", dir=d))


def _jsonable(x: Any) -> Any:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "item"):
        return _jsonable(x.item())
    return str(x)


# --------------------------------------------------------------------------- prepare_dataset


def prepare_key(ctx, p: dict[str, Any]) -> str:
    from memoe.config import DataConfig

    data = {k: v for k, v in p["data_cfg"].items() if k != "path"}
    files = DataConfig.model_validate(p["data_cfg"]).files
    return "data-" + digest(
        [file_digest(f) for f, _, _ in files],
        data,
        p["rounds"],
        p["batch_size"],
        p.get("re_edit"),
        p["model_cfg"].get("max_length"),
        _model_key(p["model_cfg"], p["store"])["fingerprint"],
        code_version(),
    )


@task(name="prepare_dataset", cache_key_fn=prepare_key, **COMMON)
def prepare_dataset(
    data_cfg: dict, model_cfg: dict, rounds: int, batch_size: int, store: str, re_edit: list[int] | None = None
) -> dict:
    """Load, validate (context length with the model's tokenizer), sample and split the edits."""
    import polars as pl

    from memoe.config import Config
    from memoe.data import frame_hash, split_rounds
    from memoe.datasets import load_for_config
    from memoe.models import context_length

    cfg = Config.model_validate({"data": data_cfg, "model": model_cfg})
    model, tok = model_and_tokenizer(model_cfg)
    df, report = load_for_config(cfg, tok, context_length(model, tok))
    parts = split_rounds(df, rounds, batch_size, tuple(re_edit) if re_edit else None, seed=data_cfg.get("seed", 0))
    df = pl.concat(parts)  # every edit applied (re-edits too: the unedited model's predictions are by id)
    tmp = _tmp(store, "data")
    df.write_parquet(tmp / "edits.parquet")
    for t, part in enumerate(parts):
        part.write_parquet(tmp / f"round_{t}.parquet")
    (tmp / "report.json").write_text(
        json.dumps(
            {
                "path": str(report.path),
                "format": report.format,
                "n_read": report.n_read,
                "n_kept": report.n_kept,
                "n_skipped": report.n_skipped,
                "skipped": report.skipped[:50],
                "frame_hash": frame_hash(df),
            },
            indent=1,
        )
    )
    folder = publish_folder(tmp, Path(store) / "data")
    return {
        "folder": str(folder),
        "edits": str(folder / "edits.parquet"),
        "rounds": [str(folder / f"round_{t}.parquet") for t in range(rounds)],
        "n_edits": df.height,
        "n_read": report.n_read,
        "n_kept": report.n_kept,
        "n_skipped": report.n_skipped,
        "frame_hash": frame_hash(df),
    }


# --------------------------------------------------------------------------- extract_anchors


def anchors_available() -> bool:
    try:
        from memoe.anchors import AnchorExtractor, gold_anchor  # noqa: F401
    except ImportError:
        return False
    return True


def anchors_key(ctx, p: dict[str, Any]) -> str:
    return "anchors-" + digest(file_digest(p["edits"]), code_version("memoe"))


@task(name="extract_anchors", cache_key_fn=anchors_key, **COMMON)
def extract_anchors(edits: str, store: str) -> dict:
    """The knowledge anchor of every prompt (edit, rephrase, locality, portability) as MEMoE's
    extractor finds it with all edit subjects known; plus coverage figures."""
    import polars as pl

    from memoe.anchors import AnchorExtractor, gold_anchor

    df = pl.read_parquet(edits)
    ext = AnchorExtractor(df["subject"].to_list())
    rows = []
    for r in df.iter_rows(named=True):
        a = gold_anchor(r["prompt"], r["subject"])
        rows.append((r["id"], "edit", r["prompt"], a.text, a.source, a.known, a.text == r["subject"]))
        for kind, col in (
            ("rephrase", "rephrase_prompts"),
            ("locality", "locality_prompts"),
            ("portability", "portability_prompts"),
        ):
            for text in r.get(col) or []:
                a = ext(text)
                rows.append(
                    (r["id"], kind, text, a.text, a.source, a.known, a.known and ext.canonical(r["subject"]) == a.text)
                )
    out = pl.DataFrame(
        rows,
        schema={
            "id": pl.String,
            "kind": pl.String,
            "prompt": pl.String,
            "anchor": pl.String,
            "source": pl.String,
            "known": pl.Boolean,
            "own_subject": pl.Boolean,
        },
        orient="row",
    )
    tmp = _tmp(store, "anchors", ".parquet")
    out.write_parquet(tmp)
    path = publish_file(tmp, Path(store) / "anchors", ".parquet")
    cov = {}
    for kind in ("rephrase", "locality", "portability"):
        sub = out.filter(pl.col("kind") == kind)
        if sub.height:
            cov[f"{kind}_known_anchor"] = float(sub["known"].mean())
            cov[f"{kind}_own_subject"] = float(sub["own_subject"].mean())
    return {"table": str(path), "n_prompts": out.height, "coverage": cov}


# --------------------------------------------------------------------------- base_locality


def locality_key(ctx, p: dict[str, Any]) -> str:
    return "locality-" + digest(
        file_digest(p["edits"]), _model_key(p["model_cfg"], p["store"]), p["batch_size"], code_version()
    )


@task(name="base_locality", cache_key_fn=locality_key, **COMMON)
def base_locality(edits: str, model_cfg: dict, batch_size: int, store: str, threads: int | None = None) -> dict:
    """The unedited model's argmax on every locality prompt (computed once per model and data)."""
    import polars as pl

    from memoe.metrics import locality_predictions

    model, tok = model_and_tokenizer(model_cfg, threads)
    t0 = time.perf_counter()
    base = locality_predictions(model, tok, pl.read_parquet(edits), batch_size=batch_size)
    tmp = _tmp(store, "locality", ".parquet")
    base.write_parquet(tmp)
    return {"table": str(publish_file(tmp, Path(store) / "locality", ".parquet")), "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- train_round


def train_key(ctx, p: dict[str, Any]) -> str:
    prev = folder_digest(p["prev_state"]) if p["prev_state"] else "none"
    return "train-" + digest(
        p["round_index"],
        file_digest(p["records"]),
        prev,
        p["method_cfg"],
        p["seed"],
        _model_key(p["model_cfg"], p["store"]),
        code_version(p["method_cfg"]["name"]),
    )


@task(name="train_round", cache_key_fn=train_key, task_run_name="train_round_{round_index}", **COMMON)
def train_round(
    round_index: int,
    records: str,
    prev_state: str | None,
    method_cfg: dict,
    seed: int,
    model_cfg: dict,
    store: str,
    threads: int | None = None,
    progress: dict | None = None,
) -> dict:
    """Editor state after round t: load state t-1 (if any), edit on round t's records, save.
    ``progress`` (not part of the cache key): where the step losses go (``tasks.progress.StepLoss``)."""
    import polars as pl

    from memoe.editors import make_editor
    from memoe.memory import PeakMemory
    from memoe.protocol import seed_round
    from tasks.progress import StepLoss

    model, tok = model_and_tokenizer(model_cfg, threads)
    method = method_from_dict(method_cfg)
    editor = make_editor(model, tok, method, seed=seed_round(seed, round_index))
    # methods that train in steps (method.steps) report each step's loss through Editor.on_step
    steps = StepLoss(progress, int(method_cfg["steps"]), round_index) if "steps" in method_cfg else None
    if steps:
        editor.on_step = steps
    try:
        if prev_state:
            editor.load(verified(prev_state))
        recs = pl.read_parquet(records)
        with PeakMemory(editor.device) as mem:  # the process's peak while this round trains
            t0 = time.perf_counter()
            stats = editor.edit(recs)
            seconds = time.perf_counter() - t0
        tmp = _tmp(store, "state")
        editor.save(tmp)
    finally:
        editor.remove()
        if steps:
            steps.close()
    folder = publish_folder(tmp, Path(store) / "states")
    return {
        "state": str(folder),
        "stats": _jsonable(stats.as_dict()),
        "seconds": seconds,
        "edits_applied": int(getattr(editor, "edits_applied", 0)),
        "peak_memory_mb": mem.peak,
    }


# --------------------------------------------------------------------------- evaluate_round


def evaluate_key(ctx, p: dict[str, Any]) -> str:
    final = p["round_index"] == len(p["rounds"]) - 1
    return "eval-" + digest(
        p["round_index"],
        [file_digest(r) for r in p["rounds"][: p["round_index"] + 1]],
        folder_digest(p["state"]),
        file_digest(p["base"]),
        p["method_cfg"],
        p["eval_cfg"],
        p["seed"],
        final,
        _model_key(p["model_cfg"], p["store"]),
        code_version(p["method_cfg"]["name"]),
    )


def _frozen_dir(model_cfg: dict, store: str, layer: int) -> Path:
    return Path(store) / "frozen" / digest(_model_key(model_cfg, store), layer)


def _frozen_states(editor, files: list[str] | None, eval_cfg: dict, model_cfg: dict, store: str):
    """The unedited model's states below ``editor``'s edit, from the earlier rounds' files (a damaged
    or missing one is left out: its states are computed again), or None (``eval.reuse_states`` off,
    or the editor does not say which layers it leaves unchanged)."""
    from memoe.frozen import FrozenStates

    layer = editor.unchanged_layers()
    if not eval_cfg.get("reuse_states", True) or layer < 1:
        return None
    log = get_run_logger()
    good = []
    for f in files or []:
        if intact(f) and Path(f).parent == _frozen_dir(model_cfg, store, layer):
            good.append(f)
        else:
            log.warning(f"frozen states {f}: damaged, missing or of another layer; their states are computed again")
    return FrozenStates(layer, good)


def _score_memo(files: list[str] | None, eval_cfg: dict, model_cfg: dict, store: str):
    """The edited model's results that still hold, from the earlier rounds' files (a damaged or missing
    one is left out: its sequences are scored again), or None (``eval.reuse_scores`` off)."""
    from memoe.memo import ScoreMemo

    if not eval_cfg.get("reuse_scores", True):
        return None
    log = get_run_logger()
    good = []
    for f in files or []:
        if intact(f) and Path(f).parent == _memo_dir(model_cfg, store):
            good.append(f)
        else:
            log.warning(f"score memo {f}: damaged, missing or of another model; its sequences are scored again")
    return ScoreMemo(good)


def _memo_dir(model_cfg: dict, store: str) -> Path:
    return Path(store) / "memo" / digest(_model_key(model_cfg, store))


@task(name="evaluate_round", cache_key_fn=evaluate_key, task_run_name="evaluate_round_{round_index}", **COMMON)
def evaluate_round(
    round_index: int,
    rounds: list[str],
    state: str,
    base: str,
    method_cfg: dict,
    eval_cfg: dict,
    seed: int,
    model_cfg: dict,
    store: str,
    threads: int | None = None,
    frozen: list[str] | None = None,
    memo: list[str] | None = None,
) -> dict:
    """Per-edit metrics after round t on the round's edits and (a sample of) the earlier ones
    (``memoe.protocol``: ``eval_records``, the re-edit bookkeeping, ``score_round``). ``frozen``: the
    earlier rounds' files of the unedited model's states below the edit (``memoe.frozen``; not in the
    cache key: they change how fast the scores come, not the scores). Returns the file of the states
    this round computed (``frozen``: None on the last round, or where the editor does not say which
    layers it leaves unchanged). ``memo``: the earlier rounds' files of the edited model's results
    (``memoe.memo``; not in the cache key either: a result is reused only where the editor's version of
    the row is the one it was computed under); returns this round's (``memo``: None on the last round)."""
    import polars as pl

    from memoe.editors import make_editor
    from memoe.protocol import eval_records, overwritten_ids, round_seed, score_round

    final = round_index == len(rounds) - 1
    verified(Path(rounds[0]).parent), verified(state), verified(base)
    applied = [pl.read_parquet(r) for r in rounds[: round_index + 1]]
    records, n_earlier = eval_records(applied, round_index, eval_cfg.get("retention_sample"), seed, final)
    model, tok = model_and_tokenizer(model_cfg, threads)
    editor = make_editor(model, tok, method_from_dict(method_cfg), seed=round_seed(seed, round_index))
    try:
        editor.load(state)
        states = _frozen_states(editor, frozen, eval_cfg, model_cfg, store)
        kept = _score_memo(memo, eval_cfg, model_cfg, store)
        t0 = time.perf_counter()
        scores = score_round(
            model,
            tok,
            editor,
            records,
            pl.read_parquet(base),
            overwritten_ids(applied),
            batch_size=eval_cfg["batch_size"],
            generation_batch_size=eval_cfg.get("generation_batch_size"),
            generation=eval_cfg["generation"],
            max_new_tokens=eval_cfg["max_new_tokens"],
            fluency=eval_cfg["fluency"],
            frozen=states,
            memo=kept,
        )
        seconds = time.perf_counter() - t0
    finally:
        editor.remove()
    frozen_out = None
    if states is not None and not final and states.new:
        tmp = _tmp(store, "frozen", ".safetensors")
        states.save(tmp)
        frozen_out = str(publish_file(tmp, _frozen_dir(model_cfg, store, states.layer), ".safetensors"))
    memo_out = None
    if kept is not None and not final and kept.new:
        tmp = _tmp(store, "memo", ".json")
        kept.save(tmp)
        memo_out = str(publish_file(tmp, _memo_dir(model_cfg, store), ".json"))
    tmp = _tmp(store, "eval", ".parquet")
    scores.table.write_parquet(tmp)
    return {
        "memo": memo_out,
        "scores_reused": kept.hits if kept is not None else 0,
        "scores_computed": kept.misses if kept is not None else 0,
        "frozen": frozen_out,
        "frozen_reused": states.hits if states is not None else 0,
        "frozen_computed": states.misses if states is not None else 0,
        "table": str(publish_file(tmp, Path(store) / "evals", ".parquet")),
        "seconds": seconds,
        "n_scored": scores.table.height,
        "n_earlier_scored": n_earlier,
        "diagnostics": _jsonable(scores.diagnostics),
    }
