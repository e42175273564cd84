"""Tiny randomly initialised causal LMs (width 64, 4 layers) of the architectures memoe supports:
the tests' models and the sweep benchmark's default, built from a config (no weights downloaded)."""

import torch


def tiny_model(kind: str, vocab_size: int, seed: int = 0):
    """A tiny randomly initialised causal LM of the given architecture, built from a config."""
    from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    gated = dict(  # the LLaMA-style dimensions (grouped-query attention, a gated MLP)
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if kind == "llama":
        cfg = LlamaConfig(**gated, tie_word_embeddings=True)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4, n_positions=256)
    elif kind == "gemma2":  # a norm after the MLP: the MLP's output is not added to the residual as it is
        cfg = Gemma2Config(**gated, head_dim=16)
    else:
        raise ValueError(f"tiny_model: no tiny {kind!r} (llama, gpt2, gemma2)")
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
