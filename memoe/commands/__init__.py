"""The library's subcommands of ``memoe`` (``flows/cli.py`` is the command): each module defines
``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse


def add_config_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: embedded defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    return p
