"""LoRA baseline (EasyEdit's LoRA editor): low-rank adapters through ``peft`` on chosen modules,
trained on the target NLL (prompt masked). The base weights are never changed (no merge), so
``remove()`` unloads the adapters and leaves the original modules, bit for bit.

``target_modules`` are module names (the last component, e.g. ``q_proj``) or the arch-neutral aliases
``mlp_out`` / ``mlp_in`` (the MLP output / input projection of each layer, from memoe.models);
``layers`` restricts them to those decoder layers (null = all layers).
"""

from __future__ import annotations

import time

import polars as pl
import torch

from memoe.editors.base import Editor, EditResult
from memoe.editors.common import body_hidden, edit_batches, head_nll, train_steps
from memoe.models import arch_of, num_layers


def resolve_targets(model, names: list[str], layers: list[int] | None) -> list[str]:
    """Full module names of the targets, restricted to ``layers``."""
    arch = arch_of(model)
    n = num_layers(model)
    layer_set = None if layers is None else {l % n for l in layers}
    alias = {"mlp_out": f"{arch.mlp}.{arch.out_proj}", "mlp_in": f"{arch.mlp}.{arch.in_proj}"}
    wanted = [alias.get(x, x) for x in names]
    prefix = arch.layers + "."
    out = []
    for name, mod in model.named_modules():
        if not name.startswith(prefix) or not isinstance(mod, torch.nn.Module):
            continue
        rest = name[len(prefix) :]
        idx, _, sub = rest.partition(".")
        if not idx.isdigit() or (layer_set is not None and int(idx) not in layer_set):
            continue
        if any(sub == w or sub.endswith("." + w) for w in wanted):
            out.append(name)
    if not out:
        raise ValueError(f"LoRA: no module matches target_modules={names} in layers={layers}")
    return out


class LoRAEditor(Editor):
    name = "lora"

    def __init__(self, model, tokenizer, cfg, seed: int = 0):
        super().__init__(model, tokenizer, cfg, seed)
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        self.targets = resolve_targets(model, list(cfg.target_modules), cfg.layers)
        conf = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=0.0,
            target_modules=self.targets,
            bias="none",
            fan_in_fan_out=model.config.model_type == "gpt2",  # Conv1D
            init_lora_weights=True,
        )
        torch.manual_seed(seed)
        was_training = model.training
        self.lora = LoraModel(model, conf, "default")
        model.train(was_training)
        self.params = {n: p for n, p in model.named_parameters() if "lora_" in n}
        for p in self.params.values():
            p.requires_grad_(False)

    def edit(self, records: pl.DataFrame) -> EditResult:
        cfg, t0 = self.cfg, time.perf_counter()
        torch.manual_seed(self.seed + self.edits_applied)
        batches = edit_batches(self.tokenizer, records, cfg.batch_size, self.device)
        params = list(self.params.values())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        try:
            losses = train_steps(
                opt,
                lambda b: head_nll(self.model, body_hidden(self.model, b), b["labels"]),
                batches,
                cfg.steps,
                cfg.early_stop_loss,
                on_step=self.on_step,
                weight=lambda b: len(b["input_ids"]),
            )
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        self.edits_applied += records.height
        return EditResult.of(losses, t0, records.height, **{"n_params": sum(p.numel() for p in params)})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.params.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.params) - set(state)
        if missing:
            raise KeyError(f"LoRA state lacks {sorted(missing)[:3]}...")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state[n])

    def remove(self) -> None:
        if self.lora is not None:
            self.lora.unload()
            self.lora = None
            self.params = {}
        self.edits_applied = 0
