"""The ``memoe`` command. Each subcommand lives in its own module, imported only when used:
``memoe/commands/*.py`` for library commands, ``flows/commands.py`` for the pipeline's (the
library itself imports neither Prefect nor MLflow)."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import signal
import sys

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               # nothing leaves the machine: MLflow 3 reads MLFLOW_DISABLE_TELEMETRY=true or DO_NOT_TRACK=true
               # (not "1"), Prefect DO_NOT_TRACK in 1/true/yes and its server's analytics setting
               "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "TOKENIZERS_PARALLELISM": "false",
               "TRANSFORMERS_VERBOSITY": "error",
               # Prefect gives its temporary server 20 s to create a fresh database and answer; a busy
               # 2-core machine can take longer (CI saw it time out), and waiting costs nothing when fast.
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
    os.environ.setdefault(_k, _v)

# name -> (module, help). A module defines add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "report": ("memoe.commands.report", "data report and the unedited model's answers"),
    "generate": ("memoe.commands.generate", "answers of an edited model (plain model.generate; --chat)"),
    "chat": ("memoe.commands.chat", "chat with an edited model in its chat template"),
}
for _name, _mod, _help in [
    ("run", "flows.commands_run", "run a study (batch or sequential) and write results.json"),
    ("ui", "flows.commands_ui", "start the MLflow UI on 127.0.0.1"),
    ("demo", "memoe.commands.demo", "show five edits: before, after, rephrase, unrelated prompt"),
    ("bench", "flows.commands_bench", "benchmarks of speed, memory and scale (writes bench.json)"),
    ("sweep", "flows.commands_sweep", "a grid of studies, on a Prefect work pool (--pool) or here"),
    ("server", "flows.commands_server", "the team server: PostgreSQL, Prefect and MLflow (127.0.0.1 by default)"),
    ("ls", "flows.commands_ls", "list past studies (MLflow store): settings and headline metrics"),
    ("show", "flows.commands_show", "one past study: settings, metrics per round, failed edits"),
    ("compare", "flows.commands_compare", "past studies side by side, with their retention curves"),
    ("config", "memoe.commands.config", "every resolved config key with its default and description"),
]:
    if importlib.util.find_spec(_mod.split(".")[0]) and importlib.util.find_spec(_mod):
        COMMANDS[_name] = (_mod, _help)
if "run" not in COMMANDS:  # until the study flow exists, the main job is the report
    COMMANDS["run"] = ("memoe.commands.report", "data report and the unedited model's answers")


def add_config_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: embedded defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    return p


def _terminate(signum, frame):
    """SIGTERM (what a worker, Kubernetes or ``kill`` sends) unwinds like Ctrl-C: ``finally`` blocks
    and exit handlers run (temporary folders removed, runs marked, child servers stopped). Inside a
    Prefect flow, Prefect's own handler raises its TerminationSignal instead."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    parser = argparse.ArgumentParser(prog="memoe", description="MEMoE model editing")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (mod, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(_module=mod)
        importlib.import_module(mod).add_arguments(p)
    args = parser.parse_args(argv)
    from memoe.config import ConfigError
    from memoe.data import EditDataError

    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ConfigError, EditDataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
