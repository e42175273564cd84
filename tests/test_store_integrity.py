"""Trust nothing it did not check (issue 18, items 1-3): a study makes no connection beyond
127.0.0.1; damaged files in the run store are found by their content hash and recomputed; a result
record memoe did not write (a planted pickle) is set aside unread.

The study runs once (``memoe run`` subprocess, tiny model) with an audit hook in every Python
process it starts (``sitecustomize`` on PYTHONPATH) that records and blocks any connection or name
lookup that is not loopback, in an environment like a user's shell: no CI or pytest variables that
would switch the libraries' telemetry off by themselves, no telemetry settings of our own."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT
from .test_pipeline import MEMOE, env_for, study_config, tiny_dir  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(1500)

GUARD = """
import os, sys
_LOG = os.environ.get("MEMOE_NET_LOG")
_LOCAL = ("127.", "::1", "localhost", "0:0:0:0:0:0:0:1")

def _host(event, args):
    if event == "socket.getaddrinfo":
        return args[0]
    if event == "socket.connect" and isinstance(args[1], tuple):
        return args[1][0]
    return None

def _guard(event, args):
    if not _LOG or event not in ("socket.getaddrinfo", "socket.connect"):
        return
    host = _host(event, args)
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not host or host.startswith(_LOCAL):
        return
    with open(_LOG, "a") as f:
        f.write(f"{os.getpid()} {event} {host!r} {sys.argv[:4]}\\n")
    raise OSError(f"blocked by the test's network guard: {host}")

if _LOG:
    with open(_LOG + ".loaded", "a") as f:
        f.write(f"{os.getpid()} {sys.argv[:4]}\\n")
    sys.addaudithook(_guard)
"""

# variables that make MLflow or Prefect skip telemetry by themselves; a user's shell has none of them
CI_VARS = (
    "PYTEST_CURRENT_TEST",
    "PYTEST_VERSION",
    "CI",
    "GITHUB_ACTIONS",
    "GITLAB_CI",
    "JENKINS_URL",
    "TRAVIS",
    "CIRCLECI",
    "BUILDKITE",
    "TF_BUILD",
    "TEAMCITY_VERSION",
    "CODEBUILD_BUILD_ARN",
    "BITBUCKET_BUILD_NUMBER",
    "CLOUD_RUN_EXECUTION",
    "RUNBOT_HOST_URL",
    "RUNBOT_BUILD_NAME",
    "RUNBOT_WORKER_ID",
    "DO_NOT_TRACK",
    "MLFLOW_DISABLE_TELEMETRY",
    "MLFLOW_ENABLE_TELEMETRY",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
)


def guarded_env(tmp: Path, runs: Path) -> dict[str, str]:
    site = tmp / "guard"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(GUARD)
    env = env_for(runs, tmp / "prefect")
    for k in CI_VARS:
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["MEMOE_NET_LOG"] = str(tmp / "net.log")
    return env


def run(cfg: Path, out: Path, env: dict) -> tuple[dict, subprocess.CompletedProcess]:
    p = subprocess.run(
        MEMOE + ["run", str(cfg), "--out", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), p


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp("guarded")
    cfg = study_config(tmp, tiny_dir, steps=10, rounds=2, batch=2)
    env = guarded_env(tmp, tmp / "runs")
    ref, _ = run(cfg, tmp / "out", env)
    return {"tmp": tmp, "cfg": cfg, "env": env, "ref": ref, "store": tmp / "runs" / "store"}


def test_a_study_connects_to_nothing_beyond_loopback(study):
    loaded = (study["tmp"] / "net.log.loaded").read_text().splitlines()
    assert any("'run'" in line for line in loaded) and any("--app-dir" in line for line in loaded), (
        loaded
    )  # + Prefect's server
    log = study["tmp"] / "net.log"
    assert not log.exists(), "outbound attempts:\n" + log.read_text()


def _records(store: Path) -> dict[str, dict]:
    out = {}
    for f in (store / "results").iterdir():
        if f.is_file() and "." not in f.name:
            out[f.name] = json.loads(json.loads(f.read_text())["result"])
    return out


def _flip(path: Path, at: int = -200) -> None:
    b = bytearray(path.read_bytes())
    b[at] ^= 0xFF
    path.write_bytes(bytes(b))


def test_damaged_store_files_are_recomputed_and_planted_records_refused(study):
    from tasks.integrity import intact

    store, ref = study["store"], study["ref"]
    recs = _records(store)
    states = sorted((r["edits_applied"], r["state"]) for r in recs.values() if "state" in r)
    last_state = Path(states[-1][1])
    evals = {r["n_scored"]: (k, r["table"]) for k, r in recs.items() if "n_scored" in r}
    first_eval, (last_key, _) = Path(evals[2][1]), evals[4]
    locality = Path(next(r["table"] for k, r in recs.items() if k.startswith("locality-")))

    _flip(next(last_state.glob("*.safetensors")))  # altered adapter weights: same size
    first_eval.write_bytes(first_eval.read_bytes()[:100])  # truncated parquet
    _flip(locality, 50)  # the unedited model's predictions, edited
    marker = study["tmp"] / "planted-code-ran"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    rec_path = store / "results" / last_key
    rec = json.loads(rec_path.read_text())
    rec["metadata"]["serializer"] = {"type": "pickle", "picklelib": "pickle"}
    rec["result"] = base64.b64encode(pickle.dumps(Planted())).decode()
    rec_path.write_text(json.dumps(rec))

    out = study["tmp"] / "out-again"
    again, p = run(study["cfg"], out, study["env"])
    assert not marker.exists(), "the planted record was unpickled"
    assert (store / "results" / f"{last_key}.rejected").exists() and "rejected the result record" in p.stdout + p.stderr
    assert again["final"] == ref["final"]
    assert [r["reliability"] for r in again["rounds"]] == [r["reliability"] for r in ref["rounds"]]
    t = again["tasks"]
    assert t["train_round_0"] == "Cached" and t["prepare_dataset"] == "Cached"
    assert t["train_round_1"] != "Cached" and t["evaluate_round_0"] != "Cached" and t["evaluate_round_1"] != "Cached"
    assert t["base_locality"] != "Cached"
    assert intact(last_state) and intact(first_eval) and intact(locality)
    assert not (study["tmp"] / "net.log").exists()


def test_store_checks_and_publish_replace_damaged_files(tmp_path):
    from tasks.integrity import intact, record_problem
    from tasks.steps import DamagedStoreError, publish_file, publish_folder, verified

    src = tmp_path / "t.bin"
    src.write_bytes(b"evaluation table")
    good = publish_file(src, tmp_path / "evals", ".parquet")
    assert intact(good) and verified(good) == str(good)
    good.write_bytes(b"evaluation tablX")
    assert not intact(good)
    with pytest.raises(DamagedStoreError, match=rf"{good}.*delete it and run again"):
        verified(good)
    src.write_bytes(b"evaluation table")
    assert publish_file(src, tmp_path / "evals", ".parquet") == good and intact(good)  # replaced, not kept

    folder = tmp_path / "tmp-state"
    folder.mkdir()
    (folder / "adapter.safetensors").write_bytes(b"weights")
    state = publish_folder(folder, tmp_path / "states")
    (state / "adapter.safetensors").write_bytes(b"weightz")
    shutil.copytree(state, folder)
    (folder / "adapter.safetensors").write_bytes(b"weights")
    assert publish_folder(folder, tmp_path / "states") == state and intact(state)

    rec = tmp_path / "eval-x"
    for body, ok in [
        ({"metadata": {"serializer": {"type": "json"}}, "result": json.dumps({"table": "a"})}, True),
        ({"metadata": {"serializer": {"type": "pickle"}}, "result": "gASV"}, False),
        (
            {
                "metadata": {"serializer": {"type": "json"}},
                "result": json.dumps({"x": {"__exc_type__": "os.system", "message": "true"}}),
            },
            False,
        ),
        (
            {
                "metadata": {"serializer": {"type": "json"}},
                "result": json.dumps([{"__class__": "pathlib.Path", "data": "/"}]),
            },
            False,
        ),
        ({"data": "gASV", "serializer": {"type": "pickle"}}, False),
    ]:  # Prefect's legacy layout
        rec.write_text(json.dumps(body))
        assert (record_problem(rec) is None) == ok, body


def test_a_missing_file_is_not_retried_as_transient():
    from tasks.steps import _transient

    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    assert _transient(None, None, State(FileNotFoundError("model.safetensors"))) is False
    assert _transient(None, None, State(PermissionError("x"))) is False
    assert _transient(None, None, State(OSError("disk I/O error"))) is True
