"""MEMoE: a bypass mixture-of-experts adapter beside one MLP, routed by knowledge anchors (the editor: editor.py).

Importing the package registers the method (``memoe.methods.discover`` does); the editor's
module, which imports torch, is imported when the editor is first used."""

from memoe.editors.memoe.config import MEMoEMethod
from memoe.methods import register_method

__all__ = ["MEMoEMethod"]

register_method(MEMoEMethod, "memoe.editors.memoe.editor:MEMoEEditor")
