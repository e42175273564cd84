import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from memoe.catalogue import dataset  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ZSRE = dataset("zsre").resolved()  # the data files: the dataset catalogue's (configs/datasets/catalogue.yaml)
CF = dataset("counterfact").resolved()
CF_FLAT = dataset("counterfact-val").resolved()


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (converted once into the cache)."""
    from transformers import AutoTokenizer

    from memoe.models import embedded_checkpoint

    tok = AutoTokenizer.from_pretrained(embedded_checkpoint("smollm2-135m"))
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def tiny_model(kind: str, vocab_size: int, seed: int = 0):
    """A tiny randomly initialised causal LM of the given architecture, built from a config."""
    from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=4, n_head=4, n_positions=256)
    elif kind == "gemma2":  # a norm after the MLP: the MLP's output is not added to the residual as it is
        cfg = Gemma2Config(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=256,
        )
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request, tokenizer):
    return tiny_model(request.param, len(tokenizer)), tokenizer


@pytest.fixture(scope="session")
def real_model():
    from memoe.models import load_model

    return load_model("embedded:smollm2-135m", device="cpu")
