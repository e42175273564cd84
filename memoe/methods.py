"""The method registry. Each editing method is a package ``memoe/editors/<m>/``: ``config.py`` (its
settings class, derived from ``Strict``), ``editor.py`` (its ``Editor``) and an ``__init__.py`` that
registers the two together with ``register_method``. ``discover()`` imports every subpackage of
``memoe.editors``, so no list of the methods exists anywhere; ``memoe.config`` calls it when it is
imported and builds its method union from ``METHODS`` (read the registry through ``memoe.config`` to
see every method). Nothing here or in a method package's ``__init__`` imports torch: an editor's
module is imported when the editor is first used.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, get_args

from pydantic import BaseModel, ConfigDict

from memoe.registry import Registry


class Strict(BaseModel):
    """The base of every settings class: an unknown key or a wrong type is an error."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class Method:
    """An editing method: its settings class (the names of its ``name`` Literal are the method's names)
    and its editor, an ``Editor`` subclass or the ``"module:Class"`` that holds it (imported on first
    use, so reading a config imports no torch)."""

    config: type[BaseModel]
    editor: type | str

    @property
    def editor_module(self) -> str:
        return self.editor.partition(":")[0] if isinstance(self.editor, str) else self.editor.__module__

    def editor_class(self) -> type:
        if not isinstance(self.editor, str):
            return self.editor
        module, _, name = self.editor.partition(":")
        return getattr(importlib.import_module(module), name)


_listeners: list[Callable[[], None]] = []


def _changed() -> None:
    for fn in _listeners:
        fn()


METHODS: Registry = Registry("method", on_change=_changed)


def on_change(fn: Callable[[], None]) -> None:
    """Call ``fn`` after every registration or removal (``memoe.config`` rebuilds its method union)."""
    _listeners.append(fn)


def register_method(config: type[BaseModel], editor: type | str) -> None:
    """Register a method's settings class and its editor together, under every name of the class's
    ``name`` Literal; ``method`` / ``methods`` of a config then accept it."""
    names = get_args(config.model_fields["name"].annotation)
    for n in names:
        if n in METHODS:
            raise ValueError(f"method {n!r} is already registered")
    for n in names:
        METHODS[n] = Method(config, editor)


def unregister_method(config: type[BaseModel]) -> None:
    for n in [n for n, m in METHODS.items() if m.config is config]:
        del METHODS[n]


def discover() -> None:
    """Import every method package (each subpackage of ``memoe.editors``): each registers its method
    once (a package already imported is not imported again). Found by their folder and imported by
    name: the method layer sits above this registry."""
    for info in pkgutil.iter_modules([str(Path(__file__).resolve().parent / "editors")], "memoe.editors."):
        if info.ispkg:
            importlib.import_module(info.name)
