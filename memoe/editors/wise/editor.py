"""WISE (Wang et al., NeurIPS 2024), plain version: a side memory beside one layer's MLP value matrix.

- Side memory W' = W + D for the MLP output projection of layer l; the main memory W never changes.
- Routing: the activation score s(x) = mean over x's tokens of ||A(x) D^T|| (A: the projection's input).
  If s(x) > eps the layer uses the side memory for x, else the main one. The decision is taken at the
  first forward of a sequence and kept for its cached generation steps.
- Training (per round): D, masked to a random fraction ``mask_ratio`` of its entries (knowledge
  sharding: each round writes its own random subspace of the same side memory), is trained with SGD
  on the target NLL through the side memory plus the routing margin loss
      relu(s(x_irr) - irr_margin) + relu(edit_margin - s(x_edit)) + relu(gap - (s(x_edit) - s(x_irr)))
  where x_irr are chunks of unrelated corpus text (memoe.corpus). eps = act_ratio x the smallest score
  of any edit so far.
Simplifications against the paper: one side memory, rounds' subspaces are summed instead of TIES-merged
(overlaps continue training), no memory retrieval across several side memories.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import polars as pl
import torch

from memoe.corpus import token_chunks
from memoe.editors.base import Editor, EditResult
from memoe.editors.common import body_hidden, edit_batch, head_nll, layer_cache, past_length
from memoe.models import arch_of, mlp_of, num_layers


class WiseEditor(Editor):
    name = "wise"

    def __init__(self, model, tokenizer, cfg, seed: int = 0):
        super().__init__(model, tokenizer, cfg, seed)
        self.layer = cfg.layer % num_layers(model)
        self.proj = getattr(mlp_of(model, self.layer), arch_of(model).out_proj)
        self.conv1d = model.config.model_type == "gpt2"
        w = self.proj.weight
        self.D = torch.zeros_like(w)  # side memory minus main memory, same layout as the weight
        self.eps = torch.tensor(float("inf"))
        self._mask: torch.Tensor | None = None  # attention mask of the current sequence
        self._pending = False
        self._use: torch.Tensor | None = None  # per row: side memory on?
        self._mode = "infer"  # "infer" | "train"
        self._scores: torch.Tensor | None = None
        self._irr: torch.Tensor | None = None  # projection inputs on the unrelated chunks
        self._hooks = [
            model.base_model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            self.proj.register_forward_hook(self._proj_hook),
        ]

    def _delta_out(self, a: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        return a @ D.to(a.dtype) if self.conv1d else a @ D.to(a.dtype).T

    def _pre_hook(self, module, args, kwargs):
        if past_length(kwargs) > 0:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            mask = torch.ones(ref.shape[0], ref.shape[1], device=ref.device)
        self._mask = mask.float()
        self._pending = True
        return None

    def _proj_hook(self, module, args, output):
        a = args[0]
        if self._mode == "train":
            extra = self._delta_out(a, self._D_train)
            m = self._mask[:, : a.shape[1]]
            self._scores = (extra.float().norm(dim=-1) * m).sum(1) / m.sum(1).clamp(min=1)
            return output + extra
        if not torch.isfinite(self.eps) or not bool(self.D.any()):
            return None
        if self._pending:
            self._pending = False
            extra = self._delta_out(a, self.D)
            m = (
                self._mask[:, : a.shape[1]]
                if self._mask is not None and self._mask.shape[0] == a.shape[0]
                else torch.ones(a.shape[:2], device=a.device)
            )
            score = (extra.float().norm(dim=-1) * m).sum(1) / m.sum(1).clamp(min=1)
            self._use = score > self.eps.to(score.device)
        elif self._use is None or self._use.shape[0] != a.shape[0]:
            return None
        else:
            extra = self._delta_out(a, self.D)
        if not bool(self._use.any()):
            return None
        return torch.where(self._use[:, None, None], output + extra, output)

    @contextlib.contextmanager
    def route(self, prompts: list[str]) -> Iterator[None]:
        yield

    def _irrelevant_acts(self) -> torch.Tensor:
        """Inputs of the edited projection on the fixed pool of unrelated corpus chunks (chunks, len, m),
        computed once: they do not depend on the side memory, so each step's activation scores of the
        sampled irrelevant chunks are one small matmul with D, not a forward pass."""
        if self._irr is None:
            chunks = token_chunks(
                self.tokenizer, self.cfg.corpus, self.cfg.irr_chunks * self.cfg.irr_len, self.cfg.irr_len
            )
            acts = []

            class _Got(Exception):
                pass

            def grab(module, args):
                acts.append(args[0].detach())
                raise _Got

            h = self.proj.register_forward_pre_hook(grab)
            try:
                ids = torch.tensor(chunks, device=self.device)
                with torch.no_grad():
                    for i in range(0, len(ids), 64):
                        try:
                            self.model.base_model(input_ids=ids[i : i + 64], use_cache=False)
                        except _Got:
                            pass
            finally:
                h.remove()
            self._irr = torch.cat(acts)
        return self._irr

    def _irrelevant_scores(self, D: torch.Tensor, n: int, step: int) -> torch.Tensor:
        acts = self._irrelevant_acts()
        g = torch.Generator().manual_seed(self.seed * 1000 + step)
        pick = torch.randint(len(acts), (n,), generator=g).to(acts.device)
        return self._delta_out(acts[pick], D).float().norm(dim=-1).mean(1)

    def edit(self, records: pl.DataFrame) -> EditResult:
        cfg, t0 = self.cfg, time.perf_counter()
        torch.manual_seed(self.seed + self.edits_applied)
        prompts, targets = records["prompt"].to_list(), records["target_new"].to_list()
        b = edit_batch(self.tokenizer, prompts, targets, self.device)
        n = b["input_ids"].shape[0]
        g = torch.Generator().manual_seed(self.seed + 7919 * self.edits_applied)
        gmask = (torch.rand(self.D.shape, generator=g) < cfg.mask_ratio).to(self.D)
        D = self.D.clone().requires_grad_(True)
        opt = torch.optim.SGD([D], lr=cfg.lr, weight_decay=cfg.weight_decay)
        losses = []
        cache = layer_cache(self.model, self.layer, b)  # layers below the side memory run once
        self._mode, self._D_train = "train", D
        try:
            # its own loop, not common.train_steps: the stopping rule (the NLL and the routing loss) is
            # checked on a step's losses before its update, the gradient is masked between backward and
            # step, and the step's index picks its unrelated chunks
            for step in range(cfg.steps):
                opt.zero_grad(set_to_none=True)
                self._mask = b["attention_mask"].float()
                nll = head_nll(self.model, body_hidden(self.model, b, cache), b["labels"])
                s_e = self._scores
                s_i = self._irrelevant_scores(D, n, self.edits_applied + step)
                act = (
                    torch.relu(s_i - cfg.irr_margin)
                    + torch.relu(cfg.edit_margin - s_e)
                    + torch.relu(cfg.gap - (s_e - s_i))
                ).mean()
                loss = nll + act
                losses.append((float(nll.detach()), float(act.detach())))
                if self.on_step is not None:
                    self.on_step(step + 1, losses[-1][0])
                if losses[-1][0] < cfg.early_stop_loss and losses[-1][1] == 0.0:
                    break
                loss.backward()
                D.grad.mul_(gmask)
                opt.step()
            self.D = D.detach().clone()
            # threshold: act_ratio x the smallest edit score so far (scored without the training mask)
            self._D_train = self.D
            with torch.no_grad():
                self.model.base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
                s_edit = float(self._scores.min())
                s_irr = float(self._irrelevant_scores(self.D, n, self.edits_applied + cfg.steps).max())
        finally:
            self._mode, self._D_train, self._pending, self._use = "infer", None, False, None
        self.eps = torch.minimum(self.eps, torch.tensor(cfg.act_ratio * s_edit))
        self.edits_applied += len(prompts)
        return EditResult(
            steps=len(losses),
            loss_first=losses[0][0],
            loss_final=losses[-1][0],
            seconds=time.perf_counter() - t0,
            n_edits=len(prompts),
            details={
                "act_loss_final": losses[-1][1],
                "eps": float(self.eps),
                "min_edit_score": s_edit,
                "max_irr_score": s_irr,
            },
        )

    def unchanged_layers(self) -> int:
        """The layers below ``layer``: the side memory sits in its layer's MLP."""
        return self.layer

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"side_delta.layer{self.layer}": self.D.clone(), "eps": self.eps.clone().reshape(1)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.D = state[f"side_delta.layer{self.layer}"].to(self.proj.weight).clone()
        self.eps = state["eps"].reshape(()).float().cpu().clone()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.D = torch.zeros_like(self.D)
        self.eps = torch.tensor(float("inf"))
        self.edits_applied = 0
