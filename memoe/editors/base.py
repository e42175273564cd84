"""The interface every editor (MEMoE and the baselines) implements (editors are registered with
their settings in ``memoe.methods.METHODS``, each method a package ``memoe/editors/<m>/``).

An editor is built on a frozen model and tokenizer; ``edit(records)`` trains on one batch of edits
(called once per round in the sequential protocol, continuing from its current state);
``route(prompts)`` is a context manager the evaluation wraps around every forward/generate call so
that input-dependent editors (MEMoE's knowledge anchors) know which prompts the batch rows are.
"""

from __future__ import annotations

import contextlib
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import polars as pl
import torch
from safetensors.torch import load_file, save_file


@dataclass
class EditResult:
    """What ``Editor.edit`` returns: the figures every editor reports, under the same names (what each
    means: the ``Editor`` docstring), and ``details``, the method's own. ``as_dict()`` is one flat
    JSON-able dict, the shared fields and the details side by side (a round's training figures in
    ``results.json``, MLflow's ``train.*`` metrics)."""

    steps: int  # optimiser steps taken
    loss_first: float | None  # training loss at the first step
    loss_final: float | None  # ... and at the last
    seconds: float  # wall seconds of the call
    n_edits: int  # edits applied by the call
    setup_s: float = 0.0  # the one-time part of ``seconds``
    details: dict[str, Any] = field(default_factory=dict)  # the method's own figures

    def __post_init__(self) -> None:
        shared = {f.name for f in fields(self)} - {"details"}
        if shared & set(self.details):
            raise ValueError(f"EditResult.details repeats shared fields: {sorted(shared & set(self.details))}")

    @classmethod
    def of(cls, losses: list[float], started: float, n_edits: int, setup_s: float = 0.0, **details) -> "EditResult":
        """From the losses of the steps taken and the ``time.perf_counter()`` the call started at."""
        return cls(
            steps=len(losses),
            loss_first=losses[0],
            loss_final=losses[-1],
            seconds=time.perf_counter() - started,
            n_edits=n_edits,
            setup_s=setup_s,
            details=details,
        )

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "details"}
        return {**out, **self.details}


def make_editor(model, tokenizer, method_cfg, **kw) -> "Editor":
    """The registered editor of ``method_cfg.name`` (``memoe.methods.METHODS``) on ``model``."""
    from memoe.checks import check_layers
    from memoe.config import METHODS
    from memoe.models import num_layers

    name = method_cfg.name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    check_layers(method_cfg, num_layers(model))  # never a layer index wrapped round (l % n)
    return METHODS[name].editor_class()(model, tokenizer, method_cfg, **kw)


def _validating(edit: Callable) -> Callable:
    import functools

    from memoe.data import validate_frame

    @functools.wraps(edit)
    def checked(self, records, *args, **kw):
        return edit(self, validate_frame(records, f"{type(self).__name__}.edit(records)"), *args, **kw)

    checked._validates = True
    return checked


class Editor(ABC):
    """An editing method's editor; registered with its settings class in ``memoe.methods.METHODS``.
    Capabilities the pipeline asks of the class: ``uses_anchors`` (the study extracts knowledge
    anchors for it) and ``diagnostics`` (per-round figures of its own).

    ``edit(records)`` returns an ``EditResult``:

    - ``steps``: optimiser steps taken in this call (MEMIT: the steps of its target-vector search);
    - ``loss_first`` / ``loss_final``: the training loss (the mean target NLL of the edits) at the
      first and at the last of them (MEMIT: of the target-vector search);
    - ``seconds``: wall seconds of the call, ``setup_s`` included;
    - ``setup_s``: the part of ``seconds`` that is a one-time cost and does not grow with the edits
      (MEMIT's key statistics; 0 for the others), which the pipeline reports apart from the per-edit cost;
    - ``n_edits``: the edits applied in this call;
    - ``details``: the method's own figures (MEMoE: ``block``, ``n_blocks``, ``adapter_bytes``,
      ``n_replayed``, ``n_superseded``, ``precision``, ``packed``, ``compiled``, ...; GRACE:
      ``codebook_size``, ...), never a shared field's name again.

    ``on_step``: None, or a callback ``on_step(step, loss)`` that an editor which trains in steps
    (``method.steps``: MEMoE, FT, LoRA, GRACE, WISE) calls once per training step of ``edit``, with its
    1-based index and loss, ``steps`` times in all (the pipeline's progress bars and
    ``train.step_loss``). MEMIT's update is closed-form: it does not call it.
    """

    name: str = "editor"
    uses_anchors: bool = False

    def __init_subclass__(cls, **kw):
        """Every editor's ``edit(records)`` first checks its frame as the data loaders check a file
        (``memoe.data.validate_frame``: a missing column, an empty prompt or a subject absent from its
        prompt is an EditDataError naming the record and the column), whatever the subclass does."""
        super().__init_subclass__(**kw)
        if "edit" in cls.__dict__ and not getattr(cls.__dict__["edit"], "_validates", False):
            cls.edit = _validating(cls.__dict__["edit"])

    def __init__(self, model, tokenizer, cfg, seed: int = 0):
        self.model, self.tokenizer, self.cfg, self.seed = model, tokenizer, cfg, seed
        self.device = next(model.parameters()).device
        self.edits_applied = 0
        self.on_step: Callable[[int, float], None] | None = None  # progress: see the class docstring

    @abstractmethod
    def edit(self, records: pl.DataFrame) -> EditResult:
        """Apply a batch of edits (continuing from the current state). Returns an ``EditResult``
        (steps, first and final loss, seconds, one-time ``setup_s``, edits applied; the method's own
        figures in ``details``)."""

    @contextlib.contextmanager
    def route(self, prompts: list[str]) -> Iterator[None]:
        """Tell input-dependent editors which prompt each batch row holds. Default: nothing."""
        yield

    def diagnostics(self, records: pl.DataFrame, **kw) -> dict[str, Any]:
        """Figures of the editor's own on evaluated records (MEMoE: expert load, anchor hit rates),
        logged beside the metrics each round. Default: none."""
        return {}

    def leaves_unchanged(self, prompts: Sequence[str]) -> list[bool]:
        """Per prompt: True where the edit provably acts nowhere on it, so that the edited model's
        output there is the unedited model's (evaluation then takes the unedited model's answers, known
        already, instead of computing them again). The default: False for every prompt."""
        return [False] * len(prompts)

    def row_versions(self, prompts: Sequence[str]) -> list[str | None]:
        """Per prompt: a string naming everything the edit's effect on a sequence that starts with this
        prompt depends on (beyond the unedited model), such that the edited model gives the same outputs
        on that sequence whenever the version is the same, in this editor or in another loaded from a
        later state; None where that is not known. Evaluation keeps the results of a versioned sequence
        and reuses them while its version holds (``memoe.memo``). The default: None for every prompt."""
        return [None] * len(prompts)

    def unchanged_layers(self) -> int:
        """How many decoder layers, from the bottom, compute exactly what the unedited model computes
        while this edit is applied: evaluation reuses the unedited model's states entering that layer
        across evaluations (``memoe.frozen``). 0, the default: not known, every layer is recomputed."""
        return 0

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the edit changed (adapter weights, weight deltas, codebook)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def extra_state(self) -> dict[str, Any]:
        """JSON-serialisable state beside the tensors (e.g. known subjects)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:  # noqa: B027 (an optional hook: nothing by default)
        pass

    def remove(self) -> None:  # noqa: B027 (an optional hook: nothing by default)
        """Restore the unedited model."""

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(sd, folder / "editor.safetensors")
        meta = {
            "method": self.cfg.model_dump(mode="json"),
            "edits_applied": self.edits_applied,
            "model": getattr(self.model, "memoe_model_name", None),
            "extra": self.extra_state(),
        }
        (folder / "editor.json").write_text(json.dumps(meta, indent=2))
        return folder

    def load(self, folder: str | Path) -> None:
        folder = Path(folder)
        meta = json.loads((folder / "editor.json").read_text())
        self.load_extra_state(meta.get("extra", {}))
        self.load_state_dict({k: v.to(self.device) for k, v in load_file(folder / "editor.safetensors").items()})
        self.edits_applied = meta.get("edits_applied", 0)


def load_edited(folder: str | Path, device: str = "auto", dtype: str = "auto", model_name: str | None = None):
    """An edited model back in one call: ``model, tokenizer, editor = load_edited(folder)``, where
    ``folder`` is what ``Editor.save`` wrote (a study's final ``adapter/`` artifact, or a state folder
    of its run store). The base model is the one the edit was made on (``editor.json`` records it;
    ``model_name`` overrides). The editor is attached: a plain ``model(...)``, ``model.generate(...)``
    or a ``transformers`` pipeline applies the edits."""
    from memoe.config import validate_method
    from memoe.models import load_model

    folder = Path(folder)
    meta_path = folder / "editor.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: not a saved editor (no editor.json)")
    meta = json.loads(meta_path.read_text())
    name = model_name or meta.get("model")
    if not name:
        raise ValueError(f"{meta_path}: no 'model' recorded; pass model_name")
    model, tok = load_model(name, device, dtype)
    editor = make_editor(model, tok, validate_method(meta["method"]))
    editor.load(folder)
    return model, tok, editor
