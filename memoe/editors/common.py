"""Training helpers shared by the editors: the training-step loop (``train_steps``), edit batches with
the prompt masked (padded, or packed several rows per sequence), target NLL (and a fused head + NLL
for a frozen head), length buckets (less padding) and the training precision (bf16 autocast where
the hardware has it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from memoe.adapter import LayerCache, final_norm, supports_layer_cache
from memoe.data import encode_pair


def train_steps(
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Any], torch.Tensor],
    batches: Sequence[Any],
    steps: int,
    early_stop_loss: float,
    on_step: Callable[[int, float], None] | None = None,
    after_step: Callable[[], None] | None = None,
    weight: Callable[[Any], int] | None = None,
) -> list[float]:
    """The training loop the editors share. Up to ``steps`` steps, each one pass over ``batches`` with
    one optimiser step per batch: ``zero_grad``, ``loss_fn(batch)``, its backward, ``optimizer.step()``,
    then ``after_step()`` (FT-L: the projection back into its norm ball). A step's loss is the mean of
    its batches' losses weighted by ``weight(batch)`` (default: 1 each). After each step
    ``on_step(step, loss)`` (1-based; the editor's progress callback); training ends after the first
    step whose loss is below ``early_stop_loss``. Returns the loss of every step taken."""
    losses: list[float] = []
    for step in range(1, steps + 1):
        tot, n = 0.0, 0
        for b in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(b)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            w = 1 if weight is None else weight(b)
            tot += float(loss.detach()) * w
            n += w
        losses.append(tot / n)
        if on_step is not None:
            on_step(step, losses[-1])
        if losses[-1] < early_stop_loss:
            break
    return losses


def edit_batch(tokenizer, prompts: Sequence[str], targets: Sequence[str], device) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + " " + target`` batch; labels are -100 on prompt and padding.

    ``labels[i, j]`` is the token at position j (HF convention: the loss compares logits[:, :-1]
    with labels[:, 1:]). ``last_prompt`` is the index of each row's last prompt token.
    """
    enc = [encode_pair(tokenizer, p, t) for p, t in zip(prompts, targets)]
    L = max(len(s) for s, _ in enc)
    pad = tokenizer.pad_token_id or 0
    ids = torch.full((len(enc), L), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), L), dtype=torch.long)
    labels = torch.full((len(enc), L), -100, dtype=torch.long)
    last_prompt = torch.zeros(len(enc), dtype=torch.long)
    for i, (seq, npr) in enumerate(enc):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, npr : len(seq)] = torch.tensor(seq[npr:])
        last_prompt[i] = npr - 1
    return {
        k: v.to(device)
        for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels, last_prompt=last_prompt).items()
    }


def packed_batch(
    tokenizer, prompts: Sequence[str], targets: Sequence[str], device, capacity: int = 64
) -> dict[str, torch.Tensor | None]:
    """``prompt + " " + target`` rows packed end to end into sequences of at most ``capacity`` tokens
    (at least the longest row), so a training step runs one batch without padding to the longest row.

    Each row keeps its own positions (``position_ids`` restart at 0) and attends only to itself:
    with ``attention_mask=None`` transformers reads the restarts of ``position_ids`` as packed
    sequences and builds a block-diagonal causal mask. Trailing padding has position 0 (each pad
    token is a sequence of its own). ``row`` is each token's row index (-1: padding); ``labels``
    as in ``edit_batch`` (a row's first token is a prompt token, so no row predicts from another).
    Rows go to sequences first-fit in decreasing length (deterministic)."""
    enc = [encode_pair(tokenizer, p, t) for p, t in zip(prompts, targets)]
    cap = max(capacity, max(len(s) for s, _ in enc))
    order = sorted(range(len(enc)), key=lambda i: (-len(enc[i][0]), i))
    bins: list[list[int]] = []
    fill: list[int] = []
    for i in order:
        n = len(enc[i][0])
        j = next((j for j, f in enumerate(fill) if f + n <= cap), None)
        if j is None:
            bins.append([]), fill.append(0)
            j = len(bins) - 1
        bins[j].append(i)
        fill[j] += n
    L = max(fill)
    pad = tokenizer.pad_token_id or 0
    ids = torch.full((len(bins), L), pad, dtype=torch.long)
    pos = torch.zeros((len(bins), L), dtype=torch.long)
    labels = torch.full((len(bins), L), -100, dtype=torch.long)
    row = torch.full((len(bins), L), -1, dtype=torch.long)
    for b, members in enumerate(bins):
        o = 0
        for i in sorted(members):
            seq, npr = enc[i]
            n = len(seq)
            ids[b, o : o + n] = torch.tensor(seq)
            pos[b, o : o + n] = torch.arange(n)
            labels[b, o + npr : o + n] = torch.tensor(seq[npr:])
            row[b, o : o + n] = i
            o += n
    out = {k: v.to(device) for k, v in dict(input_ids=ids, position_ids=pos, labels=labels, row=row).items()}
    out["attention_mask"] = None
    return out


_PACKING_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@torch.no_grad()
def packing_is_exact(model) -> bool:
    """Whether the model keeps packed rows apart (``packed_batch``): two rows packed in one sequence
    give the hidden states they give alone. Architectures whose masks ignore ``position_ids``
    would let a row attend to the rows before it; those train on padded rows instead. Checked
    once per model and attention implementation, in the current precision."""
    impl = getattr(model.config, "_attn_implementation", None)
    known = _PACKING_OK.setdefault(model, {})
    if impl not in known:
        dev = next(model.parameters()).device
        vocab = model.get_input_embeddings().weight.shape[0]
        a, b = [int(x) % vocab for x in (11, 523, 97, 7, 2048, 31)], [int(x) % vocab for x in (901, 12, 77, 5)]
        ids = torch.tensor([a + b], device=dev)
        pos = torch.tensor([list(range(len(a))) + list(range(len(b)))], device=dev)
        packed = model.base_model(
            input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False
        ).last_hidden_state[0]
        alone = torch.cat(
            [
                model.base_model(input_ids=torch.tensor([r], device=dev), use_cache=False).last_hidden_state[0]
                for r in (a, b)
            ]
        )
        err = (packed.float() - alone.float()).abs().mean() / alone.float().abs().mean()
        known[impl] = bool(err < 0.1)  # rounding in bf16: ~1e-2; a row seeing another: order 1
    return known[impl]


def past_length(kwargs: dict) -> int:
    """Tokens already in the KV cache of a forward, from the keyword arguments a forward pre-hook
    sees (0 on a sequence's first forward): hooks that decide once per sequence (GRACE, WISE) read it."""
    pkv = kwargs.get("past_key_values")
    if pkv is None:
        pkv = kwargs.get("cache")  # transformers 5 passes the cache under this name
    if pkv is not None:
        try:
            return int(pkv.get_seq_length())
        except (AttributeError, TypeError):
            try:
                return int(pkv[0][0].shape[-2])
            except Exception:  # noqa: BLE001
                return 0
    cp = kwargs.get("cache_position")
    if cp is not None and cp.numel():
        return int(cp.view(-1)[0])
    return 0


def target_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """NLL of the target tokens only (labels -100 elsewhere). ``reduction='none'`` -> per row mean."""
    lg = logits[:, :-1].float()
    lb = labels[:, 1:]
    loss = F.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1), ignore_index=-100, reduction="none")
    loss = loss.view(lb.shape)
    m = (lb != -100).float()
    if reduction == "none":
        return (loss * m).sum(1) / m.sum(1).clamp(min=1)
    return (loss * m).sum() / m.sum().clamp(min=1)


def layer_cache(model, first: int, batch: dict[str, torch.Tensor]) -> LayerCache | None:
    """A cache of the batch's inputs to decoder layer ``first`` (the layers below never change while
    an editor trains something at or above ``first``); None where it would not help or is not exact."""
    if first <= 0 or not supports_layer_cache(model):
        return None
    return LayerCache.capture(model, first, batch["input_ids"], batch["attention_mask"])


def body_hidden(model, batch: dict[str, torch.Tensor], cache: LayerCache | None = None) -> torch.Tensor:
    """Final-normed hidden states (B, T, d) of the batch: the whole body, or the layers from ``cache.first`` up."""
    if cache is not None:
        return final_norm(model)(cache.run(model))
    return model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state


def head_nll(
    model,
    h: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor | None = None,
    cols: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """NLL of ``labels[rows, cols + 1]`` with the LM head applied only at positions (rows, cols) -
    by default every position that predicts a target token - instead of at every token."""
    if rows is None:
        rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    logits = model.get_output_embeddings()(h[rows, cols]).float()
    return F.cross_entropy(logits, labels[rows, cols + 1], reduction=reduction)


class _HeadNLL(torch.autograd.Function):
    """Summed NLL of targets ``y`` under ``log_softmax(h @ w.T)`` (fp32 softmax) for a frozen head
    ``w``. The gradient with respect to ``h`` is formed in the forward pass (softmax - one-hot, in
    ``w``'s dtype), so the backward is one matmul and the [n, vocab] fp32 buffers are freed at once;
    autograd's version keeps the log-probabilities and makes three more [n, vocab] passes."""

    @staticmethod
    def forward(ctx, h, w, y):
        lp = torch.log_softmax(torch.mm(h, w.t()), -1, dtype=torch.float32)
        rows = torch.arange(len(y), device=y.device)
        loss = -lp[rows, y].sum()
        p = lp.exp_()
        p[rows, y] -= 1.0
        ctx.save_for_backward(p.to(w.dtype), w)
        ctx.h_dtype = h.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        p, w = ctx.saved_tensors
        return (torch.mm(p, w) * g).to(ctx.h_dtype), None, None


def head_nll_sum(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h, w).float(), y, reduction="sum")`` with a frozen ``w``: the same
    value, and the same gradient for ``h`` up to the rounding of ``w``'s dtype, in fewer passes."""
    if w.requires_grad:
        raise ValueError("head_nll_sum is for a frozen head")
    return _HeadNLL.apply(h.to(w.dtype), w, y)


def edit_batches(tokenizer, records, batch_size: int | None, device) -> list[dict[str, torch.Tensor]]:
    """The records' (prompt, target_new) pairs as ``edit_batch`` chunks of ``batch_size`` (all: None)."""
    prompts, targets = records["prompt"].to_list(), records["target_new"].to_list()
    bs = batch_size or len(prompts)
    return [edit_batch(tokenizer, prompts[i : i + bs], targets[i : i + bs], device) for i in range(0, len(prompts), bs)]


def token_groups(lengths: Sequence[int], max_tokens: int, capacity: int | None = None) -> list[list[int]]:
    """Consecutive rows in groups of at most ``max_tokens`` tokens (a longer row: a group of its own),
    as few groups as that allows: a step's rows in micro-batches that bound its memory. With
    ``capacity`` (the packed sequence length), a row longer than it is a group of its own too, so one
    long prompt does not stretch every packed sequence of the step to its length."""
    long = [[i] for i, n in enumerate(lengths) if capacity and n > capacity]
    groups: list[list[int]] = [[]]
    n = 0
    for i, length in enumerate(lengths):
        if capacity and length > capacity:
            continue
        if groups[-1] and n + length > max_tokens:
            groups.append([])
            n = 0
        groups[-1].append(i)
        n += length
    return (groups if groups[0] else []) + long


def length_buckets(lengths: Sequence[int], row_cost: int = 48) -> list[list[int]]:
    """Split rows into groups of similar token length, minimising padded tokens + ``row_cost`` per
    group (a group's fixed cost in token-equivalents: kernel launches, Python per layer).

    Returns lists of row indices (each group sorted by length; rows of equal length stay in order).
    Optimal contiguous partition of the length-sorted rows by dynamic programming (O(n^2))."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    ls = [lengths[i] for i in order]
    n = len(ls)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # group = sorted rows i..j-1, padded to ls[j-1]
            c = best[i] + (j - i) * ls[j - 1] + row_cost
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training: ``float32`` -> None; ``bfloat16`` -> bf16; ``auto`` -> bf16 on a
    CUDA GPU that supports it or a CPU with AMX / AVX512-BF16 matrix units, else None (fp32)."""
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        return torch.bfloat16 if amx else None
    return None


def can_compile(device: torch.device) -> bool:
    """Whether torch.compile's default backend (inductor) can build kernels here: a C++ compiler
    on CPU, triton on a CUDA GPU."""
    if device.type == "cpu":
        return any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "clang++", "c++"))
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    return False


@contextlib.contextmanager
def compiled_layers(model, first: int) -> Iterator[None]:
    """Decoder layers ``first..`` run their forward through ``torch.compile`` inside the block
    (elementwise work fused: norms, rotary, softmax, activations, in forward and backward); the
    plain forward is back on exit. Each layer's compiled forward is built once and kept for later
    rounds; shapes are dynamic, so a round with another number of rows does not recompile."""
    from memoe.models import decoder_layers

    layers = list(decoder_layers(model))[first:]
    for layer in layers:
        fn = layer.__dict__.get("_memoe_compiled")
        if fn is None:
            fn = layer._memoe_compiled = torch.compile(type(layer).forward.__get__(layer), dynamic=True)
        layer.forward = fn
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


@contextlib.contextmanager
def training_precision(model, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast the frozen model's forward/backward to ``dtype`` (trainable weights stay fp32; the
    loss is computed in fp32). On CPU, attention runs as plain matmuls ("eager"): torch's bf16
    flash-attention backward on CPU is several times slower than its fp32 one."""
    if dtype is None:
        yield
        return
    device = next(model.parameters()).device
    impl = getattr(model.config, "_attn_implementation", None)
    switch = device.type == "cpu" and impl not in (None, "eager") and hasattr(model, "set_attn_implementation")
    # frozen weights are cast once here, not at every autocast call (autocast caches only the
    # casts of trainable leaves); the fp32 originals are put back on exit
    from memoe.models import decoder_layers

    # LayerNorm (GPT-2) keeps fp32 weights: autocast runs layer_norm in fp32, and fp32 input with bf16
    # weights is an error there
    frozen = [
        p
        for layer in decoder_layers(model)
        for m in layer.modules()
        if not isinstance(m, torch.nn.LayerNorm)
        for p in m.parameters(recurse=False)
    ]
    stash = [(p, p.data) for p in frozen if not p.requires_grad and p.dtype == torch.float32]
    if switch:
        model.set_attn_implementation("eager")
    try:
        for p, data in stash:
            p.data = data.to(dtype)
        with torch.autocast(device.type, dtype=dtype):
            yield
    finally:
        for p, data in stash:
            p.data = data
        if switch:
            model.set_attn_implementation(impl)
