"""GPU checks (skipped where no CUDA device is present): the editor and the benchmark's step timing
run on the GPU, in bf16 autocast where the card supports it, and give the CPU's answers."""

import pytest
import torch

from memoe.editors import make_editor
from memoe.editors.memoe import MEMoEMethod
from memoe.metrics import teacher_forced

from .conftest import tiny_model
from .test_memoe_editor import EDITS, FAST, _recs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_edit_on_gpu_changes_the_answer(tokenizer):
    model = tiny_model("llama", len(tokenizer)).cuda()
    ed = make_editor(model, tokenizer, MEMoEMethod(**FAST))
    assert ed.device.type == "cuda"
    stats = ed.edit(_recs())
    assert stats.details["precision"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    after = teacher_forced(model, tokenizer, EDITS["prompts"], EDITS["targets"], editor=ed).acc()
    assert min(after) == 1.0
    ed.remove()


def test_cached_loss_equals_full_forward_on_gpu(tokenizer):
    model = tiny_model("llama", len(tokenizer)).cuda()
    ed = make_editor(model, tokenizer, MEMoEMethod(**FAST, precision="float32"))
    ed.edit(_recs())  # a trained adapter, so its term is not zero
    with torch.no_grad():
        a = ed.train_loss(_recs(), use_cache=True)
        b = ed.train_loss(_recs(), use_cache=False)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    ed.remove()


def test_bench_step_time_on_gpu(tokenizer):
    from benchmarks.speed import step_time

    model = tiny_model("llama", len(tokenizer)).cuda()
    assert step_time(model, tokenizer, MEMoEMethod(**FAST), _recs(), steps=3) > 0
