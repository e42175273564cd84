"""Trust nothing in the run store that was not checked.

- Every task output is named by its content hash (``evals/<hash>.parquet``, ``states/<hash>/``,
  ...). ``outputs_intact`` recomputes those hashes before a cached result is used: a damaged or
  missing file makes the task run again (``Ctx.call``), and ``publish_*`` replace a damaged file
  that bears the right name instead of keeping it.
- Prefect reads a cached task's result record from ``store/results/<cache key>`` with the serializer
  the record itself names (pickle included), and its JSON serializer imports and calls any class
  a ``__class__`` / ``__exc_type__`` entry names. ``check_record`` accepts only what memoe writes: a
  JSON record, serializer ``json``, whose result is plain JSON data. Anything else is moved aside
  (``<key>.rejected``) before Prefect can read it, and the task runs again.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tasks.keys import file_digest, folder_digest

log = logging.getLogger("memoe.integrity")
OUTPUT_KEYS = ("state", "table", "folder")  # result fields holding a content-named file or folder


def named_digest(path: Path) -> str:
    """The content hash a store path is named by (``<hash>`` or ``<hash>.parquet``)."""
    return path.name.split(".", 1)[0]


def intact(path: str | Path) -> bool:
    """Whether a content-named file or folder exists and still has the content its name says."""
    p = Path(path)
    try:
        if p.is_dir():
            return folder_digest(p) == named_digest(p)
        if p.is_file():
            return file_digest(p) == named_digest(p)
    except OSError:
        return False
    return False


def outputs_intact(res: Any) -> bool:
    """A cached task result's files: present, and each with the content its name is the hash of.
    (``edits`` and ``rounds`` lie inside the content-named ``folder``.)"""
    if not isinstance(res, dict):
        return True
    paths = [res[k] for k in OUTPUT_KEYS if k in res]
    if not all(intact(p) for p in paths):
        bad = [p for p in paths if not intact(p)]
        log.warning("store: %s damaged or missing; recomputing", ", ".join(map(str, bad)))
        return False
    return all(Path(p).is_file() for p in [res.get("edits")] + list(res.get("rounds") or []) if p)


def _plain(x: Any) -> bool:
    """Plain JSON data: no object a Prefect decoder would import and build."""
    if isinstance(x, dict):
        return "__class__" not in x and "__exc_type__" not in x and all(_plain(v) for v in x.values())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return x is None or isinstance(x, (str, int, float, bool))


def record_problem(path: Path) -> str | None:
    """Why a result record is not one memoe wrote (None: it is)."""
    try:
        rec = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return "not a JSON document"
    if not isinstance(rec, dict) or not isinstance(rec.get("metadata"), dict) or "result" not in rec:
        return "not a result record (metadata + result)"
    ser = rec["metadata"].get("serializer")
    if not isinstance(ser, dict) or ser.get("type") != "json":
        return f"serializer {ser.get('type') if isinstance(ser, dict) else ser!r}, only 'json' is accepted"
    if not isinstance(rec["result"], str):
        return "result is not JSON text"
    try:
        result = json.loads(rec["result"])
    except ValueError:
        return "result is not JSON"
    if not _plain(result):
        return "result holds an object to import ('__class__' / '__exc_type__'), not plain data"
    return None


def check_record(results_dir: Path, key: str) -> None:
    """Before Prefect looks up ``key``: move a record memoe did not write out of its way."""
    path = results_dir / key
    if not path.is_file():
        return
    why = record_problem(path)
    if why is not None:
        aside = path.with_name(path.name + ".rejected")
        os.replace(path, aside)
        msg = f"store: rejected the result record {path} ({why}); moved to {aside}, the task runs again"
        log.warning(msg)
        print(f"warning: {msg}", file=sys.stderr, flush=True)
