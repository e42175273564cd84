"""``memoe config [CONFIG] [--set key=value ...]``: every key of the resolved config, its value, its
default and its description (from the pydantic models in memoe/config.py and each method's
memoe/editors/<m>/config.py); ``*`` marks a value that differs from the default. The method's keys
are those of the method set (``methods[i].`` for each method of a compare)."""

from __future__ import annotations

from typing import Any, Iterator

from pydantic import BaseModel


def add_arguments(p):
    from memoe.commands import add_config_arguments

    add_config_arguments(p)
    p.add_argument("--changed", action="store_true", help="only the keys whose value differs from the default")


def _default(info) -> Any:
    if info.default_factory is not None:
        v = info.default_factory()
    else:
        v = info.default
    return v.model_dump(mode="json") if isinstance(v, BaseModel) else v


def rows(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, Any, Any, str]]:
    """(key, value, default, description) for every leaf key; a sub-model's default is that of its
    own fields (a method's defaults are those of the method's own class for its name: ft-l's lr is 5e-4)."""
    fields = type(model).model_fields
    named = type(model)(name=model.name) if "name" in fields and prefix.startswith("method") else None
    for name, info in fields.items():
        value = getattr(model, name)
        key = f"{prefix}{name}"
        default = getattr(named, name) if named is not None and name != "name" else _default(info)
        if isinstance(value, BaseModel):
            yield from rows(value, key + ".")
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            yield key, f"[{len(value)} methods]", _default(info), info.description or ""
            for i, v in enumerate(value):
                yield from rows(v, f"{key}[{i}].")
        else:
            yield (
                key,
                value,
                default,
                info.description or (type(model).__doc__ or "").strip().split("\n")[0]
                if name == "name" and prefix.startswith("method")
                else (info.description or ""),
            )


def lines(cfg, changed: bool = False) -> list[str]:
    import json

    def show(v):
        return json.dumps(v) if not isinstance(v, str) else v

    table = [
        (k, show(v), show(d), desc, v != d)
        for k, v, d, desc in rows(cfg)
        if not (cfg.methods and k.startswith("method."))
    ]  # a compare runs `methods`, not `method`
    if changed:
        table = [t for t in table if t[4]]
    w = max([len(t[0]) for t in table] + [3]) + 2
    wv = min(28, max([len(t[1]) for t in table] + [5])) + 2
    out = ["key".ljust(w) + "value".ljust(wv - 2) + "  " + "default".ljust(wv - 2) + "  description"]
    for k, v, d, desc, diff in table:
        out.append(k.ljust(w) + (v + (" *" if diff else "")).ljust(wv - 2) + "  " + d.ljust(wv - 2) + "  " + desc)
    return out


def run(args) -> int:
    from pathlib import Path

    from memoe.config import load_config

    quick = Path(__file__).resolve().parent.parent.parent / "configs" / "quickstart.yaml"
    path = args.config if args.config is not None else (quick if quick.exists() else None)
    cfg = load_config(path, args.set)
    print(f"# {path or 'the embedded defaults'}" + (f" + --set {' '.join(args.set)}" if args.set else ""))
    print("\n".join(lines(cfg, args.changed)))
    return 0
