"""FT-L and FT-M: fine-tune the output projection of one layer's MLP.

- FT-L (ROME's constrained fine-tuning baseline, as EasyEdit implements it, ``prompt_last``):
  the loss is the NLL of the FIRST target token predicted at the LAST PROMPT token; after every
  optimiser step the weight change is clamped to an L-inf ball of radius ``norm_constraint``
  around the weights the edit call started from.
- FT-M (EasyEdit's ``target_new`` objective): the same layer, NLL of all target tokens with the
  prompt masked; no norm constraint unless one is configured.

The state is the weight delta w.r.t. the unedited weights; ``remove()`` copies the originals back.
Works for nn.Linear and GPT-2's Conv1D alike (only the weight tensor is trained).
"""
from __future__ import annotations

import time

import polars as pl
import torch

from memoe.editors.base import Editor, EditResult
from memoe.editors.common import body_hidden, edit_batches, head_nll, layer_cache
from memoe.models import arch_of, mlp_of, num_layers


def out_proj_of(model, layer: int) -> torch.nn.Module:
    return getattr(mlp_of(model, layer), arch_of(model).out_proj)


class FTEditor(Editor):
    name = "ft"

    def __init__(self, model, tokenizer, cfg, seed: int = 0):
        super().__init__(model, tokenizer, cfg, seed)
        self.name = cfg.name
        self.layer = cfg.layer % num_layers(model)
        self.weight = out_proj_of(model, self.layer).weight
        self.original = self.weight.detach().clone()
        self.delta = torch.zeros_like(self.original)

    @property
    def _key(self) -> str:
        return f"delta.layer{self.layer}"

    def edit(self, records: pl.DataFrame) -> EditResult:
        cfg, t0 = self.cfg, time.perf_counter()
        torch.manual_seed(self.seed + self.edits_applied)
        batches = edit_batches(self.tokenizer, records, cfg.batch_size, self.device)
        # the layers below the trained one compute the same thing at every step: run them once
        caches = [layer_cache(self.model, self.layer, b) for b in batches]
        start = self.weight.detach().clone()  # the constraint is relative to the weights of this call
        w = self.weight
        w.requires_grad_(True)
        opt = torch.optim.Adam([w], lr=cfg.lr, weight_decay=cfg.weight_decay)
        losses: list[float] = []
        try:
            for _ in range(cfg.steps):
                tot = 0.0
                for b, cache in zip(batches, caches):
                    opt.zero_grad(set_to_none=True)
                    h = body_hidden(self.model, b, cache)
                    if self.name == "ft-l":  # the first target token, predicted at the last prompt token
                        rows = torch.arange(h.shape[0], device=h.device)
                        loss = head_nll(self.model, h, b["labels"], rows, b["last_prompt"])
                    else:
                        loss = head_nll(self.model, h, b["labels"])
                    loss.backward()
                    opt.step()
                    if cfg.norm_constraint is not None:
                        with torch.no_grad():
                            w.copy_(torch.clamp(w, start - cfg.norm_constraint, start + cfg.norm_constraint))
                    tot += float(loss.detach()) * len(b["input_ids"])
                losses.append(tot / records.height)
                if losses[-1] < cfg.early_stop_loss:
                    break
        finally:
            w.requires_grad_(False)
            w.grad = None
        # make the in-memory weights exactly what load_state_dict(state_dict()) rebuilds
        with torch.no_grad():
            self.delta = (w - self.original).detach().clone()
            w.copy_(self.original + self.delta)
        self.edits_applied += records.height
        return EditResult(steps=len(losses), loss_first=losses[0], loss_final=losses[-1],
                          seconds=time.perf_counter() - t0, n_edits=records.height,
                          details={"delta_linf": float(self.delta.abs().max())})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {self._key: self.delta.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.delta = state[self._key].to(self.original).clone()
            self.weight.copy_(self.original + self.delta)

    def remove(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.original)
        self.delta.zero_()
        self.edits_applied = 0
