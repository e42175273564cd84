"""The converted model in ``$MEMOE_CACHE`` is checked against the checksum written at conversion
(issue 18, items 1, 7 and 8): altered or missing weights are converted again, once, not used and
not retried as a transient fault; an interrupted conversion leaves no temporary folder behind.
The GGUF conversion itself is replaced by a small stand-in (``memoe.models._convert``) that
writes a tiny checkpoint, so these tests take a second."""

from __future__ import annotations

import json

import pytest

from memoe import models


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOE_CACHE", str(tmp_path))
    calls = []

    def fake_convert(name, gguf, tmp):
        calls.append(name)
        (tmp / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (tmp / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        models._write_checksum(tmp)

    monkeypatch.setattr(models, "_convert", fake_convert)
    return tmp_path / "models" / "smollm2-135m", calls


def test_conversion_writes_a_checksum_and_a_later_load_reuses_it(cache):
    target, calls = cache
    assert models.embedded_checkpoint("smollm2-135m") == target
    assert json.loads((target / models.CHECKSUM).read_text()).keys() == {"config.json", "model.safetensors"}
    assert models.embedded_checkpoint("smollm2-135m") == target and calls == ["smollm2-135m"]


def test_altered_weights_are_converted_again(cache):
    target, calls = cache
    models.embedded_checkpoint("smollm2-135m")
    w = target / "model.safetensors"
    b = bytearray(w.read_bytes())
    b[1000] ^= 0xFF  # same size: only the content tells
    w.write_bytes(bytes(b))
    assert "model.safetensors" in models.cache_problem(target)
    models.embedded_checkpoint("smollm2-135m")
    assert len(calls) == 2 and models.cache_problem(target) is None
    assert w.read_bytes() == bytes(range(256)) * 64
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".smollm2-135m-")]


def test_a_missing_weight_file_is_converted_again_once(cache):
    target, calls = cache
    models.embedded_checkpoint("smollm2-135m")
    (target / "model.safetensors").unlink()
    assert models.embedded_checkpoint("smollm2-135m") == target and (target / "model.safetensors").is_file()
    models.embedded_checkpoint("smollm2-135m")
    assert len(calls) == 2


def test_a_conversion_that_cannot_produce_a_good_copy_is_a_clear_error(cache, monkeypatch):
    target, _ = cache

    def broken(name, gguf, tmp):  # writes a checksum, then the weights change under it
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"a")
        models._write_checksum(tmp)
        (tmp / "model.safetensors").write_bytes(b"b")

    monkeypatch.setattr(models, "_convert", broken)
    with pytest.raises(models.DamagedModelError, match=rf"{target}.*delete the folder"):
        models.embedded_checkpoint("smollm2-135m")


def test_an_interrupted_conversion_leaves_no_temporary_folder(cache, monkeypatch):
    target, _ = cache
    target.parent.mkdir(parents=True)
    stale = target.parent / ".smollm2-135m-killed"  # left by a conversion killed with SIGKILL
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")

    def interrupted(name, gguf, tmp):
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt  # SIGTERM arrives as this (flows/cli.py)

    monkeypatch.setattr(models, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_checkpoint("smollm2-135m")
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == []


def test_a_cache_from_before_checksums_is_adopted(cache):
    target, calls = cache
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"weights")
    assert models.embedded_checkpoint("smollm2-135m") == target and calls == []
    assert (target / models.CHECKSUM).is_file()
