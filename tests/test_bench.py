"""The benchmark's measuring tools (the benchmarks themselves are `memoe bench`, not tests)."""

import statistics

import polars as pl
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.roofline import MatmulShapes, matmul_replay, mm_flops


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
    assert sum(mm_flops(k) * n for k, n in rec.calls.items()) == fc.get_total_flops()
    # transposed operands keep their strides in the record (backward multiplies by W^T, x^T)
    assert any(
        k[1] != tuple(torch.empty(k[0]).stride()) or k[3] != tuple(torch.empty(k[2]).stride()) for k in rec.calls
    )
    flops, run = matmul_replay(rec.calls, torch.device("cpu"))
    assert flops == fc.get_total_flops() and run() > 0


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


def test_step_time_leaves_the_model_unedited(tokenizer):
    """Timing a method's step edits the model; the benchmark must put it back, or every later
    figure (throughput, evaluation, the scale study) is measured on an edited model."""
    from benchmarks.speed import step_time
    from memoe.editors.ft import FTMethod
    from memoe.editors.memoe import MEMoEMethod

    from .conftest import tiny_model
    from .test_memoe_editor import _recs

    model = tiny_model("llama", len(tokenizer))
    probe = tokenizer(["The mother tongue of Danielle Darrieux is"], return_tensors="pt")
    before = model(**probe).logits
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    memoe = MEMoEMethod(layers=[2], rank=8, lr=5e-2, precision="float32")
    for method in (memoe, FTMethod(name="ft-m", layer=2, lr=1e-2)):
        assert step_time(model, tokenizer, method, _recs(), steps=3) > 0
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks
    assert torch.equal(model(**probe).logits, before)


def test_step_times_time_each_step_through_on_step(tokenizer):
    import time

    from benchmarks.common import StepTimes
    from memoe.editors import make_editor
    from memoe.editors.memoe import MEMoEMethod

    from .conftest import tiny_model
    from .test_memoe_editor import _recs

    ed = make_editor(
        tiny_model("llama", len(tokenizer)),
        tokenizer,
        MEMoEMethod(layers=[2], rank=8, steps=4, early_stop_loss=0.0, precision="float32"),
    )
    seen = []
    pause = 0.05

    def then(step, loss):
        seen.append((step, loss, len(clock.times)))
        time.sleep(pause)

    clock = StepTimes(then=then)
    ed.on_step = clock
    t0 = time.perf_counter()
    clock.start()
    stats = ed.edit(_recs())
    wall = time.perf_counter() - t0
    assert stats.steps == 4 and len(clock.times) == 3 and all(t > 0 for t in clock.times)  # steps 2-4
    assert clock.first > 0  # step 1, from start()
    # the callback runs after each step, its time not counted in any step
    assert [s for s, _, _ in seen] == [1, 2, 3, 4] and [n for _, _, n in seen] == [0, 1, 2, 3]
    assert clock.first + sum(clock.times) + 4 * pause <= wall
    assert seen[-1][1] == stats.loss_final
    ed.edit(_recs())  # a new edit starts afresh (no start(): its first step is not timed)
    assert len(clock.times) == 3 and clock.first is None
    ed.remove()


@pytest.mark.parametrize("compiled", [False, True])
def test_roofline_pairs_each_step_with_a_replay_of_its_matmuls(tokenizer, compiled):
    from benchmarks.roofline import roofline, step_flops
    from memoe.editors.common import can_compile
    from memoe.editors.memoe import MEMoEMethod

    from .conftest import tiny_model
    from .test_memoe_editor import _recs

    if compiled and not can_compile(torch.device("cpu")):
        pytest.skip("no C++ compiler for torch.compile")
    model = tiny_model("llama", len(tokenizer))
    method = MEMoEMethod(layers=[2], rank=8, precision="float32", compile=compiled)
    flops = step_flops(model, tokenizer, method, _recs())
    fig, frac = roofline(
        model, tokenizer, method, _recs(), flops, torch.float32, torch.device("cpu"), steps=4, rounds=2
    )
    pairs = fig["pairs"]
    assert len(pairs["step_s"]) == len(pairs["matmul_s"]) == len(pairs["fraction"]) == 6  # steps 2-4, twice
    assert frac > 0 and frac == statistics.median(pairs["fraction"])
    assert 0 < fig["matmul_flops"] <= flops  # the multiplies are part of the step's work


def test_scale_study_samples_earlier_edits_and_leaves_the_model_unedited(tokenizer):
    from benchmarks.scale import sequential_scale
    from memoe.editors.memoe import MEMoEMethod

    from .conftest import tiny_model
    from .test_adapter import _records

    recs = _records(
        [
            "The mother tongue of Danielle Darrieux is",
            "Homer's most famous poem is",
            "The capital of Norway is",
            "Paris is located in",
        ],
        ["Klingon", "Blue Lagoon", "Bergen", "Peru"],
        ["Danielle Darrieux", "Homer", "Norway", "Paris"],
    )
    model = tiny_model("llama", len(tokenizer))
    probe = tokenizer(["The capital of Norway is"], return_tensors="pt")
    before = model(**probe).logits
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    method = MEMoEMethod(layers=[1], rank=8, lr=5e-2, steps=6, early_stop_loss=0.0, precision="float32")
    res = sequential_scale(model, tokenizer, method, rounds=2, batch=2, recs=recs, retention_sample=1)
    rounds = res["per_round"]
    # the round's own edits and one of the earlier ones, the last round too
    assert [r["scored"] for r in rounds] == [2, 3] and [r["steps"] for r in rounds] == [6, 6]
    assert rounds[-1]["reliability"] > 0.5  # the edits took
    assert res["train_s_median"] == rounds[1]["train_s"] and res["train_s_max_dev"] == 0  # one round after the first
    assert rounds[1]["train_per_eval"] == rounds[1]["train_s"] / rounds[1]["eval_s"]
    assert res["train_per_eval_median"] == rounds[1]["train_per_eval"]
    assert res["train_cpu_s_median"] == rounds[1]["train_cpu_s"] > 0
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_hooks
    assert torch.equal(model(**probe).logits, before)
    # score_all: the last round scores every edit of the study, not the sample
    res = sequential_scale(model, tokenizer, method, rounds=2, batch=2, recs=recs, retention_sample=1, score_all=True)
    assert [r["scored"] for r in res["per_round"]] == [2, 4] and res["score_all"]


def test_scale_study_of_the_grown_adapter_reports_its_size_and_the_earlier_edits(tokenizer, tmp_path):
    """growth 'round' in blocks of one edit: the adapter grows by a block per edit, the sample of earlier
    edits is scored apart (the retention curve's dashed line), and the plot is written."""
    from benchmarks.scale import sequential_scale
    from flows.report import retention_plot
    from memoe.editors.memoe import MEMoEMethod

    from .conftest import tiny_model
    from .test_adapter import _records

    recs = _records(
        ["The mother tongue of Danielle Darrieux is", "Homer's most famous poem is", "The capital of Norway is"],
        ["Klingon", "Blue Lagoon", "Bergen"],
        ["Danielle Darrieux", "Homer", "Norway"],
    )
    model = tiny_model("llama", len(tokenizer))
    method = MEMoEMethod(
        layers=[1], rank=8, lr=5e-2, steps=30, early_stop_loss=0.0, precision="float32", growth="round", block_edits=1
    )
    res = sequential_scale(model, tokenizer, method, rounds=3, batch=1, recs=recs, retention_sample=2)
    rounds = res["per_round"]
    assert res["growth"] == "round" and res["block_edits"] == 1
    assert [r["adapter_bytes"] for r in rounds] == [rounds[0]["adapter_bytes"] * k for k in (1, 2, 3)]
    assert "earlier" not in rounds[0] and rounds[2]["earlier"]["reliability"] == 1.0  # frozen blocks keep them
    assert rounds[2]["scored"] == 3
    # the round's cost drivers: three subjects, none recurring, so one new block a round and nothing moved
    assert [(r["blocks_trained"], r["n_replayed"]) for r in rounds] == [(1, 0)] * 3
    plot = retention_plot({"grown": rounds}, tmp_path / "r.png", "scale")
    assert plot.stat().st_size > 0


def test_mixed_records_refuses_more_edits_than_the_files_hold():
    from benchmarks.scale import mixed_records

    with pytest.raises(ValueError, match="hold 8460"):
        mixed_records(9000)


@pytest.mark.parametrize(
    "growth", [{}, {"growth": "round", "block_edits": 1}, {"growth": "round", "block_edits": 1, "recurring": "stack"}]
)
def test_scale_gauge_leaves_training_unchanged_and_divides_out_the_host(tokenizer, growth):
    """The host-speed gauge (a fixed training pass timed between steps) changes nothing the study
    learns, is taken out of the round's time, and the adjusted time is the round's time at the
    median gauge speed; for the grown adapter it runs through the block being trained."""
    from benchmarks.scale import sequential_scale
    from memoe.editors.memoe import MEMoEMethod

    from .conftest import tiny_model
    from .test_adapter import _records

    recs = _records(
        [
            "The mother tongue of Danielle Darrieux is",
            "Homer's most famous poem is",
            "The capital of Norway is",
            "Paris is located in",
            "The Eiffel Tower is in",
            "Danielle Darrieux was born in",
        ],
        ["Klingon", "Blue Lagoon", "Bergen", "Peru", "Rome", "Oslo"],
        ["Danielle Darrieux", "Homer", "Norway", "Paris", "Eiffel Tower", "Danielle Darrieux"],
    )
    method = MEMoEMethod(
        layers=[1], rank=8, lr=5e-2, steps=6, early_stop_loss=0.0, precision="float32", router_noise=1.0, **growth
    )
    runs = {}
    for every in (0, 4):
        model = tiny_model("llama", len(tokenizer))
        runs[every] = sequential_scale(
            model, tokenizer, method, rounds=3, batch=2, recs=recs, retention_sample=4, gauge_every=every
        )
    plain, gauged = runs[0]["per_round"], runs[4]["per_round"]
    keys = ("loss_final", "reliability", "generality", "locality")
    assert [[r[k] for k in keys] for r in gauged] == [[r[k] for k in keys] for r in plain]
    assert gauged[-1]["reliability"] > 0.5  # the edits took, with the gauge running between steps
    assert all("gauge_s" not in r for r in plain) and "train_s_host_adjusted_max_dev" not in runs[0]
    if not growth:
        assert len({r["adapter_params"] for r in gauged}) == 1  # the gauge's work is the same every round
        assert [len(r["gauge_times"]) for r in gauged] == [1, 1, 1]  # after step 4 of 6
    else:  # two blocks of one edit a round, 6 steps each: counted over the round, after its steps 4, 8, 12
        assert [len(r["gauge_times"]) for r in gauged] == [3, 3, 3]  # (a block's own count reaches 4 twice)
    assert all(r["gauge_s"] == statistics.fmean(r["gauge_times"]) for r in gauged)
    typical = statistics.median(r["gauge_s"] for r in gauged[1:])
    assert runs[4]["gauge_s_median"] == typical > 0
    for r in gauged:
        assert r["train_s_host_adjusted"] == pytest.approx(r["train_s"] * typical / r["gauge_s"])
        assert r["step_per_gauge"] == r["step_s_mean"] / r["gauge_s"]


def test_host_gauge_restores_gradients_and_noise(tokenizer):
    from benchmarks.gauge import host_gauge
    from memoe.editors.memoe import MEMoEMethod
    from memoe.editors.memoe.editor import MEMoEEditor

    from .conftest import tiny_model
    from .test_adapter import _records

    recs = _records(["The capital of Norway is", "Paris is located in"], ["Bergen", "Peru"], ["Norway", "Paris"])
    model = tiny_model("llama", len(tokenizer))
    ed = MEMoEEditor(model, tokenizer, MEMoEMethod(layers=[1], rank=8, precision="float32", router_noise=1.0))
    probe = host_gauge(ed, recs)
    ed.adapter.set_generator(3)
    ed.adapter.train()
    params = [p for p in ed.adapter.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    gen = next(m.generator for m in ed.adapter.modules() if isinstance(getattr(m, "generator", None), torch.Generator))
    state = gen.get_state()
    assert probe() > 0 and probe() > 0  # prepared once, runs again
    assert torch.equal(gen.get_state(), state)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in params)
    ed.remove()


def test_flatness_figures():
    from benchmarks.scale import flatness

    assert flatness([10.0, 10.0, 10.0], "t") == {"t_median": 10.0, "t_max_dev": 0.0, "t_slope_per_round": 0.0}
    f = flatness([10.0, 11.0, 12.0], "t")
    assert (
        f["t_median"] == 11.0 and abs(f["t_max_dev"] - 1 / 11) < 1e-12 and abs(f["t_slope_per_round"] - 1 / 11) < 1e-12
    )
    noisy = flatness([10.0, 14.0, 10.0, 14.0, 10.0], "t")  # spread without growth
    assert noisy["t_max_dev"] > 0.15 and abs(noisy["t_slope_per_round"]) < 0.01


def test_recurring_per_round_counts_subjects_an_earlier_round_edited():
    from benchmarks.scale import recurring_per_round

    rounds = [["Norway", "Homer"], ["Norway", "Paris", "Paris"], [" Homer ", "Paris", "Laos"]]
    parts = [pl.DataFrame({"subject": r}) for r in rounds]
    assert recurring_per_round(parts) == [0, 1, 2]  # a subject twice in its own first round is not recurring


def test_flatness_given_recurring_separates_the_streams_difficulty_from_growth():
    from benchmarks.scale import flatness, flatness_given

    recurring = [0, 3, 1, 6, 2, 9, 4, 12]
    harder = [10.0 + 0.5 * k for k in recurring]  # costs only what its recurring edits add: no growth
    assert flatness(harder, "t")["t_slope_per_round"] > 0.03  # the plain trend blames the edits so far
    f = flatness_given(harder, recurring, "t")
    med = statistics.median(harder)
    assert abs(f["t_slope_given_recurring"]) < 1e-9 and abs(f["t_per_recurring_edit"] - 0.5 / med) < 1e-9
    growing = [10.0 + 0.5 * k + 0.2 * i for i, k in enumerate(recurring)]  # and a real growth of 0.2 s a round
    g = flatness_given(growing, recurring, "t")
    assert abs(g["t_slope_given_recurring"] - 0.2 / statistics.median(growing)) < 1e-9
    flat_stream = flatness_given([10.0, 11.0, 12.0], [0, 0, 0], "t")  # nothing recurs: the plain slope
    assert abs(flat_stream["t_slope_given_recurring"] - 1 / 11) < 1e-9 and flat_stream["t_per_recurring_edit"] == 0.0
    two = flatness_given([10.0, 12.0], [0, 5], "t")  # too few rounds to fit both: the plain slope, not 'flat'
    assert abs(two["t_slope_given_recurring"] - 2 / 11) < 1e-9 and two["t_per_recurring_edit"] == 0.0


def test_eval_study_scores_the_same_with_states_and_results_kept(tokenizer):
    """The study-level evaluation benchmark: every edit so far scored after each round, plain and with
    the states below the edit and the still-valid results kept; the two agree in every round, also
    after round 3 edits round 1's subject again (its kept results no longer hold)."""
    from benchmarks.speed import eval_study
    from memoe.editors.memoe import MEMoEMethod

    from .conftest import tiny_model
    from .test_adapter import _records

    recs = _records(
        ["The capital of Norway is", "Homer's most famous poem is", "The currency of Norway is"],
        ["Bergen", "Blue Lagoon", "Klingon"],
        ["Norway", "Homer", "Norway"],
    )
    model = tiny_model("llama", len(tokenizer))
    method = MEMoEMethod(
        layers=[1], rank=8, lr=5e-2, steps=20, early_stop_loss=0.0, precision="float32", growth="round", block_edits=1
    )
    res = eval_study(model, tokenizer, method, rounds=3, batch=1, recs=recs)
    assert res["same_scores"] is True
    assert [r["edits_scored"] for r in res["per_round"]] == [1, 2, 3]
    assert res["speedup"] == res["plain_s"] / res["kept_s"]
    with pytest.raises(ValueError, match="hold 3"):
        eval_study(model, tokenizer, method, rounds=2, batch=2, recs=recs)
