"""The settings of lora (its defaults and the description of each key; ``memoe config`` lists them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from memoe.methods import Strict


class LoRAMethod(Strict):
    """LoRA through peft (memoe/editors/lora/editor.py); defaults follow EasyEdit's LoRA hparams."""

    name: Literal["lora"] = "lora"
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="module names, or the aliases 'mlp_out' / 'mlp_in' (the MLP projections of any architecture)",
    )
    layers: list[int] | None = Field(None, min_length=1, description="decoder layers to adapt; null = all")
    rank: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA scaling alpha")
    lr: float = Field(5e-3, gt=0, description="Adam learning rate")
    steps: int = Field(70, ge=1, description="optimiser steps per round (cap)")
    weight_decay: float = Field(0.0, ge=0.0, description="Adam weight decay")
    batch_size: int | None = Field(None, ge=1, description="edits per optimiser step; null = all edits of the round")
    early_stop_loss: float = Field(0.01, ge=0.0, description="stop when the mean target NLL is below this")
