"""The settings of grace (its defaults and the description of each key; ``memoe config`` lists them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from memoe.methods import Strict


class GraceMethod(Strict):
    """GRACE codebook at one layer's MLP output (memoe/editors/grace/editor.py); EasyEdit's hparams."""

    name: Literal["grace"] = "grace"
    layer: int = Field(15, description="decoder layer whose MLP output the codebook replaces")
    eps: float = Field(1.0, gt=0, description="initial deferral radius (Euclidean, MLP input space)")
    lr: float = Field(1.0, gt=0, description="Adam lr of the codebook values")
    steps: int = Field(100, ge=1, description="optimiser steps per edit (cap)")
    early_stop_loss: float = Field(0.01, ge=0.0, description="stop when the target NLL is below this")
