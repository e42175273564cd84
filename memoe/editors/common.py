"""Training helpers shared by the editors: edit batches with the prompt masked, target NLL."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from memoe.metrics import encode_pair


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
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, npr:len(seq)] = torch.tensor(seq[npr:])
        last_prompt[i] = npr - 1
    return {k: v.to(device) for k, v in
            dict(input_ids=ids, attention_mask=mask, labels=labels, last_prompt=last_prompt).items()}


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


def edit_batches(tokenizer, records, batch_size: int | None, device) -> list[dict[str, torch.Tensor]]:
    """The records' (prompt, target_new) pairs as ``edit_batch`` chunks of ``batch_size`` (all: None)."""
    prompts, targets = records["prompt"].to_list(), records["target_new"].to_list()
    bs = batch_size or len(prompts)
    return [edit_batch(tokenizer, prompts[i:i + bs], targets[i:i + bs], device) for i in range(0, len(prompts), bs)]
