"""The dataset catalogue: every data file memoe knows by name, with its path, its format and a line of
description, read from one file, ``configs/datasets/catalogue.yaml``. Nothing else in the code holds a
dataset's path: the config's default data, ``data.dataset: NAME``, the benchmarks, the scripts and the
tests ask the catalogue."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

from memoe.paths import PROJECT_ROOT, resolve_path

CATALOGUE = PROJECT_ROOT / "configs" / "datasets" / "catalogue.yaml"
FIELDS = ("path", "format", "description")


class DatasetError(ValueError):
    """An unknown dataset name or a malformed catalogue; the message names the catalogue file."""


@dataclass(frozen=True)
class Dataset:
    name: str
    path: str  # as the catalogue writes it (relative: the current folder, then the project root)
    format: str  # a registered format (memoe.data.FORMATS)
    description: str

    def resolved(self) -> Path:
        return resolve_path(self.path)


def _where() -> str:
    try:
        return CATALOGUE.relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return str(CATALOGUE)


@functools.cache
def datasets() -> dict[str, Dataset]:
    """The catalogue's datasets by name, in the file's order."""
    try:
        raw = yaml.safe_load(CATALOGUE.read_text()) or {}
    except FileNotFoundError:
        raise DatasetError(f"dataset catalogue not found: {CATALOGUE}") from None
    except yaml.YAMLError as e:
        raise DatasetError(f"{_where()}: malformed YAML: {e}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{_where()}: top level must be a mapping of dataset names")
    out = {}
    for name, entry in raw.items():
        if (
            not isinstance(entry, dict)
            or set(entry) != set(FIELDS)
            or not all(isinstance(entry[k], str) and entry[k] for k in FIELDS)
        ):
            raise DatasetError(f"{_where()}: dataset {name!r} needs exactly {', '.join(FIELDS)} (non-empty strings)")
        out[str(name)] = Dataset(str(name), entry["path"], entry["format"], entry["description"])
    return out


def dataset(name: str) -> Dataset:
    """The catalogue's entry ``name``; an unknown name is an error naming the catalogue and its names."""
    known = datasets()
    if name not in known:
        raise DatasetError(f"unknown dataset {name!r}: {_where()} has {', '.join(known)}")
    return known[name]
