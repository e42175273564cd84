"""The settings of wise (its defaults and the description of each key; ``memoe config`` lists them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from memoe.methods import Strict


class WiseMethod(Strict):
    """WISE side memory (memoe/editors/wise/editor.py); defaults follow EasyEdit's LLaMA hparams."""

    name: Literal["wise"] = "wise"
    layer: int = Field(25, description="decoder layer whose MLP value matrix gets the side memory")
    lr: float = Field(1.0, gt=0, description="SGD lr of the side memory")
    steps: int = Field(70, ge=1, description="optimiser steps per round (cap)")
    mask_ratio: float = Field(0.2, gt=0, le=1, description="fraction of side-memory entries a round may write")
    weight_decay: float = Field(1e-5, ge=0, description="SGD weight decay")
    irr_margin: float = Field(2.0, description="activation score unrelated inputs must stay below")
    edit_margin: float = Field(20.0, description="activation score edits must exceed")
    gap: float = Field(10.0, description="margin between edit and unrelated scores")
    act_ratio: float = Field(0.88, gt=0, description="routing threshold = act_ratio x the smallest edit score")
    corpus: Literal["shakespeare", "pydoc"] = Field("shakespeare", description="unrelated text for the routing loss")
    irr_len: int = Field(32, ge=4, description="tokens per unrelated text chunk")
    irr_chunks: int = Field(256, ge=1, description="unrelated text chunks per round")
    early_stop_loss: float = Field(0.01, ge=0.0, description="stop when the mean target NLL is below this")
