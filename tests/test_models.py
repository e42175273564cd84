import os
import subprocess
import sys

import pytest
import torch

from memoe.metrics import generate, teacher_forced
from memoe.models import UnknownArchitectureError, arch_of, embedded_checkpoint, mlp_of, mlp_path, num_layers

from .conftest import tiny_model


def test_mlp_locator_llama_and_gpt2(tiny):
    model, _ = tiny
    assert num_layers(model) == 4
    mlp = mlp_of(model, 2)
    assert getattr(mlp, arch_of(model).out_proj) is not None
    assert model.get_submodule(mlp_path(model, -1)) is mlp_of(model, 3)
    with pytest.raises(IndexError, match="4 decoder layers"):
        mlp_of(model, 9)


def test_unknown_architecture_is_a_clear_error(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    model.config.model_type = "mystery"
    with pytest.raises(UnknownArchitectureError, match="'mystery' is not known"):
        mlp_of(model, 0)


def test_teacher_forced_matches_manual(tiny):
    model, tok = tiny
    res = teacher_forced(model, tok, ["The sky is", "Water is"], ["blue", "wet and cold"], batch_size=2)
    for p, t, pred in zip(["The sky is", "Water is"], ["blue", "wet and cold"], res.pred):
        pids = tok(p).input_ids
        tids = tok(" " + t, add_special_tokens=False).input_ids
        ids = torch.tensor([pids + tids])
        logits = model(ids).logits[0]
        manual = logits[len(pids) - 1 : -1].argmax(-1).tolist()
        assert pred == manual


@pytest.mark.slow
def test_real_embedded_model_knows_paris(real_model):
    model, tok = real_model
    assert model.config.model_type == "llama" and num_layers(model) == 30
    (ans,) = generate(model, tok, ["The capital of France is"], max_new_tokens=8)
    assert "Paris" in ans


@pytest.mark.slow
def test_two_first_conversions_at_once_do_not_corrupt_the_cache(tmp_path):
    """Two processes convert into an empty cache at the same time; both end with a loadable model."""
    embedded_checkpoint("smollm2-135m")  # make sure the package is there (and warm the page cache)
    env = dict(os.environ, MEMOE_CACHE=str(tmp_path))
    code = (
        "import torch; torch.set_num_threads(1); from memoe.models import load_model; "
        "m, t = load_model('embedded:smollm2-135m', device='cpu'); print(sum(p.numel() for p in m.parameters()))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert outs[0][0].split()[-1] == outs[1][0].split()[-1]
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m"]  # no temp folder left


@pytest.mark.slow
def test_gemma3_optional_extra_loads_when_installed():
    from memoe.models import find_gguf, load_model

    try:
        find_gguf("gemma3-270m")
    except FileNotFoundError:
        pytest.skip("optional extra memoe[gemma] not installed")
    model, tok = load_model("embedded:gemma3-270m", device="cpu")
    assert model.config.model_type == "gemma3_text" and num_layers(model) == 18
    assert mlp_of(model, 9) is model.model.layers[9].mlp
