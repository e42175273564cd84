"""MEMIT: a closed-form update of several layers' MLP output projections (the editor: editor.py).

Importing the package registers the method (``memoe.methods.discover`` does); the editor's
module, which imports torch, is imported when the editor is first used."""

from memoe.editors.memit.config import MemitMethod
from memoe.methods import register_method

__all__ = ["MemitMethod"]

register_method(MemitMethod, "memoe.editors.memit.editor:MemitEditor")
