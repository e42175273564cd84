"""Sweep grids: a base config plus a grid of overrides, expanded into cells (one study each).

A grid file is YAML::

    base: configs/quickstart.yaml        # a config file (relative to the project root), or null
    set: [data.n_edits=20]               # overrides every cell gets (optional)
    grid:                                # key -> list of values; the cells are their product
      method.name: [memoe, lora]
      data.seed: [0, 1, 2]

and on the command line ``--set key=a,b,c`` (the Hydra convention: a comma outside brackets and
quotes separates values, so ``method.layers=[2,3]`` is one value and ``method.layers=[2],[3]`` two).
The cells are the product in the order the keys are given; each is a list of ``key=value``
overrides applied after the base config's own values.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memoe.config import ConfigError


@dataclass(frozen=True)
class Cell:
    index: int
    overrides: tuple[str, ...]  # the fixed overrides, then this cell's grid values
    values: tuple[tuple[str, str], ...]  # (key, value) of the grid axes only

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.values) or "base"


@dataclass
class Sweep:
    base: str | None
    fixed: list[str] = field(default_factory=list)
    axes: dict[str, list[str]] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        keys = list(self.axes)
        out = []
        for i, combo in enumerate(itertools.product(*(self.axes[k] for k in keys))):
            vals = tuple(zip(keys, combo))
            out.append(Cell(i, tuple(self.fixed) + tuple(f"{k}={v}" for k, v in vals), vals))
        return out

    def sweep_id(self) -> str:
        """Stable id of the sweep: the same base, overrides and grid give the same id (a rerun)."""
        blob = json.dumps({"base": self.base, "fixed": self.fixed, "axes": self.axes}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def split_values(text: str) -> list[str]:
    """``a,b,[1,2],'x,y'`` -> ``['a', 'b', '[1,2]', "'x,y'"]`` (commas inside brackets or quotes stay)."""
    out, cur, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    if quote or depth != 0:
        raise ConfigError(f"override value '{text}': unbalanced brackets or quotes")
    return out


def _value_text(v: Any) -> str:
    """A grid value from YAML back to override text (lists and mappings as inline YAML)."""
    if isinstance(v, str):
        return v
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def _add_axis(axes: dict[str, list[str]], key: str, values: list[str], source: str) -> None:
    if not key or any(c.isspace() for c in key):
        raise ConfigError(f"{source}: '{key}' is not a config key")
    if key in axes:
        raise ConfigError(f"{source}: key '{key}' is swept twice")
    if not values or any(v == "" for v in values):
        raise ConfigError(f"{source}: key '{key}' has an empty value")
    if len(set(values)) != len(values):
        raise ConfigError(f"{source}: key '{key}' repeats a value ({values})")
    axes[key] = values


def load_sweep(path: str | Path | None, sets: list[str] | tuple[str, ...] = ()) -> Sweep:
    """A grid file (``base`` / ``set`` / ``grid``) or a plain config file (then the grid comes from
    ``--set`` only), plus the command line's ``--set`` (comma lists become grid axes)."""
    sweep = Sweep(base=None)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"sweep file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: malformed YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(raw).__name__}")
        if "grid" in raw:
            unknown = set(raw) - {"base", "set", "grid"}
            if unknown:
                raise ConfigError(f"{p}: unknown key(s) {sorted(unknown)} (a grid file has base, set, grid)")
            base = raw.get("base")
            if base is not None and not isinstance(base, str):
                raise ConfigError(f"{p}: base: a config file path, got {base!r}")
            sweep.base = base
            fixed = raw.get("set") or []
            if not isinstance(fixed, list) or not all(isinstance(s, str) and "=" in s for s in fixed):
                raise ConfigError(f"{p}: set: a list of 'key=value' strings, got {fixed!r}")
            sweep.fixed = list(fixed)
            grid = raw["grid"]
            if not isinstance(grid, dict) or not grid:
                raise ConfigError(f"{p}: grid: a mapping of key -> list of values")
            for k, vs in grid.items():
                if not isinstance(vs, list):
                    raise ConfigError(f"{p}: grid.{k}: a list of values, got {vs!r}")
                _add_axis(sweep.axes, str(k), [_value_text(v) for v in vs], f"{p}: grid")
        else:
            sweep.base = str(p)
    for s in sets:
        if "=" not in s:
            raise ConfigError(f"--set '{s}' is not of the form key=value")
        key, value = s.split("=", 1)
        key = key.strip()
        vals = split_values(value)
        if len(vals) == 1:
            if key in sweep.axes:
                raise ConfigError(f"--set {key}: the key is already a grid axis")
            sweep.fixed.append(f"{key}={vals[0]}")
        else:
            _add_axis(sweep.axes, key, vals, f"--set {s}")
    return sweep
