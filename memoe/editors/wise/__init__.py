"""WISE: a side memory beside one layer's MLP value matrix (the editor: editor.py).

Importing the package registers the method (``memoe.methods.discover`` does); the editor's
module, which imports torch, is imported when the editor is first used."""

from memoe.editors.wise.config import WiseMethod
from memoe.methods import register_method

__all__ = ["WiseMethod"]

register_method(WiseMethod, "memoe.editors.wise.editor:WiseEditor")
