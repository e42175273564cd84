"""The cache keys (tasks/keys.py and the ``*_key`` functions of tasks/steps.py): a key changes when an input
that changes the task's output changes (a config field, a data file's bytes, the model's weights, the code
the task runs) and stays when one that does not changes (where a file lies, the run store, threads, the
progress sink). A change in one editor's code changes that method's keys and no other method's.

Tiny inputs: a fake model folder (its files are only hashed, never loaded), a few bytes of records.
"""

from __future__ import annotations

import pathlib
import shutil

import pytest

from memoe.config import METHODS, Config, validate_method
from tasks.keys import PROJECT_ROOT, code_version, digest, file_digest, folder_digest, model_fingerprint
from tasks.steps import anchors_key, evaluate_key, locality_key, prepare_key, train_key


@pytest.fixture(autouse=True)
def fresh_code_version():
    """code_version is memoised per process: start and leave each test with the real sources' hashes."""
    code_version.cache_clear()
    yield
    code_version.cache_clear()


def changed(monkeypatch, files: set[pathlib.Path]) -> None:
    """The sources in ``files`` read as if edited (a line appended) when the code version hashes them."""
    real = pathlib.Path.read_bytes
    files = {f.resolve() for f in files}

    def read_bytes(self):
        data = real(self)
        return data + b"\n# edited\n" if self.resolve() in files else data

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    code_version.cache_clear()


def module_file(module: str) -> pathlib.Path:
    base = PROJECT_ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"


def own_files(method: str) -> set[pathlib.Path]:
    """An editor's own sources: its module and, where the method is a package of its own
    (memoe/editors/<method>/), every file of that package."""
    f = module_file(METHODS[method].editor_module)
    editors = PROJECT_ROOT / "memoe" / "editors"
    if f.parent != editors and editors in f.parents:
        package = next(p for p in f.parents if p.parent == editors)
        return set(package.rglob("*.py"))
    return {f}


def write(path: pathlib.Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    write(d / "config.json", b'{"model_type": "llama"}')
    write(d / "model.safetensors", b"weights" * 10)
    write(d / "tokenizer.json", b"{}")
    return d


def model_cfg(model_dir, **kw):
    return {"name": str(model_dir), "device": "cpu", "dtype": "float32", "max_length": None, **kw}


# ------------------------------------------------------------------ content hashes


def test_file_and_folder_digests_are_of_contents_not_places(tmp_path):
    a = write(tmp_path / "a" / "x.bin", b"12345")
    b = write(tmp_path / "b" / "other-name.bin", b"12345")
    assert file_digest(a) == file_digest(b)
    assert file_digest(a) != file_digest(write(tmp_path / "c.bin", b"12346"))
    write(tmp_path / "a" / "sub" / "y.txt", b"y")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert folder_digest(tmp_path / "a") == folder_digest(tmp_path / "copy")
    (tmp_path / "copy" / "sub" / "y.txt").write_bytes(b"z")  # one byte of one file
    assert folder_digest(tmp_path / "a") != folder_digest(tmp_path / "copy")
    (tmp_path / "copy" / "sub" / "y.txt").write_bytes(b"y")
    (tmp_path / "copy" / "sub" / "y.txt").rename(tmp_path / "copy" / "sub" / "w.txt")  # a file's name
    assert folder_digest(tmp_path / "a") != folder_digest(tmp_path / "copy")
    assert digest({"a": 1, "b": [2, 3]}) == digest({"b": [2, 3], "a": 1})  # key order is no input
    assert digest({"a": 1}) != digest({"a": 2})


def test_model_fingerprint_is_the_weights_not_the_folder(tmp_path, model_dir):
    store, other_store = tmp_path / "store", tmp_path / "store2"
    fp = model_fingerprint(str(model_dir), store)
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(model_dir, copy)
    assert model_fingerprint(str(copy), other_store) == fp  # another place, another store
    write(copy / ".memoe-verified.json", b"{}")  # memoe's own bookkeeping files
    write(copy / "README.md", b"notes")  # not a weight, config or tokenizer file
    assert model_fingerprint(str(copy), store) == fp
    with open(copy / "model.safetensors", "ab") as f:  # one more byte of weights
        f.write(b"!")
    assert model_fingerprint(str(copy), store) != fp
    (copy / "tokenizer.json").write_bytes(b'{"x": 1}')
    assert model_fingerprint(str(model_dir), store) == fp
    assert model_fingerprint("org/not-on-disk", store) == model_fingerprint("org/not-on-disk", other_store)
    assert model_fingerprint("org/not-on-disk", store) != model_fingerprint("org/other", store)


# ------------------------------------------------------------------ the tasks' keys


def test_prepare_key(tmp_path, model_dir, monkeypatch):
    data = write(tmp_path / "d.json", b'[{"src": "x"}]')
    data_cfg = Config().data.model_dump(mode="json") | {"path": data}
    p = {
        "data_cfg": data_cfg,
        "model_cfg": model_cfg(model_dir),
        "rounds": 2,
        "batch_size": 5,
        "re_edit": None,
        "store": str(tmp_path / "store"),
    }
    key = prepare_key(None, p)
    moved = write(tmp_path / "elsewhere" / "renamed.json", b'[{"src": "x"}]')
    assert prepare_key(None, p | {"data_cfg": data_cfg | {"path": moved}}) == key  # the bytes, not the path
    assert prepare_key(None, p | {"store": str(tmp_path / "other-store")}) == key
    assert prepare_key(None, p | {"model_cfg": model_cfg(model_dir, device="cuda")}) == key  # the data's, any device
    other = write(tmp_path / "e.json", b'[{"src": "y"}]')
    assert prepare_key(None, p | {"data_cfg": data_cfg | {"path": other}}) != key
    for field, value in (
        ("format", "counterfact"),
        ("n_edits", 7),
        ("seed", 1),
        ("sample", "random"),
        ("skip_bad", True),
        ("probes", False),
    ):
        assert prepare_key(None, p | {"data_cfg": data_cfg | {field: value}}) != key, field
    for field, value in (("rounds", 3), ("batch_size", 4), ("re_edit", [2, 1])):
        assert prepare_key(None, p | {field: value}) != key, field
    assert prepare_key(None, p | {"model_cfg": model_cfg(model_dir, max_length=64)}) != key  # the context check
    (model_dir / "tokenizer.json").write_bytes(b'{"other": "tokenizer"}')
    assert prepare_key(None, p) != key
    (model_dir / "tokenizer.json").write_bytes(b"{}")
    assert prepare_key(None, p) == key
    changed(monkeypatch, {PROJECT_ROOT / "memoe" / "data.py"})
    assert prepare_key(None, p) != key


def test_anchors_and_locality_keys(tmp_path, model_dir, monkeypatch):
    edits = write(tmp_path / "edits.parquet", b"edits")
    store = str(tmp_path / "store")
    a = anchors_key(None, {"edits": edits, "store": store})
    loc_p = {"edits": edits, "model_cfg": model_cfg(model_dir), "batch_size": 16, "store": store, "threads": None}
    loc = locality_key(None, loc_p)
    same = write(tmp_path / "moved" / "e.parquet", b"edits")
    assert anchors_key(None, {"edits": same, "store": str(tmp_path / "s2")}) == a
    assert locality_key(None, loc_p | {"edits": same, "store": str(tmp_path / "s2"), "threads": 8}) == loc
    other = write(tmp_path / "other.parquet", b"edits2")
    assert anchors_key(None, {"edits": other, "store": store}) != a
    assert locality_key(None, loc_p | {"edits": other}) != loc
    assert locality_key(None, loc_p | {"batch_size": 8}) != loc
    assert locality_key(None, loc_p | {"model_cfg": model_cfg(model_dir, dtype="bfloat16")}) != loc
    changed(monkeypatch, own_files("memoe"))  # the anchors are MEMoE's extractor's; locality is no editor's
    assert anchors_key(None, {"edits": edits, "store": store}) != a
    assert locality_key(None, loc_p) == loc


def train_params(tmp_path, model_dir, method="memoe", **kw):
    return {
        "round_index": 0,
        "records": write(tmp_path / "round_0.parquet", b"round 0"),
        "prev_state": None,
        "method_cfg": validate_method({"name": method}).model_dump(mode="json"),
        "seed": 0,
        "model_cfg": model_cfg(model_dir),
        "store": str(tmp_path / "store"),
        "threads": None,
        "progress": None,
    } | kw


def test_train_key(tmp_path, model_dir):
    p = train_params(tmp_path, model_dir)
    key = train_key(None, p)
    same = write(tmp_path / "elsewhere" / "r.parquet", b"round 0")
    assert (
        train_key(
            None,
            p | {"records": same, "store": str(tmp_path / "s2"), "threads": 4, "progress": {"url": "x", "total": 3}},
        )
        == key
    )
    assert train_key(None, p | {"records": write(tmp_path / "r1.parquet", b"round 1")}) != key
    state = tmp_path / "state"
    write(state / "editor.json", b"{}")
    with_prev = train_key(None, p | {"prev_state": str(state)})
    assert with_prev != key
    shutil.copytree(state, tmp_path / "state-copy")
    assert train_key(None, p | {"prev_state": str(tmp_path / "state-copy")}) == with_prev
    write(state / "editor.safetensors", b"w")
    assert train_key(None, p | {"prev_state": str(state)}) != with_prev
    assert train_key(None, p | {"method_cfg": p["method_cfg"] | {"lr": 0.5}}) != key
    assert train_key(None, p | {"seed": 1}) != key
    assert train_key(None, p | {"round_index": 1}) != key
    assert train_key(None, p | {"model_cfg": model_cfg(model_dir, device="cuda")}) != key
    assert train_key(None, p | {"model_cfg": model_cfg(model_dir, dtype="bfloat16")}) != key
    with open(model_dir / "model.safetensors", "ab") as f:
        f.write(b"!")
    assert train_key(None, p) != key


def test_evaluate_key(tmp_path, model_dir):
    rounds = [write(tmp_path / f"round_{t}.parquet", f"round {t}".encode()) for t in range(3)]
    state = tmp_path / "state"
    write(state / "editor.json", b"{}")
    p = {
        "round_index": 0,
        "rounds": rounds,
        "state": str(state),
        "base": write(tmp_path / "base.parquet", b"b"),
        "method_cfg": validate_method({"name": "lora"}).model_dump(mode="json"),
        "eval_cfg": Config().eval.model_dump(mode="json"),
        "seed": 0,
        "model_cfg": model_cfg(model_dir),
        "store": str(tmp_path / "store"),
        "threads": None,
    }
    key = evaluate_key(None, p)
    assert evaluate_key(None, p | {"store": str(tmp_path / "s2"), "threads": 2}) == key
    (tmp_path / "round_2.parquet").write_bytes(b"a later round")  # round 0 scores rounds 0..0 only
    assert evaluate_key(None, p) == key
    assert evaluate_key(None, p | {"rounds": rounds[:1]}) != key  # round 0 is then the last: all edits scored
    (tmp_path / "round_0.parquet").write_bytes(b"other edits")
    assert evaluate_key(None, p) != key
    (tmp_path / "round_0.parquet").write_bytes(b"round 0")
    assert evaluate_key(None, p | {"round_index": 1}) != key
    assert evaluate_key(None, p | {"base": write(tmp_path / "base2.parquet", b"c")}) != key
    assert evaluate_key(None, p | {"eval_cfg": p["eval_cfg"] | {"generation": False}}) != key
    assert evaluate_key(None, p | {"eval_cfg": p["eval_cfg"] | {"retention_sample": 10}}) != key
    assert evaluate_key(None, p | {"method_cfg": p["method_cfg"] | {"rank": 4}}) != key
    assert evaluate_key(None, p | {"seed": 3}) != key
    write(state / "editor.safetensors", b"w")
    assert evaluate_key(None, p) != key


# ------------------------------------------------------------------ the code version


def test_each_editors_code_changes_its_own_methods_keys_only(tmp_path, model_dir, monkeypatch):
    """For every registered method: its editor's own sources edited, the code version and the train key of
    that method (and of any name sharing its editor, ft-l / ft-m) change; every other method's, and the
    editor-independent tasks', stay."""
    methods = sorted(METHODS)
    params = {m: train_params(tmp_path, model_dir, m) for m in methods}

    def versions():
        code_version.cache_clear()
        return ({m: code_version(m) for m in methods}, {m: train_key(None, params[m]) for m in methods}, code_version())

    before, keys_before, core = versions()
    assert len(set(before.values())) == len({METHODS[m].editor_module for m in methods})
    for m in methods:
        mine = own_files(m)
        with monkeypatch.context() as mp:
            changed(mp, mine)
            after, keys_after, core_after = versions()
        moved = {o for o in methods if after[o] != before[o]}
        sharing = {o for o in methods if own_files(o) & mine}
        assert moved == sharing, f"editing {sorted(p.name for p in mine)} ({m}) changed the code version of {moved}"
        assert {o for o in methods if keys_after[o] != keys_before[o]} == sharing
        assert core_after == core
    assert versions()[0] == before


def test_library_code_changes_every_key_and_front_ends_none(monkeypatch):
    methods = sorted(METHODS)
    before = {m: code_version(m) for m in methods} | {None: code_version()}
    with monkeypatch.context() as mp:
        changed(mp, {PROJECT_ROOT / "memoe" / "metrics.py"})  # every task's output depends on it
        assert all(code_version(m) != v for m, v in before.items())
    with monkeypatch.context() as mp:
        changed(
            mp,
            {
                PROJECT_ROOT / "memoe" / "commands" / "report.py",
                PROJECT_ROOT / "flows" / "cli.py",
                PROJECT_ROOT / "benchmarks" / "speed.py",
            },
        )  # front ends: no task runs them
        assert {m: code_version(m) for m in methods} | {None: code_version()} == before
