"""GRACE (Hartvigsen et al., NeurIPS 2023): a discrete key-value codebook at one layer's MLP output.

- key: the MLP's input hidden state at the last prompt token of the input (one per edit);
- at inference, the query (the same hidden state of the current input) is compared with every key
  (Euclidean distance); if the nearest key lies within its deferral radius ``eps``, the MLP output is
  replaced by that key's learned value at all positions from the key token on - including every token
  generated afterwards with the KV cache (the decision taken at the first forward of a sequence is
  kept for the cached steps);
- codebook update per edit (the paper's rules): empty codebook or nearest key farther than
  ``eps_nearest + eps_init`` -> add a new entry (radius ``eps_init``); within that range with the SAME
  target -> expand the nearest entry's radius to the distance and reuse its value; with a DIFFERENT
  target -> split: both radii shrink to half the distance and a new entry is added;
- values start from the unedited MLP output at the key token and are trained (Adam) on the target
  NLL with the prompt masked; only the entries of the current round train.

The last prompt token is found from ``route(prompts)`` (the number of prompt tokens, the attention
mask's padding) so right-padded teacher forcing and left-padded generation pick the same token;
without ``route`` the last non-padding token of the input is the key token.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import polars as pl
import torch

from memoe.editors.base import Editor, EditResult
from memoe.editors.common import body_hidden, edit_batch, head_nll, layer_cache, past_length, train_steps
from memoe.models import mlp_of, num_layers


class GraceEditor(Editor):
    name = "grace"

    def __init__(self, model, tokenizer, cfg, seed: int = 0):
        super().__init__(model, tokenizer, cfg, seed)
        self.layer = cfg.layer % num_layers(model)
        self.mlp = mlp_of(model, self.layer)
        p = next(self.mlp.parameters())
        hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
        self.keys = torch.zeros(0, hidden, device=p.device, dtype=torch.float32)
        self.values = torch.zeros(0, hidden, device=p.device, dtype=torch.float32)
        self.eps = torch.zeros(0, device=p.device, dtype=torch.float32)
        self.labels: list[str] = []
        self._prompts: list[str] | None = None
        self._key_pos: torch.Tensor | None = None  # per row, set at the first forward of a sequence
        self._pending = False  # the next MLP call is a sequence's first forward
        self._sel: torch.Tensor | None = None  # per row: entry index or -1 (kept for cached steps)
        self._mode = "infer"  # "infer" | "record" | "train"
        self._train_assign: torch.Tensor | None = None
        self._train_values: torch.Tensor | None = None
        self._recorded: torch.Tensor | None = None
        self._hooks = [
            model.base_model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            self.mlp.register_forward_hook(self._mlp_hook),
        ]

    # ------------------------------------------------------------------ hooks
    @contextlib.contextmanager
    def route(self, prompts: list[str]) -> Iterator[None]:
        old, self._prompts = self._prompts, list(prompts)
        try:
            yield
        finally:
            self._prompts = old

    def _pre_hook(self, module, args, kwargs):
        if self._mode != "infer" or past_length(kwargs) > 0:
            return None  # a cached generation step: keep the decision of the first forward
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        B, T = ref.shape[0], ref.shape[1]
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            mask = torch.ones(B, T, dtype=torch.long, device=ref.device)
        pos = torch.arange(T, device=ref.device)
        last_real = torch.where(mask.bool(), pos, torch.full_like(pos, -1)).max(1).values.clamp(min=0)
        if self._prompts is not None and len(self._prompts) == B:
            first_real = torch.where(mask.bool(), pos, torch.full_like(pos, T)).min(1).values.clamp(max=T - 1)
            n_p = torch.tensor([len(self.tokenizer(p).input_ids) for p in self._prompts], device=ref.device)
            key_pos = torch.minimum(first_real + n_p - 1, last_real)
        else:
            key_pos = last_real
        self._key_pos = key_pos
        self._pending = True
        return None

    def _mlp_hook(self, module, args, output):
        x = args[0]
        B, T = x.shape[0], x.shape[1]
        if self._mode == "record":
            rows = torch.arange(B, device=x.device)
            self._recorded = (x[rows, self._key_pos].detach().float(), output[rows, self._key_pos].detach().float())
            return None
        if self._mode == "train":
            vals = self._train_values[self._train_assign]  # (B, h)
            after = torch.arange(T, device=x.device)[None, :] >= self._key_pos[:, None]
            return torch.where(after[..., None], vals[:, None, :].to(output.dtype), output)
        if self.keys.shape[0] == 0:
            return None
        if self._pending:
            self._pending = False
            rows = torch.arange(B, device=x.device)
            q = x[rows, self._key_pos.clamp(max=T - 1)].float()
            d = torch.cdist(q, self.keys)  # (B, K)
            dmin, idx = d.min(1)
            self._sel = torch.where(dmin <= self.eps[idx], idx, torch.full_like(idx, -1))
            after = torch.arange(T, device=x.device)[None, :] >= self._key_pos[:, None]
        else:  # cached generation step: every new position comes after the key token
            if self._sel is None or self._sel.shape[0] != B:
                return None
            after = torch.ones(B, T, dtype=torch.bool, device=x.device)
        hit = self._sel >= 0
        if not bool(hit.any()):
            return None
        vals = self.values[self._sel.clamp(min=0)].to(output.dtype)
        m = (after & hit[:, None])[..., None]
        return torch.where(m, vals[:, None, :], output)

    # ------------------------------------------------------------------ editing
    def _codebook_update(self, keys: torch.Tensor, outs: torch.Tensor, targets: list[str]) -> torch.Tensor:
        """Apply the add / expand / split rules per edit; returns each edit's entry index."""
        eps0 = float(self.cfg.eps)
        assign = []
        for k, o, t in zip(keys, outs, targets):
            if self.keys.shape[0]:
                d = torch.linalg.vector_norm(self.keys - k[None], dim=1)
                dmin, j = d.min(0)
                dmin, j = float(dmin), int(j)
                if dmin <= float(self.eps[j]) + eps0:
                    if self.labels[j] == t:  # same answer: expand the entry to cover this key
                        self.eps[j] = max(float(self.eps[j]), dmin)
                        assign.append(j)
                        continue
                    # conflict: split the space between the two keys
                    self.eps[j] = dmin / 2
                    self._add(k, o, t, dmin / 2)
                    assign.append(self.keys.shape[0] - 1)
                    continue
            self._add(k, o, t, eps0)
            assign.append(self.keys.shape[0] - 1)
        return torch.tensor(assign, device=keys.device)

    def _add(self, key, value, label, eps):
        self.keys = torch.cat([self.keys, key[None]])
        self.values = torch.cat([self.values, value[None]])
        self.eps = torch.cat([self.eps, torch.tensor([eps], device=self.eps.device)])
        self.labels.append(label)

    def edit(self, records: pl.DataFrame) -> EditResult:
        cfg, t0 = self.cfg, time.perf_counter()
        torch.manual_seed(self.seed + self.edits_applied)
        prompts, targets = records["prompt"].to_list(), records["target_new"].to_list()
        b = edit_batch(self.tokenizer, prompts, targets, self.device)
        fwd = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        try:
            self._mode = "record"
            with torch.no_grad():  # records the keys; the layers below the codebook's then run only once
                self._key_pos = b["last_prompt"]
                self._recorded = None
                cache = layer_cache(self.model, self.layer, b)
                if self._recorded is None:  # no cache, or the codebook's layer is the last one
                    self.model.base_model(**fwd)
            keys, outs = self._recorded
            n_before = self.keys.shape[0]
            assign = self._codebook_update(keys, outs, targets)
            vals = self.values.clone().requires_grad_(True)
            opt = torch.optim.Adam([vals], lr=cfg.lr)
            self._mode, self._train_assign, self._train_values = "train", assign, vals

            def loss_fn(b) -> torch.Tensor:
                self._key_pos = b["last_prompt"]
                return head_nll(self.model, body_hidden(self.model, b, cache), b["labels"])

            losses = train_steps(opt, loss_fn, [b], cfg.steps, cfg.early_stop_loss, on_step=self.on_step)
            self.values = vals.detach().clone()
        finally:
            self._mode, self._train_values, self._train_assign, self._recorded = "infer", None, None, None
            self._sel, self._pending = None, False
        self.edits_applied += len(prompts)
        return EditResult.of(
            losses,
            t0,
            len(prompts),
            **{
                "codebook_size": int(self.keys.shape[0]),
                "new_entries": int(self.keys.shape[0] - n_before),
                "mean_eps": float(self.eps.mean()),
            },
        )

    # ------------------------------------------------------------------ state
    def unchanged_layers(self) -> int:
        """The layers below ``layer``: the codebook acts on its layer's MLP output."""
        return self.layer

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys.clone(), "values": self.values.clone(), "eps": self.eps.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.keys = state["keys"].to(self.device, torch.float32).clone()
        self.values = state["values"].to(self.device, torch.float32).clone()
        self.eps = state["eps"].to(self.device, torch.float32).clone()
        if len(self.labels) != self.keys.shape[0]:
            self.labels = [""] * self.keys.shape[0]

    def extra_state(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.labels = list(state.get("labels", []))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.keys = self.keys[:0]
        self.values = self.values[:0]
        self.eps = self.eps[:0]
        self.labels = []
        self.edits_applied = 0
