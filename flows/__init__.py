"""Prefect flows of the memoe pipeline (``flows/study.py``), the ``memoe`` command (``flows/cli.py``)
and the pipeline's subcommands (``memoe run``, ``memoe ui``, ...: ``flows/commands_*.py``)."""
