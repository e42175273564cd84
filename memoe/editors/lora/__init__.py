"""LoRA through peft (the editor: editor.py).

Importing the package registers the method (``memoe.methods.discover`` does); the editor's
module, which imports torch, is imported when the editor is first used."""

from memoe.editors.lora.config import LoRAMethod
from memoe.methods import register_method

__all__ = ["LoRAMethod"]

register_method(LoRAMethod, "memoe.editors.lora.editor:LoRAEditor")
