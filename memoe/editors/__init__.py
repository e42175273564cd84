"""Editors behind one interface (``memoe.editors.base.Editor``); importing registers them."""
from memoe.editors.base import REGISTRY, Editor, make_editor, register  # noqa: F401
