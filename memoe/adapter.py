"""The MEMoE bypass adapter: a mixture of experts beside the MLP of decoder layer(s) ``l``.

    h = MLP_l(x) + lam * gate_row * mask_pos * sum_{e in TopK} G_e(x) * Expert_e(x [, a])
    G(x) = TopK(softmax(W_g [x ; a] + noise))        noise only while training
    a = pooled frozen input embedding of the row's knowledge anchor

It is attached with a forward hook on the MLP module (removable); every base weight stays
frozen. Expert output projections start at zero, so a fresh adapter adds exactly nothing.

Per-row routing context (``RouteState``: anchor vector, anchor gate, first active position) is
either set explicitly by the caller (``explicit``: the editor's ``route(prompts)``) or, in a plain
forward / ``generate`` call, found from the input ids by ``RouteState.auto`` (the editor's anchor
finder) when the body is called with no KV cache behind it (a prefill or a full forward). Either
persists across generation steps: with a KV cache, later steps have one token per row and every such
token is after the anchor.
Left padding is read from the ``attention_mask`` the body receives (a pre-hook on the body).
Packed batches (several rows per sequence, for training) give the context per token instead:
``anchor`` (B, T, d_a) and ``active`` (B, T).

A grown adapter (``grow``) holds several *blocks*, each a full set of experts for every edited
layer; ``RouteState.block`` names each row's block (an int for the whole batch, or (B,) per row;
None: block 0), or, as a bool membership (B, n) or (B, T, n), the several blocks a row runs through
(their terms add up). Only a row's own blocks run on it, so per-token compute does not grow with the
number of blocks; ``grow`` freezes every earlier block.

This module knows nothing about the editor or about how anchors are found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from memoe.models import arch_of, decoder_layers, mlp_of


@dataclass
class RouteState:
    """Per-row routing context shared by the adapter layers of one model."""

    anchor: torch.Tensor | None = None  # (B, d_a) anchor embeddings (zeros: no anchor); (B, T, d_a) per token
    gate: torch.Tensor | None = None  # (B,) 1.0 where the adapter acts on the row, 0.0 where silent
    start: torch.Tensor | None = None  # (B,) first active token index in the unpadded row (0: all)
    active: torch.Tensor | None = None  # (B, T) bool: where the adapter acts, given per token (packed rows)
    attention_mask: torch.Tensor | None = None  # captured from the body's forward call (2-D)
    past: int = 0  # tokens already in the KV cache at the body's forward call
    record: list | None = None  # when a list: each hook call appends routing info (diagnostics)
    default_gate: float = 0.0  # gate for a forward call made without any route context
    explicit: bool = False  # the context was set by the caller (route()); auto-routing then stays off
    # grown adapter: the block of every row (int), of each row (B,) long, or the blocks each row (B, n) or token
    # (B, T, n) runs through (bool membership over blocks 0..n-1; their terms add up)
    block: int | torch.Tensor | None = None
    # drop-in routing: (input_ids (B, T), attention_mask (B, T) | None) -> {anchor, gate, start}
    auto: Callable[[torch.Tensor, torch.Tensor | None], dict] | None = None
    scope: list | None = None  # per-row data for ``mask_fn`` (the fact gate: each row's edited subject)
    # (B, T, device) -> (B, T) bool, ANDed into where the adapter acts when ``scope`` is set (per-row rows)
    mask_fn: Callable[[int, int, torch.device], torch.Tensor] | None = None

    def clear(self) -> None:
        self.anchor = self.gate = self.start = self.active = self.block = self.scope = None

    def set(self, ctx: dict | None, explicit: bool = True) -> tuple:
        """Install a routing context ({anchor, gate, start[, active]}; None clears it); returns the
        previous one for ``restore``."""
        old = (self.anchor, self.gate, self.start, self.active, self.block, self.scope, self.explicit)
        ctx = ctx or {}
        self.anchor, self.gate, self.start = ctx.get("anchor"), ctx.get("gate"), ctx.get("start")
        self.active, self.block, self.scope = ctx.get("active"), ctx.get("block"), ctx.get("scope")
        self.explicit = explicit
        return old

    def restore(self, old: tuple) -> None:
        self.anchor, self.gate, self.start, self.active, self.block, self.scope, self.explicit = old


class MoELayer(nn.Module):
    """Router + E experts for one MLP. ``form``: lowrank (d->r->d) or ffn (the MLP's own shape,
    gated SiLU like llama's MLP)."""

    def __init__(
        self,
        d: int,
        d_anchor: int,
        num_experts: int,
        top_k: int,
        form: str = "lowrank",
        rank: int = 32,
        ffn_dim: int | None = None,
        lam: float = 1.0,
        noise: float = 1.0,
        expert_sees_anchor: bool = False,
        act: str = "none",
    ):
        super().__init__()
        self.d, self.d_anchor, self.E, self.k = d, d_anchor, num_experts, top_k
        self.form, self.lam, self.noise, self.sees_anchor, self.act = form, lam, noise, expert_sees_anchor, act
        self.router = nn.Linear(d + d_anchor, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        m = rank if form == "lowrank" else (ffn_dim or 4 * d)
        self.m = m
        self.w_in = nn.Parameter(torch.randn(num_experts, d, m) / d**0.5)
        if form == "ffn":
            self.w_gate = nn.Parameter(torch.randn(num_experts, d, m) / d**0.5)
        self.w_out = nn.Parameter(torch.zeros(num_experts, m, d))  # zero: a fresh adapter adds 0
        if expert_sees_anchor:
            self.w_anchor = nn.Parameter(torch.randn(num_experts, d_anchor, m) / d_anchor**0.5)
        # (d [+ d_anchor], p) orthonormal directions of what the experts read (the MLP input, and the anchor
        # where they see it) that they never see (``MEMoEAdapter.protect``): their term is zero inside that span
        self.register_buffer("protect", None)
        self.generator: torch.Generator | None = None

    def route(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d), a (N, d_a) -> probs (N, E), top-k weights (N, k), top-k indices (N, k)."""
        logits = self.router(torch.cat([x, a], -1))
        if self.training and self.noise > 0:
            logits = logits + self.noise * torch.randn(
                logits.shape, generator=self.generator, device=logits.device, dtype=logits.dtype
            )
        probs = logits.float().softmax(-1)
        w, idx = probs.topk(self.k, dim=-1)
        return probs, w.to(x.dtype), idx

    def experts(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """All experts on all rows: (N, d), (N, d_a) -> (E, N, d)."""
        hid = torch.einsum("nd,edm->enm", x, self.w_in)
        if self.sees_anchor:
            hid = hid + torch.einsum("nd,edm->enm", a, self.w_anchor)
        if self.form == "ffn":
            hid = F.silu(torch.einsum("nd,edm->enm", x, self.w_gate)) * hid
        elif self.act == "gelu":
            hid = F.gelu(hid)
        elif self.act == "silu":
            hid = F.silu(hid)
        return torch.einsum("enm,emd->end", hid, self.w_out)

    def forward(self, x: torch.Tensor, a: torch.Tensor, active: torch.Tensor):
        """x (N, d); a (N, d_a); active (N,) bool. Returns delta (N, d), probs, idx (active rows)."""
        delta = torch.zeros_like(x)
        if not bool(active.any()):
            return delta, None, None
        xs, as_ = x[active], a[active]
        probs, w, idx = self.route(xs, as_)
        q = self.protect
        if q is None:
            out = self.experts(xs, as_)  # (E, n, d)
        else:  # the protected directions taken out of what the experts read (the anchor too, where they read it)
            z = torch.cat([xs, as_], -1) if self.sees_anchor else xs
            q = q.to(z.dtype)
            z = z - (z @ q) @ q.T
            out = self.experts(z[:, : self.d], z[:, self.d :] if self.sees_anchor else as_)
        sel = out.gather(0, idx.t()[:, :, None].expand(-1, -1, x.shape[-1]))  # (k, n, d)
        mix = (w.t()[:, :, None] * sel).sum(0)
        delta[active] = self.lam * mix
        return delta, probs, idx


class MEMoEAdapter(nn.Module):
    """The adapter of a whole model: one ``MoELayer`` per edited layer, hooks, a shared RouteState."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[int],
        *,
        num_experts: int = 4,
        top_k: int = 1,
        form: str = "lowrank",
        rank: int = 32,
        lam: float = 1.0,
        noise: float = 1.0,
        expert_sees_anchor: bool = False,
        act: str = "none",
    ):
        super().__init__()
        n = len(decoder_layers(model))
        self.layer_ids = sorted({l % n for l in layers})
        d = model.get_input_embeddings().weight.shape[1]
        d_model = model.config.hidden_size if hasattr(model.config, "hidden_size") else d
        ffn = getattr(model.config, "intermediate_size", None) or getattr(model.config, "n_inner", None) or 4 * d_model
        param = next(model.parameters())
        self._make = lambda: nn.ModuleDict(
            {
                str(l): MoELayer(d_model, d, num_experts, top_k, form, rank, ffn, lam, noise, expert_sees_anchor, act)
                for l in self.layer_ids
            }
        ).to(device=param.device, dtype=param.dtype)
        self.moe = self._make()  # block 0
        self.grown = nn.ModuleList()  # blocks 1.. (``grow``)
        self.state = RouteState()
        self._handles: list = []
        self._model = [model]  # not a submodule: the adapter's state_dict holds only its own weights
        self.load_stats: dict[int, torch.Tensor] = {}
        self.attach()

    # ------------------------------------------------------------------ blocks
    @property
    def n_blocks(self) -> int:
        return 1 + len(self.grown)

    def block(self, i: int) -> nn.ModuleDict:
        """Block ``i``'s experts and router, one ``MoELayer`` per edited layer (by layer id string)."""
        if not 0 <= i < self.n_blocks:
            raise IndexError(f"adapter block {i} does not exist (the adapter has {self.n_blocks})")
        return self.moe if i == 0 else self.grown[i - 1]

    def grow(self) -> int:
        """Add a fresh block (its output projections zero: it adds nothing yet) and freeze every
        earlier one; returns the new block's index. The new block's initial weights come from torch's
        global generator (callers seed it)."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.grown.append(self._make().train(self.training))  # a new module would be in training mode
        return self.n_blocks - 1

    def parameter_bytes(self) -> int:
        """Bytes of the adapter's weights and of its protected directions (``protect``)."""
        return sum(t.numel() * t.element_size() for t in [*self.parameters(), *self.buffers()])

    def protect(self, block: int, layer: int, basis: torch.Tensor | None) -> None:
        """Block ``block``'s experts at ``layer`` no longer see the directions of ``basis`` (orthonormal
        columns in the space of what they read: the MLP input, followed by the anchor where they see it): their
        term is zero on any input inside that span (null: they see everything)."""
        moe = self.block(block)[str(layer)]
        width = moe.d + (moe.d_anchor if moe.sees_anchor else 0)
        if basis is not None and (basis.dim() != 2 or basis.shape[0] != width):
            raise ValueError(
                f"protected directions of block {block}, layer {layer}: {tuple(basis.shape)}, want ({width}, p)"
            )
        moe.protect = None if basis is None else basis.to(device=moe.w_in.device, dtype=moe.w_in.dtype).contiguous()

    # ------------------------------------------------------------------ hooks
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        if self._handles:
            return
        model = self._model[0]
        for l in self.layer_ids:
            self._handles.append(mlp_of(model, l).register_forward_hook(self._hook(l)))
        body = model.get_submodule(arch_of(model).layers.split(".")[0])
        self._handles.append(body.register_forward_pre_hook(self._capture_mask, with_kwargs=True))

    def remove(self) -> None:
        """Detach from the model: outputs are then bit-identical to the base model's."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _capture_mask(self, module, args, kwargs):
        m = kwargs.get("attention_mask")
        self.state.attention_mask = m if isinstance(m, torch.Tensor) and m.dim() == 2 else None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None and len(args) > 1 and hasattr(args[1], "get_seq_length"):
            cache = args[1]
        st = self.state
        st.past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        if st.explicit:
            return
        if st.auto is None:  # no drop-in routing: a call outside route() has no context
            st.set(None, explicit=False)
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):  # inputs_embeds: no ids to find an anchor in
            st.set(None, explicit=False)
            return
        if st.past == 0 or st.gate is None or st.gate.shape[0] != ids.shape[0]:
            # a prefill or a full forward: the anchors of this batch's rows (kept for the decode steps)
            st.set(st.auto(ids, st.attention_mask), explicit=False)

    def _active(self, B: int, T: int, device) -> torch.Tensor:
        """(B, T) bool: where the adapter acts."""
        st = self.state
        if st.active is not None:
            if tuple(st.active.shape) != (B, T):
                raise RuntimeError(f"route context is for {tuple(st.active.shape)} tokens but the batch has {(B, T)}")
            return st.active.to(device)
        if st.gate is None:
            return torch.full((B, T), st.default_gate > 0, dtype=torch.bool, device=device)
        if st.gate.shape[0] != B:
            raise RuntimeError(f"route context has {st.gate.shape[0]} rows but the batch has {B}")
        act = (st.gate > 0)[:, None].expand(B, T).to(device)
        if st.start is not None and bool((st.start > 0).any()):
            # token index t of this call is sequence position past + t; the row's own tokens start
            # after its left padding (leading zeros of the 2-D attention mask, past tokens included)
            am = st.attention_mask
            pad = torch.zeros(B, dtype=torch.long, device=device)
            if am is not None and am.shape[0] == B and am.shape[1] >= st.past + T:
                pad = (am == 0).long().cumprod(1).sum(1).to(device)
            pos = st.past + torch.arange(T, device=device)[None, :]
            act = act & (pos >= (pad + st.start.to(device))[:, None])
        if st.scope is not None and st.mask_fn is not None:
            act = act & st.mask_fn(B, T, device)
        return act

    def add_term(self, mlp_input: torch.Tensor, mlp_output: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """``mlp_output`` plus the adapter's term for ``mlp_input`` under the current routing context,
        as the hook adds it in a forward (for callers that run layer ``l``'s MLP themselves, e.g. from
        a cache)."""
        return self._hook(self.layer_ids[0] if layer is None else layer)(None, (mlp_input,), mlp_output)

    def delta(self, mlp_input: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """The adapter's term alone for ``mlp_input`` (B, T, d) under the current routing context."""
        return self.add_term(mlp_input, torch.zeros_like(mlp_input), layer)

    def _hook(self, layer: int):
        def hook(module, args, output):
            x = args[0]
            B, T, d = x.shape
            st = self.state
            active = self._active(B, T, x.device)
            if not bool(active.any()):
                if st.record is not None:
                    st.record.append({"layer": layer, "active": active.cpu(), "idx": None})
                return output
            if st.anchor is None:
                a = torch.zeros(B, T, self.moe[str(layer)].d_anchor, dtype=x.dtype, device=x.device)
            elif st.anchor.dim() == 3:  # per token (packed rows)
                a = st.anchor.to(device=x.device, dtype=x.dtype)
            else:
                a = st.anchor.to(device=x.device, dtype=x.dtype)[:, None, :].expand(B, T, -1)
            # the block of each token's row: one block for the batch, or each row's own
            flat = active.reshape(-1)
            if st.block is None or isinstance(st.block, int):
                parts = [(int(st.block or 0), flat)]
            else:
                if st.block.shape[0] != B:
                    raise RuntimeError(f"route context has blocks for {st.block.shape[0]} rows but the batch has {B}")
                if st.block.dtype == torch.bool:  # membership: every block a row (or token) runs through
                    mem = st.block.to(x.device)
                    if mem.dim() == 2:
                        mem = mem[:, None, :].expand(B, T, -1)
                    if tuple(mem.shape[:2]) != (B, T) or mem.shape[2] > self.n_blocks:
                        raise RuntimeError(
                            f"route context has block membership {tuple(mem.shape)} for a batch of {(B, T)} tokens "
                            f"and an adapter of {self.n_blocks} blocks"
                        )
                    mem = mem.reshape(B * T, -1)
                    present = mem[flat].any(0).nonzero(as_tuple=True)[0].tolist()
                    parts = [(int(b), flat & mem[:, b]) for b in present]
                else:
                    tok_block = st.block.to(x.device)[:, None].expand(B, T).reshape(-1)
                    parts = [(int(b), flat & (tok_block == b)) for b in torch.unique(tok_block[flat]).tolist()]
                if not parts:  # active tokens but no block to run: nothing to add
                    return output
            autocast = torch.is_autocast_enabled(x.device.type)
            dt = self.moe[str(layer)].w_in.dtype
            xs, as_ = x.reshape(B * T, d), a.reshape(B * T, -1)
            total = None
            full = torch.full((B * T, self.moe[str(layer)].k), -1, dtype=torch.long) if st.record is not None else None
            for b, act_b in parts:
                moe = self.block(b)[str(layer)]
                if autocast:
                    # mixed-precision training: the adapter runs in its own (fp32) precision and its small
                    # early contributions are added at that precision, not rounded away in a bf16 sum
                    with torch.autocast(x.device.type, enabled=False):
                        delta, probs, idx = moe(xs.to(dt), as_.to(dt), act_b)
                else:
                    delta, probs, idx = moe(xs, as_, act_b)
                total = delta if total is None else total + delta
                if self.training and probs is not None:
                    self.load_stats[layer] = (probs, idx)
                if full is not None and idx is not None:
                    full[act_b.cpu()] = idx.cpu()
            if full is not None:
                st.record.append({"layer": layer, "active": active.cpu(), "idx": full.view(B, T, -1)})
            if autocast:
                output = output.to(dt)
            return output + total.view(B, T, d)

        return hook

    def load_balance_loss(self) -> torch.Tensor:
        """Switch-style auxiliary loss E * sum_e f_e P_e over the last training forward."""
        losses = []
        for probs, idx in self.load_stats.values():
            E = probs.shape[-1]
            f = F.one_hot(idx[:, 0], E).float().mean(0)
            losses.append(E * (f * probs.mean(0)).sum())
        self.load_stats = {}
        if not losses:
            return torch.zeros(())
        return torch.stack(losses).mean()

    def set_generator(self, seed: int) -> None:
        dev = next(self.parameters()).device
        for m in self.modules():
            if isinstance(m, MoELayer):
                m.generator = torch.Generator(device=dev).manual_seed(seed)


# ---------------------------------------------------------------------- layer cache
def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last decoder layer (llama/mistral/qwen/gemma ``norm``, gpt2
    ``ln_f``, gpt_neox ``final_layer_norm``); None when unknown (then no layer cache)."""
    body = model.base_model
    for name in ("norm", "ln_f", "final_layer_norm"):
        m = getattr(body, name, None)
        if isinstance(m, nn.Module):
            return m
    return None


class _Stop(Exception):
    pass


@dataclass
class LayerCache:
    """Inputs of decoder layers ``first..`` for one fixed batch: the hidden state entering layer
    ``first`` and every later layer's other call arguments (rotary position embeddings, causal
    mask, position ids), captured once from a normal forward. ``run`` recomputes only layers
    ``first..`` - the layers below compute the same thing at every training step."""

    first: int
    hidden: torch.Tensor
    calls: list = field(default_factory=list)  # [(args_without_hidden, kwargs)] per layer first..

    @classmethod
    @torch.no_grad()
    def capture(
        cls,
        model: nn.Module,
        first: int,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
    ) -> "LayerCache":
        layers = decoder_layers(model)
        calls: list = []
        hidden: list = []
        handles = []

        def pre(i):
            def fn(module, args, kwargs):
                if i == first:
                    hidden.append(args[0].detach() if args else kwargs["hidden_states"].detach())
                rest = args[1:] if args else ()
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                calls.append((rest, kw))
                if i == len(layers) - 1:
                    raise _Stop

            return fn

        for i in range(first, len(layers)):
            handles.append(layers[i].register_forward_pre_hook(pre(i), with_kwargs=True))
        try:
            model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return cls(first, hidden[0], calls)

    def run(self, model: nn.Module, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after the last decoder layer (before the final norm); ``hidden`` replaces
        the cached input of layer ``first`` (e.g. with an edit added to it)."""
        layers = decoder_layers(model)
        h = self.hidden if hidden is None else hidden
        for i, (rest, kw) in zip(range(self.first, len(layers)), self.calls):
            out = layers[i](h, *rest, **kw)
            h = out[0] if isinstance(out, (tuple, list)) else out
        return h


def supports_layer_cache(model: nn.Module) -> bool:
    """Where the cache is exact: the body is embeddings -> decoder layers -> final norm. Gemma-2/3
    soft-cap their logits in the head, which the metrics do not apply either, so they qualify too;
    architectures without a recognised final norm fall back to the full forward."""
    return final_norm(model) is not None
