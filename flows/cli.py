"""The ``memoe`` command (``[project.scripts]``; ``python -m flows.cli``). Each subcommand is a module
with ``add_arguments(parser)`` and ``run(args) -> int``: ``memoe/commands/*.py`` for the library's
commands, ``flows/commands_*.py`` for the pipeline's (Prefect, MLflow). The library does not import
this module (nor Prefect or MLflow)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # nothing leaves the machine: MLflow 3 reads MLFLOW_DISABLE_TELEMETRY=true or DO_NOT_TRACK=true
    # (not "1"), Prefect DO_NOT_TRACK in 1/true/yes and its server's analytics setting
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    # Prefect gives its temporary server 20 s to create a fresh database and answer; a busy
    # 2-core machine can take longer (CI saw it time out), and waiting costs nothing when fast.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(_k, _v)


def commands() -> dict:
    """name -> (module, help), in the order of ``memoe --help``. Imported here, after the environment
    above is set (the modules import their heavy dependencies only in ``run``)."""
    from flows import (
        commands_bench,
        commands_compare,
        commands_ls,
        commands_run,
        commands_server,
        commands_show,
        commands_sweep,
        commands_ui,
    )
    from memoe.commands import chat, config, demo, generate, report

    return {
        "report": (report, "data report and the unedited model's answers"),
        "generate": (generate, "answers of an edited model (plain model.generate; --chat)"),
        "chat": (chat, "chat with an edited model in its chat template"),
        "run": (commands_run, "run a study (batch or sequential) and write results.json"),
        "ui": (commands_ui, "start the MLflow UI on 127.0.0.1"),
        "demo": (demo, "show five edits: before, after, rephrase, unrelated prompt"),
        "bench": (commands_bench, "benchmarks of speed, memory and scale (writes bench.json)"),
        "sweep": (commands_sweep, "a grid of studies, on a Prefect work pool (--pool) or here"),
        "server": (commands_server, "the team server: PostgreSQL, Prefect and MLflow (127.0.0.1 by default)"),
        "ls": (commands_ls, "list past studies (MLflow store): settings and headline metrics"),
        "show": (commands_show, "one past study: settings, metrics per round, failed edits"),
        "compare": (commands_compare, "past studies side by side, with their retention curves"),
        "config": (config, "every resolved config key with its default and description"),
    }


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
    for name, (mod, help_) in commands().items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(_module=mod)
        mod.add_arguments(p)
    args = parser.parse_args(argv)
    from memoe.config import ConfigError
    from memoe.data import EditDataError

    try:
        return int(args._module.run(args) or 0)
    except (ConfigError, EditDataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
