"""Editors behind one interface (``memoe.editors.base.Editor``).

Importing this package imports every module in it, so each editor registers itself with
``@register("name")`` and nothing else needs editing when an editor is added.
"""
import importlib
import pkgutil

from memoe.editors.base import REGISTRY, Editor, load_edited, make_editor, register  # noqa: F401

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base", "common"):
        importlib.import_module(f"{__name__}.{_m.name}")
