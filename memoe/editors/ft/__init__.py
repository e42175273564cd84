"""FT-L and FT-M: fine-tune one layer's MLP output projection (the editor: editor.py).

Importing the package registers the method (``memoe.methods.discover`` does); the editor's
module, which imports torch, is imported when the editor is first used."""

from memoe.editors.ft.config import FTMethod
from memoe.methods import register_method

__all__ = ["FTMethod"]

register_method(FTMethod, "memoe.editors.ft.editor:FTEditor")
