"""Checks of a config against the model it names: the decoder layers a method trains and the
context its prompts must fit. Made before any work (``memoe run``'s preflight, from the model's
config and tokenizer files alone) and again where an editor is built (``make_editor``), so a
setting the model cannot honour is an error naming the key, never silently changed.

A layer index ``l`` names decoder layer ``l`` of ``n`` (``0 <= l < n``); a negative one counts
from the end (``-1`` is the last layer), as Python indexing does. Anything else is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memoe.config import ConfigError

LONG_PROMPT_TOKENS = 512  # a prompt + target longer than this is warned about (it costs per token, not per row)


def method_layers(method: Any) -> list[tuple[str, int]]:
    """(key, layer) for every decoder layer a method's settings name."""
    out = []
    layers = getattr(method, "layers", None)
    if layers is not None:
        out += [(f"layers[{i}]", int(v)) for i, v in enumerate(layers)]
    if getattr(method, "layer", None) is not None:
        out.append(("layer", int(method.layer)))
    return out


def check_layers(method: Any, n_layers: int, prefix: str = "method") -> None:
    """Every layer the method names exists in a model of ``n_layers`` decoder layers."""
    for key, layer in method_layers(method):
        if not -n_layers <= layer < n_layers:
            raise ConfigError(
                f"{prefix}.{key}: layer {layer} is out of range: the model has {n_layers} decoder "
                f"layers (0..{n_layers - 1}, or -{n_layers}..-1 counted from the end)"
            )


def layer_count(model_config: Any) -> int | None:
    """Decoder layers of a transformers config (None: not stated)."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def context_of(model_config: Any, tokenizer: Any = None) -> int:
    """The model's context length in tokens (as ``memoe.models.context_length`` reads it)."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for k in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return getattr(tokenizer, "model_max_length", 2048)


def model_folder(name: str) -> Path | None:
    """The local folder holding a model's config and tokenizer files (converting an embedded model
    once if needed); None for a hub id that is not cached."""
    if name.startswith("embedded:"):
        from memoe.models import EMBEDDED, embedded_checkpoint

        short = name.split(":", 1)[1]
        if short not in EMBEDDED:
            raise ConfigError(
                f"model.name: unknown embedded model {short!r}; known: "
                + ", ".join(f"embedded:{k}" for k in sorted(EMBEDDED))
            )
        return embedded_checkpoint(short)
    p = Path(name).expanduser()
    if p.exists():
        return p
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def check_device(device: str) -> None:
    import torch

    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {device!r} but no CUDA device is available (use 'auto' or 'cpu')")
    if kind == "cuda" and ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise ConfigError(f"model.device: {device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"model.device: {device!r} but MPS is not available (use 'auto' or 'cpu')")
    if kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ConfigError(f"model.device: {device!r} but no XPU device is available (use 'auto' or 'cpu')")
