"""GRACE: a key-value codebook at one layer's MLP output (the editor: editor.py).

Importing the package registers the method (``memoe.methods.discover`` does); the editor's
module, which imports torch, is imported when the editor is first used."""

from memoe.editors.grace.config import GraceMethod
from memoe.methods import register_method

__all__ = ["GraceMethod"]

register_method(GraceMethod, "memoe.editors.grace.editor:GraceEditor")
