"""Prefect tasks: thin, cached wrappers around the memoe library.

Every task returns file paths (content-addressed names under the store folder), never tensors,
and is cached on what determines its output: content hashes of its input files, the parts of the
config that matter to it, the model's content fingerprint and the code version. See
``tasks/steps.py`` for the tasks and ``tasks/keys.py`` for the cache keys.
"""
