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
from memoe.editors.common import body_hidden, edit_batches, head_nll, layer_cache, train_steps
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

        def loss_fn(item) -> torch.Tensor:
            b, cache = item
            h = body_hidden(self.model, b, cache)
            if self.name == "ft-l":  # the first target token, predicted at the last prompt token
                rows = torch.arange(h.shape[0], device=h.device)
                return head_nll(self.model, h, b["labels"], rows, b["last_prompt"])
            return head_nll(self.model, h, b["labels"])

        @torch.no_grad()
        def constrain() -> None:  # back into the L-inf ball around the weights of this call
            w.copy_(torch.clamp(w, start - cfg.norm_constraint, start + cfg.norm_constraint))

        try:
            losses = train_steps(
                opt,
                loss_fn,
                list(zip(batches, caches)),
                cfg.steps,
                cfg.early_stop_loss,
                on_step=self.on_step,
                after_step=constrain if cfg.norm_constraint is not None else None,
                weight=lambda item: len(item[0]["input_ids"]),
            )
        finally:
            w.requires_grad_(False)
            w.grad = None
        # make the in-memory weights exactly what load_state_dict(state_dict()) rebuilds
        with torch.no_grad():
            self.delta = (w - self.original).detach().clone()
            w.copy_(self.original + self.delta)
        self.edits_applied += records.height
        return EditResult.of(losses, t0, records.height, **{"delta_linf": float(self.delta.abs().max())})

    def unchanged_layers(self) -> int:
        """The layers below ``layer``: only its layer's MLP output projection is trained."""
        return self.layer

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
