"""The settings of memoe (its defaults and the description of each key; ``memoe config`` lists them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from memoe.methods import Strict


class MEMoEMethod(Strict):
    """MEMoE (memoe/editors/memoe/editor.py). Defaults tuned on ZsRE records 500-539 with the embedded
    SmolLM2-135M (see scripts/tune_memoe.py); the step cap raised to 80 because 100 edits in one
    batch had not reached the stopping loss after 40; load balancing on because without it top-1
    routing collapsed onto one expert (99% of tokens). Beyond the paper's formula, and switchable back:
    ``gate_mode=anchor`` (silent on inputs without a known edited subject; the paper's literal
    formula is ``always``) and ``expert_sees_anchor`` (experts take the anchor embedding too)."""

    name: Literal["memoe"] = "memoe"
    layers: list[int] = Field(
        default_factory=lambda: [20],
        min_length=1,
        description="decoder layer(s) whose MLP gets the adapter (negative: from the end)",
    )
    num_experts: int = Field(4, ge=1, description="experts in the adapter")
    top_k: int = Field(1, ge=1, description="experts routed per token")
    expert_form: Literal["lowrank", "ffn"] = Field(
        "lowrank", description="'lowrank': down/up projections of rank `rank`; 'ffn': the MLP's own shape"
    )
    rank: int = Field(32, ge=1, description="rank of each low-rank expert")
    lam: float = Field(1.0, gt=0, description="scale of the adapter's output added to the MLP's")
    router_noise: float = Field(1.0, ge=0.0, description="std of the router noise while training")
    anchor_pooling: Literal["mean", "last", "sum"] = Field(
        "mean", description="how the anchor's token embeddings are pooled for the router"
    )
    gate_mode: Literal["anchor", "always"] = Field(
        "anchor",
        description="'anchor': adapter silent on inputs without a known anchor; 'always': the paper's formula literally",
    )
    expert_sees_anchor: bool = Field(True, description="experts also take the anchor embedding (beyond the paper)")
    lr: float = Field(3e-2, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    steps: int = Field(80, ge=1, description="optimiser steps per round (cap; early stop usually ends sooner)")
    early_stop_loss: float = Field(0.05, ge=0.0, description="stop when the mean target NLL is below this")
    batch_size: int | None = Field(None, ge=1, description="edits per optimiser step; null = all edits of the round")
    load_balance: float = Field(0.01, ge=0.0, description="weight of the Switch load-balancing loss (0.0: none)")
    context_templates: int = Field(0, ge=0, description="number of self-generated prefixes prepended to edit prompts")
    layer_cache: bool = Field(True, description="compute layers below l once per round")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="training autocast: 'auto' = bf16 on GPUs and CPUs with bf16 matrix units (AMX), else fp32"
    )
    pack_tokens: int | None = Field(
        64,
        ge=1,
        description="training rows packed end to end into sequences of this many tokens, one batch per "
        "step (null: rows padded, in length buckets)",
    )
    max_batch_tokens: int = Field(
        4096,
        ge=1,
        description="packed rows: at most this many tokens per forward/backward, the step's gradient "
        "accumulated over them (bounds the memory of large batches)",
    )
    compile: bool = Field(
        False,
        description="train through the decoder layers above the adapter with torch.compile (inductor: a C++ "
        "compiler on CPU, triton on GPU): faster steps; the first round of a process compiles (about 20 s on 2 CPU "
        "cores, a few seconds once inductor's disk cache has the kernels); eager with a warning where it cannot",
    )
    length_buckets: bool = Field(
        True, description="without packing: split each step's rows into groups of similar length"
    )
    expert_act: Literal["none", "gelu", "silu"] = Field("none", description="nonlinearity inside low-rank experts")
    apply_from: Literal["all", "anchor"] = Field(
        "all", description="'anchor': the adapter acts only from the anchor's last token onward"
    )
    template_tokens: int = Field(10, ge=1, description="length of each self-generated context prefix")
    replay: int | None = Field(
        100,
        ge=0,
        description="sequential: at most this many earlier edits (a seeded sample) replayed per round, so a "
        "round costs the same in round 2 and round 200 (null = all)",
    )
    ner_fallback: bool = Field(True, description="capitalised-span anchor when no known subject matches")
    augment: list[Literal["chat", "lower"]] = Field(
        default_factory=list,
        description="extra training forms of each edit prompt: 'chat' (inside the tokenizer's "
        "chat template), 'lower' (subject lower-cased)",
    )
    scope_negatives: int = Field(
        0,
        ge=0,
        description="relation-aware scope: per edit, this many prompts of its subject with other relations "
        "(memoe/probes.py SCOPE_RELATIONS) on which the adapter's term is trained towards zero (0: off, the paper)",
    )
    plateau_patience: int = Field(
        0,
        ge=0,
        description="also stop a block's training when its loss has not fallen below 0.95 x its best for this many "
        "steps (edits that contradict each other never reach early_stop_loss; 0: off)",
    )
    scope_weight: float = Field(1.0, ge=0.0, description="weight of the scope loss (relative squared adapter term)")
    scope_stop_loss: float = Field(
        1.0, ge=0.0, description="with scope negatives, the early stop also waits for the scope loss to fall below this"
    )
    forget_weight: float = Field(
        1.0,
        ge=0.0,
        description="re-edits: weight of the unlikelihood of the overwritten target on its prompt, in the round "
        "that re-edits it (the tokens it shares with the latest target left out; 0: off); the early stop also "
        "waits for it to fall below early_stop_loss",
    )
    growth: Literal["shared", "round"] = Field(
        "shared",
        description="sequential: 'shared': every round trains the same adapter (the paper's protocol, with "
        "`replay`); 'round': each round adds a new block of experts and freezes the earlier ones, and the anchor index "
        "routes each subject to the block that holds its latest edits (a re-edited subject's other edits move with it)",
    )
    block_edits: int | None = Field(
        None,
        ge=1,
        description="growth 'round': at most this many edits (a round's, and the earlier edits that move with their "
        "subjects) per new block; a larger round is split by subject into several new blocks, so fewer facts share "
        "(and interfere in) one block (null: one block per round)",
    )
    recurring: Literal["move", "stack"] = Field(
        "move",
        description="growth 'round', a subject edited again in a later round: 'move': its earlier edits in force "
        "move into (are retrained in) the new block, which alone serves the subject from then on; 'stack': they "
        "stay in their frozen blocks, the subject's rows run through every block that holds its edits (their terms "
        "add up), and the new block is trained on top of them, leaving the earlier edits as they are (`keep`)",
    )
    keep: Literal["answer", "term", "nullspace"] = Field(
        "answer",
        description="recurring 'stack', how a new block leaves its subjects' earlier edits (held by frozen blocks) "
        "alone: 'term': its own term is trained towards zero on their prompts at the adapter's layer (cheap: no "
        "forward above it); 'answer': they are trained on their targets through the whole stack, as training rows; "
        "'nullspace': the new block never sees the directions their (prompt + target) tokens span at the adapter's "
        "layer, so its term there is zero by construction and nothing of them is trained (one adapter layer)",
    )
    keep_nullspace_tol: float = Field(
        1e-3,
        gt=0.0,
        lt=1.0,
        description="keep 'nullspace': directions of the earlier edits' states with a singular value above this share "
        "of the largest are hidden from the new block",
    )
    keep_weight: float = Field(
        1.0,
        ge=0.0,
        description="recurring 'stack': weight of the new block's relative squared term on the prompts "
        "of its subjects' earlier edits",
    )
    fact_gate: bool = Field(
        False,
        description="relation-aware scope without training: the adapter acts on a row only from where its prompt "
        "reads closer to one of its subject's edit prompts than to the subject's other relations (the frozen "
        "model's states at `fact_gate_layers`; memoe/editors/memoe/fact_gate.py)",
    )
    fact_gate_layers: list[int] = Field(
        default_factory=lambda: [6, 10, 14],
        min_length=1,
        description="fact gate: the hidden states (inputs of these decoder layers, at or below the adapter's) it compares",
    )
    fact_gate_margin: float = Field(
        -0.05, ge=-2.0, le=2.0, description="fact gate: opens where max cos(key) - max cos(negative) exceeds this"
    )
    fact_gate_sentence: bool = Field(
        False,
        description="fact gate: the question's mean covers only the sentence holding the subject (from the token "
        "after the last sentence end or line break before it), so an unrelated sentence before the question or a "
        "chat template's system turn does not move it (false, the default: the whole row so far; measured a wash: "
        "docs/probes.md 2026-12-07)",
    )
    fact_gate_negatives: int = Field(
        18, ge=1, description="fact gate: other relations of each edited subject it compares against (SCOPE_RELATIONS)"
    )
    drop_in: bool = Field(
        True,
        description="the edited model applies its edits in any plain forward / generate call: each row's "
        "anchor is found from its token ids inside the forward (route() still sets it explicitly)",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) > num_experts ({self.num_experts})")
        if self.fact_gate and self.gate_mode != "anchor":
            raise ValueError("fact_gate keys on each row's known subject: it needs gate_mode 'anchor'")
        if self.growth == "round" and self.gate_mode != "anchor":
            raise ValueError(
                "growth 'round' routes each input by its known anchor to a block: it needs gate_mode 'anchor'"
            )
        if self.recurring != "move" and self.growth != "round":
            raise ValueError(
                f"recurring {self.recurring!r} decides how blocks share a subject: it needs growth 'round'"
            )
        if self.keep == "nullspace" and self.recurring == "stack" and len(self.layers) != 1:
            raise ValueError(
                "keep 'nullspace' hides the earlier edits' MLP inputs from the new block, exact only at the adapter's "
                f"lowest layer: it needs one adapter layer (layers: {self.layers})"
            )
        if self.block_edits is not None and self.growth != "round":
            raise ValueError("block_edits splits a round into new blocks: it needs growth 'round'")
        return self
