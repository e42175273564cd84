"""The unedited model's hidden states below an edit, kept across evaluations.

An editor that leaves decoder layers ``0..K-1`` as the unedited model has them
(``Editor.unchanged_layers``: MEMoE's adapter sits at layer 20 of 30) changes nothing a prompt's
tokens compute below layer ``K``. A sequential study scores the same prompts round after round (the
round's edits, a sample of earlier ones, all of them at the end), so the states entering layer ``K``
are computed once per token sequence and every later evaluation runs layers ``K..`` only
(``forward_from``). ``FrozenStates`` holds them, keyed by the sequence's token ids, and writes the
ones computed in this process to a safetensors file that a later evaluation (another task, another
process) opens again, memory-mapped. Written by hand because no library caches the partial forward
of a ``transformers`` model by input.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from memoe.models import decoder_layers


class FrozenStates:
    """States entering decoder layer ``layer``, one (T, d) tensor per token sequence. ``files``: earlier
    ``save`` outputs for the same model and layer (opened lazily, memory-mapped)."""

    def __init__(self, layer: int, files: Sequence[str | Path] = ()):
        if layer < 1:
            raise ValueError(f"FrozenStates: layer {layer}: the states below layer 0 are the embeddings")
        self.layer = layer
        self.new: dict[str, torch.Tensor] = {}
        self._open: list = []
        self._where: dict[str, int] = {}
        self.hits = self.misses = 0
        for f in files:
            self._add_file(Path(f))

    def _add_file(self, path: Path) -> None:
        from safetensors import safe_open

        handle = safe_open(str(path), framework="pt")
        layer = int((handle.metadata() or {}).get("layer", -1))
        if layer != self.layer:
            raise ValueError(
                f"{path}: frozen states of decoder layer {layer}, this evaluation needs layer {self.layer}"
            )
        self._open.append(handle)
        for k in handle.keys():
            self._where.setdefault(k, len(self._open) - 1)

    @staticmethod
    def key(ids: Sequence[int]) -> str:
        return hashlib.sha1(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.new:
            return self.new[key]
        i = self._where.get(key)
        return self._open[i].get_tensor(key) if i is not None else None

    def __contains__(self, key: str) -> bool:
        return key in self.new or key in self._where

    def put(self, key: str, states: torch.Tensor) -> None:
        if key not in self:
            self.new[key] = states.detach().to("cpu").contiguous()

    def __len__(self) -> int:
        return len(self.new) + len(self._where)

    def new_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.new.values())

    def save(self, path: str | Path) -> Path | None:
        """The states computed since this object was made (None: there are none)."""
        from safetensors.torch import save_file

        if not self.new:
            return None
        save_file(self.new, str(path), metadata={"layer": str(self.layer)})
        return Path(path)


class _Skipped(nn.Module):
    """Stands in for a decoder layer below ``forward_from``'s start: returns its input, computes nothing."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        if hasattr(layer, "attention_type"):  # models with per-layer masks look it up on each layer
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def capture_input(model: nn.Module, layer: int, store: list) -> torch.utils.hooks.RemovableHandle:
    """A hook that appends the hidden states entering decoder layer ``layer`` to ``store`` on each forward."""

    def pre(module, args, kwargs):
        store.append((args[0] if args else kwargs["hidden_states"]).detach())

    return decoder_layers(model)[layer].register_forward_pre_hook(pre, with_kwargs=True)


def forward_from(
    model: nn.Module, layer: int, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The body's last hidden states (final norm applied) when decoder layer ``layer`` is given
    ``hidden`` as its input: the layers below it are skipped. The ids and the mask go in as usual, so
    the position embeddings, the causal mask and the editors' own hooks see the same call."""
    layers = decoder_layers(model)
    below = [layers[i] for i in range(layer)]

    def put(module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    # first of the layer's pre-hooks, so that every other one (the fact gate's reads this layer's input) sees the
    # kept states, not what the skipped layers passed through
    handle = layers[layer].register_forward_pre_hook(put, with_kwargs=True, prepend=True)
    try:
        for i, m in enumerate(below):
            layers[i] = _Skipped(m)
        return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    finally:
        for i, m in enumerate(below):
            layers[i] = m
        handle.remove()
