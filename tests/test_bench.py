"""The benchmark's measuring tools (the benchmarks themselves are `memoe bench`, not tests)."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from memoe.bench import MatmulShapes, _mm_flops, replay_matmuls


def _step(lin, x):
    lin(x).pow(2).sum().backward()


def test_matmul_recorder_sees_the_same_flops_as_torch_and_replays_them():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 48)
    x = torch.randn(2, 5, 32, requires_grad=True)
    rec = MatmulShapes()
    with rec:
        _step(lin, x)
    with FlopCounterMode(display=False) as fc:
        _step(lin, x)
    # forward (addmm), gradient of the input and of the weight (mm): 3 multiplies
    assert sum(rec.calls.values()) == 3
    assert sum(_mm_flops(k) * n for k, n in rec.calls.items()) == fc.get_total_flops()
    # transposed operands keep their strides in the record (backward multiplies by W^T, x^T)
    assert any(k[1] != tuple(torch.empty(k[0]).stride()) or k[3] != tuple(torch.empty(k[2]).stride())
               for k in rec.calls)
    flops, seconds = replay_matmuls(rec.calls, torch.device("cpu"), repeats=2)
    assert flops == fc.get_total_flops() and seconds > 0


def test_recorded_step_difference_cancels_set_up():
    a, b = MatmulShapes(), MatmulShapes()
    w = torch.randn(16, 16)
    with a:
        for _ in range(3):
            w @ w
        torch.randn(4, 16) @ w
    with b:
        for _ in range(2):
            w @ w
        torch.randn(4, 16) @ w
    diff = a.calls - b.calls
    assert list(diff.values()) == [1] and next(iter(diff))[0] == (16, 16)
