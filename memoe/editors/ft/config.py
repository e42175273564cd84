"""The settings of ft (its defaults and the description of each key; ``memoe config`` lists them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from memoe.methods import Strict


class FTMethod(Strict):
    """FT-L / FT-M: fine-tune the MLP output projection of one layer (memoe/editors/ft/editor.py)."""

    name: Literal["ft-l", "ft-m"] = "ft-m"
    layer: int = Field(15, description="decoder layer whose MLP out projection is trained (negative: from the end)")
    lr: float = Field(5e-3, gt=0, description="Adam learning rate; default 5e-3 for ft-m, 5e-4 for ft-l")
    steps: int = Field(25, ge=1, description="optimiser steps per round (cap)")
    norm_constraint: float | None = Field(
        None, description="L-inf bound on the weight change per edit call; default 5e-4 for ft-l, none for ft-m"
    )
    weight_decay: float = Field(0.0, ge=0.0, description="Adam weight decay")
    batch_size: int | None = Field(None, ge=1, description="edits per optimiser step; null = all edits of the round")
    early_stop_loss: float = Field(0.01, ge=0.0, description="stop when the mean target NLL is below this")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data):
        # EasyEdit's FT-L constrains the update (lr 5e-4, L-inf bound 5e-4), FT-M does not; the name picks
        # the defaults. FT-M's lr: EasyEdit uses 5e-4 on 7B models; on SmolLM2-135M 5e-4 x 25 steps reaches
        # Rel 0.34 (20 ZsRE edits), so FT-M defaults to 5e-3.
        if isinstance(data, dict) and data.get("name") == "ft-l":
            data = {"lr": 5e-4, "norm_constraint": 5e-4, **data}
        return data
