"""Content hashes that make up the cache keys: files, folders, model weights, code version.

A cache key never contains a path string or a tensor: a file enters a key through the hash of its
bytes, a model through the hash of its weight and tokenizer files, the code through the hash of
the memoe sources that can change the task's output.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MEMOE_PKG = PROJECT_ROOT / "memoe"
TASKS_PKG = PROJECT_ROOT / "tasks"


def digest(*parts: Any, length: int = 20) -> str:
    """Stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_digest(path: str | Path, length: int = 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def folder_digest(folder: str | Path, length: int = 20) -> str:
    """Hash of every file's relative name and bytes (sorted), so equal contents -> equal hash."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(x for x in folder.rglob("*") if x.is_file()):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        h.update(file_digest(p, 64).encode())
    return h.hexdigest()[:length]


def _sources_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(p.relative_to(PROJECT_ROOT).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


CORE = ["memoe.config", "memoe.data", "memoe.datasets", "memoe.metrics", "memoe.models", "memoe.editors.base"]


def _module_file(mod: str) -> Path | None:
    parts = mod.split(".")
    if parts[0] != "memoe":
        return None
    base = PROJECT_ROOT.joinpath(*parts)
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _memoe_imports(path: Path) -> set[str]:
    """memoe modules imported by a source file (absolute and relative imports, at any depth)."""
    import ast

    pkg = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    if path.name == "__init__.py":
        pkg = pkg.rsplit(".", 1)[0] + ".__init__"
    found: set[str] = set()
    try:
        tree = ast.parse(path.read_text())
    except SyntaxError:
        return found
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: -node.level]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # "from memoe import anchors"
    return {m for m in found if m.startswith("memoe") and m != "memoe.editors"}


def _method_package(mod: str) -> list[Path]:
    """Every source file of the method package holding ``mod`` (``memoe/editors/<m>/``); none for a
    module outside one (a shared module, a method registered from elsewhere)."""
    parts = mod.split(".")
    if parts[:2] != ["memoe", "editors"] or len(parts) < 3:
        return []
    folder = MEMOE_PKG / "editors" / parts[2]
    return sorted(folder.rglob("*.py")) if (folder / "__init__.py").is_file() else []


@functools.lru_cache(maxsize=None)
def code_version(method: str | None = None) -> str:
    """Hash of the sources that can change a task's output: the library modules the pipeline
    calls, the method's package (every file of ``memoe/editors/<m>/``: settings, editor, helpers)
    and whatever memoe modules those import (transitively), and the task code. Another method's
    package or a command-line front end is not part of it."""
    roots = list(CORE)
    files: list[Path] = []
    if method is not None:
        from memoe.config import METHODS

        if method in METHODS:
            m = METHODS[method]
            roots += [m.editor_module, m.config.__module__]
            files += _method_package(m.editor_module) + _method_package(m.config.__module__)
    seen: set[Path] = set()
    todo = files + [f for f in map(_module_file, roots) if f]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(g for g in map(_module_file, _memoe_imports(f)) if g and g not in seen)
    files = sorted(seen) + [TASKS_PKG / "steps.py", TASKS_PKG / "keys.py"]
    return _sources_digest(files)


def _fingerprint_files(folder: Path) -> list[Path]:
    keep = (".safetensors", ".bin", ".json", ".model", ".txt", ".gguf", ".tiktoken")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in keep and not p.name.startswith("."))


def _cached_file_digest(path: Path, memo: Path) -> str:
    """sha256 of a (possibly large) file, remembered by (path, size, mtime) in ``memo``."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo.parent.mkdir(parents=True, exist_ok=True)
    with open(memo.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = json.loads(memo.read_text()) if memo.exists() else {}
        if key not in table:
            table[key] = file_digest(path, 64)
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table, indent=1))
            tmp.replace(memo)
        return table[key]


def model_source(name: str) -> Path | None:
    """The local folder a model name loads from (None: a hub id that is not on disk)."""
    if name.startswith("embedded:"):
        from memoe.models import embedded_checkpoint

        return embedded_checkpoint(name.split(":", 1)[1])
    p = Path(name).expanduser()
    return p.resolve() if p.exists() else None


def model_fingerprint(name: str, store: Path) -> str:
    """Content hash of a model's weights, config and tokenizer files (hub ids: the id itself)."""
    src = model_source(name)
    if src is None:
        return digest("hub", name)
    if src.is_file():
        return _cached_file_digest(src, store / "fingerprints.json")[:20]
    parts = [
        (p.relative_to(src).as_posix(), _cached_file_digest(p, store / "fingerprints.json"))
        for p in _fingerprint_files(src)
    ]
    return digest("folder", parts)
