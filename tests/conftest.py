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

from benchmarks.tiny import tiny_model  # noqa: E402,F401  (tests import it from here)
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


@pytest.fixture(params=["llama", "gpt2"])
def tiny(request, tokenizer):
    return tiny_model(request.param, len(tokenizer)), tokenizer


@pytest.fixture(scope="session")
def real_model():
    from memoe.models import load_model

    return load_model("embedded:smollm2-135m", device="cpu")
