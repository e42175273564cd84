"""Where the checkout is, and the one rule for the relative paths memoe reads."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the checkout holding configs/


def resolve_path(p: str | Path) -> Path:
    """The one rule for every relative path memoe reads (a CONFIG argument, ``data.path``, a
    deployment's ``config_path``, a catalogue dataset's path): the current folder if it exists there,
    else the project root (the checkout holding configs/), so ``memoe run configs/compare.yaml`` and
    its data work from any folder. Absolute paths (and ``~``) are used as they are."""
    p = Path(p).expanduser()
    if p.is_absolute():
        return p
    if p.exists():
        return p.resolve()
    return (PROJECT_ROOT / p).resolve()
