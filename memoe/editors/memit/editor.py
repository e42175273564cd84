"""MEMIT (Meng et al., ICLR 2023): closed-form batch update of the MLP output projections of several layers.

1. Target vectors: for each edit, a vector delta_i is added to the residual stream (output of the
   LAST edited layer L) at the subject's last token and optimised (Adam, ``v_steps``) on the NLL of
   the new target + ``kl_factor`` x KL of the "{subject} is a" next-token distribution to the
   unedited one + weight decay; its norm is clamped to ``clamp_norm_factor`` x |h_L|.
   z_i = h_L + delta_i.
2. For each edited layer l (lowest first): keys K (inputs of l's MLP output projection at the
   subject's last token, with the weights as updated so far), residual R = (z - h_L(current)) /
   (number of layers left), and the update

       Delta_l = R K^T (mom2_weight * C_l + K K^T)^-1,     C_l = E[k k^T] over a text corpus

   (memoe.corpus.layer_stats, cached on disk) is added to the projection weight (transposed for
   GPT-2's Conv1D).
The state is the weight delta of every edited layer; ``remove()`` restores the originals exactly.
Context templates (ROME's self-generated prefixes) are not used: the edit prompt alone.
"""

from __future__ import annotations

import time

import polars as pl
import torch
import torch.nn.functional as F

from memoe.adapter import final_norm
from memoe.corpus import layer_stats
from memoe.editors.base import Editor, EditResult
from memoe.editors.common import body_hidden, edit_batch, layer_cache
from memoe.models import arch_of, decoder_layers, mlp_of, num_layers


def memit_update(C: torch.Tensor, K: torch.Tensor, R: torch.Tensor, mom2_weight: float) -> torch.Tensor:
    """Delta (d_out x d_k) = R K^T (mom2_weight C + K K^T)^-1 ; K: d_k x n keys, R: d_out x n residuals."""
    C, K, R = C.double(), K.double(), R.double()
    adj = torch.linalg.solve(mom2_weight * C + K @ K.T, K)  # d_k x n
    return R @ adj.T


def subject_last_index(tok, prompt: str, subject: str | None) -> int:
    """Index of the subject's last token in the tokenised prompt (the last prompt token if absent)."""
    n_prompt = len(tok(prompt).input_ids)
    if subject:
        pos = prompt.find(subject)
        if pos < 0:
            pos = prompt.lower().find(subject.lower())
        if pos >= 0:
            return min(len(tok(prompt[: pos + len(subject)].rstrip()).input_ids), n_prompt) - 1
    return n_prompt - 1


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


class MemitEditor(Editor):
    name = "memit"

    def __init__(self, model, tokenizer, cfg, seed: int = 0):
        super().__init__(model, tokenizer, cfg, seed)
        n = num_layers(model)
        self.layers = sorted({l % n for l in cfg.layers})
        self.arch = arch_of(model)
        self.conv1d = model.config.model_type == "gpt2"
        self.weights = {l: getattr(mlp_of(model, l), self.arch.out_proj).weight for l in self.layers}
        self.original = {l: w.detach().clone() for l, w in self.weights.items()}
        self.delta = {l: torch.zeros_like(w) for l, w in self.original.items()}
        self._stats: dict[int, torch.Tensor] | None = None

    # ------------------------------------------------------------------ pieces
    def stats(self) -> dict[int, torch.Tensor]:
        if self._stats is None:
            cfg = self.cfg
            self._stats = layer_stats(
                self.model, self.tokenizer, self.layers, cfg.corpus, cfg.mom2_tokens, cfg.mom2_seq_len
            )
        return self._stats

    def _padded(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = [self.tokenizer(p).input_ids for p in prompts]
        L = max(map(len, enc))
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(enc), L), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), L), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    @torch.no_grad()
    def _keys_and_hidden(self, fwd, idx, layer: int | None):
        """Keys entering ``layer``'s out projection and h_L (output of the last layer), at rows' idx."""
        rows = torch.arange(len(idx), device=self.device)
        got: dict[str, torch.Tensor] = {}
        hs = []
        if layer is not None:
            proj = getattr(mlp_of(self.model, layer), self.arch.out_proj)
            hs.append(proj.register_forward_pre_hook(lambda m, a: got.__setitem__("k", a[0][rows, idx].double())))
        hs.append(
            decoder_layers(self.model)[self.layers[-1]].register_forward_hook(
                lambda m, a, o: got.__setitem__("h", _hidden(o)[rows, idx].double())
            )
        )
        try:
            self.model.base_model(**fwd, use_cache=False)
        finally:
            for h in hs:
                h.remove()
        return got.get("k"), got["h"]

    def compute_z(self, prompts, targets, subjects, idx_prompt) -> tuple[torch.Tensor, list[float]]:
        """Target hidden vectors z (n x d) at the last edited layer (ROME/MEMIT compute_z, batched), and
        the mean target NLL at each step of their search."""
        cfg, L = self.cfg, self.layers[-1]
        b = edit_batch(self.tokenizer, prompts, targets, self.device)
        kl_prompts = [f"{s} is a" for s in subjects]
        kl = self._padded(kl_prompts)
        kl_idx = torch.tensor(
            [subject_last_index(self.tokenizer, p, s) for p, s in zip(kl_prompts, subjects)], device=self.device
        )
        n = len(prompts)
        idx_all = torch.cat([idx_prompt, kl_idx])
        _, h0 = self._keys_and_hidden(
            {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, idx_prompt, None
        )
        h0 = h0.float()
        delta = torch.zeros_like(h0, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=cfg.v_lr)
        state = {"rows": None, "idx": None}

        def add_delta(module, args, output):
            hid = _hidden(output)
            rows, ix = state["rows"], state["idx"]
            d = torch.cat([delta, delta])[: len(rows)]
            hid = hid.index_put((rows, ix), hid[rows, ix] + d.to(hid.dtype))
            return (hid, *output[1:]) if isinstance(output, tuple) else hid

        # one forward over edit rows and KL rows (both padded right to the same length); the layers up
        # to L do not change while delta is optimised: they run once, then each step adds delta to
        # layer L's output and runs only the layers above (the LM head only where the loss reads it)
        T = max(b["input_ids"].shape[1], kl["input_ids"].shape[1])

        def padto(x, v):
            return F.pad(x, (0, T - x.shape[1]), value=v)

        pad = self.tokenizer.pad_token_id or 0
        ids = torch.cat([padto(b["input_ids"], pad), padto(kl["input_ids"], pad)])
        mask = torch.cat([padto(b["attention_mask"], 0), padto(kl["attention_mask"], 0)])
        labels = padto(b["labels"], -100)
        state["rows"] = torch.arange(2 * n, device=self.device)
        state["idx"] = idx_all
        max_norm = cfg.clamp_norm_factor * h0.norm(dim=1, keepdim=True)
        init_kl = None
        losses = []
        rows_all = torch.arange(2 * n, device=self.device)
        cache = (
            layer_cache(self.model, L + 1, {"input_ids": ids, "attention_mask": mask})
            if L + 1 < len(decoder_layers(self.model))
            else None
        )
        hook = None if cache is not None else decoder_layers(self.model)[L].register_forward_hook(add_delta)
        t_rows, t_cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
        head = self.model.get_output_embeddings()
        try:
            # the target-vector search, not common.train_steps: it stops (before the update) once every
            # edit's NLL is below the bound, and projects delta back into its norm ball after each step
            for _ in range(cfg.v_steps):
                opt.zero_grad(set_to_none=True)
                if cache is not None:
                    h_in = cache.hidden.index_put(
                        (rows_all, idx_all),
                        cache.hidden[rows_all, idx_all] + torch.cat([delta, delta]).to(cache.hidden.dtype),
                    )
                    h = final_norm(self.model)(cache.run(self.model, h_in))
                else:
                    h = body_hidden(self.model, {"input_ids": ids, "attention_mask": mask})
                tok_nll = F.cross_entropy(head(h[t_rows, t_cols]).float(), labels[t_rows, t_cols + 1], reduction="none")
                nll = torch.zeros(n, device=self.device).index_add(0, t_rows, tok_nll) / torch.bincount(
                    t_rows, minlength=n
                ).clamp(min=1)  # per edit
                kl_lp = torch.log_softmax(head(h[n:][torch.arange(n, device=self.device), kl_idx]).float(), -1)
                if init_kl is None:
                    init_kl = kl_lp.detach().clone()
                kl_loss = F.kl_div(init_kl, kl_lp, log_target=True, reduction="none").sum(-1)  # KL(now || init)
                wd = cfg.v_weight_decay * delta.norm(dim=1) ** 2 / h0.norm(dim=1) ** 2
                per = nll + cfg.kl_factor * kl_loss + wd
                loss = per.sum()
                losses.append(float(nll.mean().detach()))
                if float(nll.max().detach()) < cfg.early_stop_loss:
                    break
                loss.backward()
                opt.step()
                with torch.no_grad():  # project back into the norm ball
                    nrm = delta.norm(dim=1, keepdim=True)
                    delta.mul_(torch.where(nrm > max_norm, max_norm / nrm, torch.ones_like(nrm)))
        finally:
            if hook is not None:
                hook.remove()
        return (h0 + delta.detach()).double(), losses

    # ------------------------------------------------------------------ editing
    def edit(self, records: pl.DataFrame) -> EditResult:
        cfg, t0 = self.cfg, time.perf_counter()
        torch.manual_seed(self.seed + self.edits_applied)
        prompts, targets = records["prompt"].to_list(), records["target_new"].to_list()
        subjects = [s or "" for s in records["subject"].to_list()]
        C = self.stats()
        t_stats = time.perf_counter() - t0
        if cfg.fact_token == "subject_last":
            idx = [subject_last_index(self.tokenizer, p, s) for p, s in zip(prompts, subjects)]
        else:
            idx = [len(self.tokenizer(p).input_ids) - 1 for p in prompts]
        idx = torch.tensor(idx, device=self.device)
        z, z_losses = self.compute_z(prompts, targets, subjects, idx)
        fwd = self._padded(prompts)
        upd_norms = []
        for i, l in enumerate(self.layers):
            K, h = self._keys_and_hidden(fwd, idx, l)
            R = (z - h).T / (len(self.layers) - i)  # d x n
            upd = memit_update(C[l].to(self.device), K.T, R, cfg.mom2_weight)  # d_out x d_k
            w = self.weights[l]
            with torch.no_grad():
                upd = (upd.T if self.conv1d else upd).to(w.dtype)
                self.delta[l] = self.delta[l] + upd
                w.copy_(self.original[l] + self.delta[l])
            upd_norms.append(float(upd.norm()))
        self.edits_applied += len(prompts)
        # the steps and losses: those of the target-vector search (the update itself is closed-form)
        return EditResult.of(
            z_losses, t0, len(prompts), setup_s=t_stats, **{"upd_norm_mean": sum(upd_norms) / len(upd_norms)}
        )

    # ------------------------------------------------------------------ state
    def unchanged_layers(self) -> int:
        """The layers below the lowest edited one."""
        return min(self.layers)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"delta.layer{l}": d.clone() for l, d in self.delta.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for l in self.layers:
                self.delta[l] = state[f"delta.layer{l}"].to(self.original[l]).clone()
                self.weights[l].copy_(self.original[l] + self.delta[l])

    def remove(self) -> None:
        with torch.no_grad():
            for l in self.layers:
                self.weights[l].copy_(self.original[l])
                self.delta[l].zero_()
        self.edits_applied = 0
