"""The code's layers and its privacy, read from the sources (AST; nothing imported, fast).

(a) The library is layered: foundation -> data -> anchors -> model -> editing -> evaluation -> front ends
(``LAYERS``: every memoe module's layer and why it is there). A module imports (at the top or inside a
function) only from its own layer or below. Above the library: ``tasks`` may import memoe; ``flows`` tasks,
memoe and benchmarks (``memoe bench``); ``benchmarks`` memoe; memoe none of them, nor Prefect or MLflow.
(The method registry names each editor by a "module:Class" string that ``memoe.config`` imports on first
use: a plug-in point, not an import of the config's layer.)

(b) No module uses another's private names: no ``from m import _x``, and no ``x._y`` (``x`` not ``self`` or
``cls``) where ``_y`` is a private name that another project module defines and this one does not. (A private
name the module defines itself, on its own objects, is its own; third-party private APIs are not checked.)
The tests are not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("memoe", "tasks", "flows", "benchmarks", "scripts")

# lowest first; a module's layer is that of its longest dotted prefix here (memoe.editors.* is editing)
LAYERS: list[tuple[str, dict[str, str]]] = [
    (
        "foundation",
        {
            "memoe": "the package itself: its version only",
            "memoe.registry": "the registry class every concept's registry is (methods, formats, metrics)",
            "memoe.paths": "where the checkout is, and the one rule for relative paths memoe reads",
            "memoe.memory": "the peak-memory meter: the process and the device, nothing of memoe",
            "memoe.methods": "the method registry and the settings base; finds the method packages by name at run time",
        },
    ),
    (
        "data",
        {
            "memoe.catalogue": "the dataset catalogue: names -> files, formats, descriptions",
            "memoe.data": "the data formats, edit records, their checks, sampling and rounds, an edit's token ids",
            "memoe.probes": "the hard probes, built from a record's own fields (a tokenizer's chat template at most)",
            "memoe.config": "the settings schema: reads the formats and the catalogue; editors only by name",
            "memoe.datasets": "the records a config asks for (a tokenizer for the context check, no model)",
            "memoe.grid": "sweep grids: configs only",
        },
    ),
    ("anchors", {"memoe.anchors": "knowledge anchors: the subject a prompt asks about, from text alone"}),
    (
        "model",
        {
            "memoe.models": "model loading, conversion, the architectures' layer maps",
            "memoe.checks": "a config's settings against its model",
            "memoe.adapter": "MEMoE's bypass mixture of experts beside a model's MLP, and the layer cache",
            "memoe.corpus": "text corpora and key statistics over a model's layer",
            "memoe.frozen": "the unedited model's states below an edit, and the forward that starts from them",
        },
    ),
    ("editing", {"memoe.editors": "the Editor interface, shared training helpers, one module or package per method"}),
    (
        "evaluation",
        {
            "memoe.metric_registry": "the metrics' names, order and headline flags",
            "memoe.metrics": "scores a model after an edit; the editor is passed in (route()), never imported",
            "memoe.memo": "the edited model's scores of a sequence, kept while the editor's version of the row holds",
        },
    ),
    (
        "front",
        {
            "memoe.api": "the Python API: edit and score in one call",
            "memoe.protocol": "the study protocol (rounds, retention) over editing and evaluation",
            "memoe.commands": "the library's subcommands of `memoe` (config, demo, generate, chat, report)",
        },
    ),
]
RANK = {layer: i for i, (layer, _) in enumerate(LAYERS)}
LAYER_OF = {module: layer for layer, modules in LAYERS for module in modules}

# the packages each top-level package may import from (besides itself); the pipeline engines on top
MAY_IMPORT = {"memoe": set(), "tasks": {"memoe"}, "flows": {"tasks", "memoe", "benchmarks"}, "benchmarks": {"memoe"}}
ENGINES = ("prefect", "mlflow")  # prefect_dask, prefect_kubernetes count as prefect


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth; ``from a import b`` gives a and a.b."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def layer(module: str) -> str | None:
    """The module's row, or its package's (``memoe`` itself is a row of its own, no package's)."""
    if module in LAYER_OF:
        return LAYER_OF[module]
    parts = module.split(".")
    for n in range(len(parts) - 1, 1, -1):
        if ".".join(parts[:n]) in LAYER_OF:
            return LAYER_OF[".".join(parts[:n])]
    return None


def memoe_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sources("memoe")}


def test_every_library_module_has_a_layer():
    missing = [m for m in memoe_modules() if layer(m) is None]
    assert missing == [], f"add these modules to LAYERS in {Path(__file__).name} (with a line of why): {missing}"


def test_no_library_module_imports_from_a_layer_above_its_own():
    known = memoe_modules()
    wrong = []
    for module, path in known.items():
        mine = layer(module)
        for line, target in imports(path):
            if target in known and target != module and RANK[layer(target)] > RANK[mine]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module} ({mine}) imports {target} ({layer(target)})")
    assert wrong == []


def test_the_packages_import_only_downwards():
    """memoe is a library of its own; the pipeline (tasks, flows) and the benchmarks stand on it."""
    wrong = []
    for package, allowed in MAY_IMPORT.items():
        engines_ok = package in ("tasks", "flows")
        for path in sources(package):
            for line, target in imports(path):
                top = target.split(".")[0]
                engine = next((e for e in ENGINES if top == e or top.startswith(e + "_")), None)
                if (top in PROJECT and top != package and top not in allowed) or (engine and not engines_ok):
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: {package} imports {target}")
    assert wrong == []


def private_definitions(tree: ast.AST) -> set[str]:
    """The private names a module defines: functions, classes, names and attributes it assigns, arguments
    and keyword names (``set_defaults(_module=...)``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_uses_another_modules_private_names():
    files = sources(*PROJECT)
    trees = {p: ast.parse(p.read_text()) for p in files}
    own = {p: private_definitions(t) for p, t in trees.items()}
    wrong = []
    for path, tree in trees.items():
        others = set().union(*(own[q] for q in files if q != path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PROJECT + ("",):
                wrong += [f"{where}: from {node.module} import {a.name}" for a in node.names if private(a.name)]
            elif (
                isinstance(node, ast.Attribute)
                and private(node.attr)
                and node.attr not in own[path]
                and node.attr in others
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                wrong.append(f"{where}: {ast.unparse(node)}")
    assert wrong == []
