"""``memoe run`` refuses before any work, with ``error: ...`` and exit 2 and no traceback, what the
README promises (issue 18, item 6), and long prompts cost per token, not per batch (item 9).
The command runs in this process (``flows.cli.main``): these errors come before Prefect starts."""

from __future__ import annotations

import json

import pytest
import torch

from flows.cli import main

from .conftest import tiny_model
from .test_pipeline import study_config, tiny_dir  # noqa: F401 (fixture)


def _run(capsys, monkeypatch, tmp_path, cfg, *args) -> str:
    monkeypatch.setenv("MEMOE_RUNS", str(tmp_path / "runs"))
    rc = main(["run", str(cfg), *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()
    return err


def _jsonl(tmp_path, recs, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return p


def _recs(n, long_at=None, words=300):
    out = []
    for i in range(n):
        prompt = f"Where does Person{i} live?"
        if i == long_at:
            prompt = " ".join(["very"] * words) + " " + prompt
        out.append({"id": str(i), "subject": f"Person{i}", "prompt": prompt, "target_new": "Paris"})
    return out


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.name=embedded:nope"], "model.name: unknown embedded model 'nope'"),
        (["model.device=tpu"], "model.device"),
        (["eval.retention_sample=-1"], "eval.retention_sample"),
        (["method.lr=-5"], "method.lr"),
        (["method.layers=[99]"], "method.layers[0]: layer 99 is out of range: the model has 4 decoder layers"),
        (["data.n_edits=5000"], "data.n_edits=5000 but protocol.rounds x protocol.batch_size"),
        (["protocol.batch_size=2000", "data.n_edits=6000"], "only 1037 are available"),
    ],
)
def test_bad_settings_are_refused_before_any_work(capsys, monkeypatch, tmp_path, tiny_dir, overrides, message):
    cfg = study_config(tmp_path, tiny_dir)
    args = [a for o in overrides for a in ("--set", o)]
    assert message in _run(capsys, monkeypatch, tmp_path, cfg, *args)


def test_out_pointing_at_a_file_is_refused(capsys, monkeypatch, tmp_path, tiny_dir):
    cfg = study_config(tmp_path, tiny_dir)
    (tmp_path / "taken").write_text("x")
    assert "--out: " in _run(capsys, monkeypatch, tmp_path, cfg, "--out", str(tmp_path / "taken"))


def test_prompt_over_the_context_is_refused_in_preflight_and_skipped_with_skip_bad(
    capsys, monkeypatch, tmp_path, tiny_dir
):
    data = _jsonl(tmp_path, _recs(7, long_at=3))  # the tiny model's context: 256 tokens
    cfg = study_config(tmp_path, tiny_dir, rounds=3, batch=2)
    err = _run(capsys, monkeypatch, tmp_path, cfg, "--set", f"data.path={data}", "--set", "data.format=jsonl")
    assert "d.jsonl, record line 4, field 'prompt'" in err and "exceeds the model's context of 256" in err

    from flows.commands_run import preflight, print_warnings
    from memoe.config import load_config

    c = load_config(cfg, [f"data.path={data}", "data.format=jsonl", "data.skip_bad=true"])
    info = preflight(c)
    assert info["n_available"] == 6 and info["n_skipped"] == 1
    print_warnings(info)
    err = capsys.readouterr().err
    assert "1 bad record(s) skipped" in err and "record line 4" in err  # printed, not only counted
    big = _jsonl(tmp_path, _recs(8, long_at=3), "d8.jsonl")
    c = load_config(
        cfg,
        [
            f"data.path={big}",
            "data.format=jsonl",
            "data.skip_bad=true",
            "data.n_edits=8",
            "protocol.rounds=8",
            "protocol.batch_size=1",
        ],
    )
    with pytest.raises(Exception, match=r"only 7 are available.*\(1 bad records skipped\)"):
        preflight(c)


def test_a_long_prompt_is_warned_about(capsys, tmp_path, tiny_dir):
    from flows.commands_run import preflight, print_warnings
    from memoe.config import load_config

    data = _jsonl(tmp_path, _recs(6, long_at=2, words=600))
    cfg = study_config(tmp_path, tiny_dir, rounds=3, batch=2)
    c = load_config(cfg, [f"data.path={data}", "data.format=jsonl", "model.max_length=4096"])
    info = preflight(c)
    print_warnings(info)
    assert "over 512 tokens" in capsys.readouterr().err


# ------------------------------------------------------------------ item 9: cost per token, not per batch


class _Tokens:
    """Counts the (padded) tokens the model's body runs."""

    def __init__(self, model):
        self.n = 0
        self.h = model.base_model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        self.n += ids.numel()


def test_one_long_prompt_does_not_pad_the_others(tokenizer):
    from memoe.metrics import generate, teacher_forced

    model = tiny_model("llama", len(tokenizer))
    prompts = [f"Where does Person{i} live?" for i in range(15)] + [" ".join(["very"] * 200) + " Where?"]
    targets = ["Paris"] * 16
    real = sum(len(tokenizer(p + " Paris").input_ids) for p in prompts)
    count = _Tokens(model)
    res = teacher_forced(model, tokenizer, prompts, targets, batch_size=16)
    assert count.n < 1.5 * real, (count.n, real)  # all 16 padded to the long one: 16 x 200
    one = teacher_forced(model, tokenizer, prompts[-1:], targets[-1:], batch_size=1)
    assert res.pred[-1] == one.pred[0]
    count.n = 0
    generate(model, tokenizer, prompts, batch_size=16, max_new_tokens=2)
    assert count.n < 1.5 * (real + 2 * 16), count.n


def test_training_keeps_a_long_row_out_of_the_packed_sequences(tokenizer):
    from memoe.editors import make_editor
    from memoe.editors.memoe import MEMoEMethod

    model = tiny_model("llama", len(tokenizer))
    ed = make_editor(model, tokenizer, MEMoEMethod(layers=[2], pack_tokens=64))
    try:
        rows = [(f"Where does Person{i} live?", "Paris", f"Person{i}") for i in range(15)]
        rows.append((" ".join(["very"] * 200) + " Where does Person99 live?", "Paris", "Person99"))
        parts = ed._step_parts(rows, packed=True)
        lengths = sorted(p[0]["input_ids"].shape[1] for p in parts)
        assert lengths[-1] > 200 and all(n <= 64 for n in lengths[:-1]), lengths
        assert sum(p[0]["input_ids"].numel() for p in parts) < 1.5 * sum(
            len(tokenizer(p + " " + t).input_ids) for p, t, _ in rows
        )
        assert sum(p[3] for p in parts) == sum(
            len(tokenizer(" Paris", add_special_tokens=False).input_ids) for _ in rows
        )
    finally:
        ed.remove()
    torch.manual_seed(0)
