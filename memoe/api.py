"""A Python API for notebooks, in the manner of EasyEdit's ``BaseEditor.edit``: lists of prompts,
targets and subjects in, the scores out (and the editor, still applied to the model)::

    from memoe.api import edit

    res = edit(prompts=["The mother tongue of Danielle Darrieux is"], target_new=["English"],
               subject=["Danielle Darrieux"],
               rephrase_prompts=["Danielle Darrieux's first language is"],
               locality_prompts=["The capital of France is"], locality_ground_truth=["Paris"],
               method="memoe", steps=40)
    res.scores          # means over the edits: reliability, generality, locality, generation_reliability, ...
    res.per_edit        # one row per edit: prompt, target, generation and every probe's score
    res.stats           # the training: steps, loss_first, loss_final, seconds, details (memoe.editors.base.EditResult)
    res.editor.remove() # the unedited model again

The records go through the same checks as a data file (``memoe.data.validate_frame``): a missing
field, a subject absent from its prompt or unequal numbers of locality prompts and answers is an
``EditDataError`` naming the record and the field. No Prefect, no MLflow, no files written.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import polars as pl


@dataclass
class EditResult:
    scores: dict[str, float]  # means over the edits (memoe.metrics.summarize): reliability, generality, ...
    per_edit: pl.DataFrame  # one row per edit: id, subject, prompt, target_new, the metric columns, generation
    stats: Any  # the editor's training figures: a memoe.editors.base.EditResult
    editor: Any  # the Editor, still applied to the model (editor.remove() restores it)
    model: Any = None
    tokenizer: Any = None


def _per_edit(values, n: int, field: str) -> list[list[str]]:
    """None -> nothing per edit; a list of n strings -> one each; a list of n lists -> as given."""
    if values is None:
        return [[] for _ in range(n)]
    if isinstance(values, str):
        values = [values]
    values = list(values)
    if len(values) != n:
        from memoe.data import EditDataError

        raise EditDataError("memoe.api.edit", f"{len(values)} values for {n} edits", field=field)
    return [[v] if isinstance(v, str) else list(v or []) for v in values]


def records(
    prompts: Sequence[str] | str,
    target_new: Sequence[str] | str,
    subject: Sequence[str] | str,
    rephrase_prompts=None,
    locality_prompts=None,
    locality_ground_truth=None,
    portability_prompts=None,
    portability_ground_truth=None,
    target_true=None,
    ids: Sequence[str] | None = None,
) -> pl.DataFrame:
    """The edit-record frame (``memoe.data.SCHEMA``) for lists in EasyEdit's argument names, checked."""
    from memoe.data import SCHEMA, EditDataError, validate_frame

    def as_list(v):
        return [v] if isinstance(v, str) else list(v)

    prompts, target_new, subject = as_list(prompts), as_list(target_new), as_list(subject)
    n = len(prompts)
    for name, v in (("target_new", target_new), ("subject", subject)):
        if len(v) != n:
            raise EditDataError("memoe.api.edit", f"{len(v)} values for {n} prompts", field=name)
    tt = as_list(target_true) if target_true is not None else [None] * n
    if len(tt) != n:
        raise EditDataError("memoe.api.edit", f"{len(tt)} values for {n} prompts", field="target_true")
    df = pl.DataFrame(
        {
            "id": list(ids) if ids is not None else [str(i) for i in range(n)],
            "subject": subject,
            "prompt": prompts,
            "target_new": target_new,
            "target_true": tt,
            "relation": [None] * n,
            "rephrase_prompts": _per_edit(rephrase_prompts, n, "rephrase_prompts"),
            "locality_prompts": _per_edit(locality_prompts, n, "locality_prompts"),
            "locality_answers": _per_edit(locality_ground_truth, n, "locality_ground_truth"),
            "portability_prompts": _per_edit(portability_prompts, n, "portability_prompts"),
            "portability_answers": _per_edit(portability_ground_truth, n, "portability_ground_truth"),
            "generation_prompts": [[] for _ in range(n)],
        },
        schema=SCHEMA,
    )
    return validate_frame(df, "memoe.api.edit")


RECORD_FIELDS = tuple(inspect.signature(records).parameters)[3:]  # the optional fields, after the three lists


def method_config(method: Any = "memoe", **hparams):
    """A method config from a name (``"memoe"``, ``"ft-m"``, ...), a dict or a config object, with
    ``hparams`` overriding its fields (an unknown one is a ConfigError naming it)."""
    from pydantic import BaseModel, ValidationError

    from memoe.config import ConfigError, validate_method

    d = (
        method.model_dump(mode="json")
        if isinstance(method, BaseModel)
        else dict(method)
        if isinstance(method, dict)
        else {"name": method}
    )
    d.setdefault("name", "memoe")
    d.update(hparams)
    try:
        return validate_method(d)
    except ValidationError as e:
        # loc: (tag, field, ...); () where the name itself matches no registered method
        raise ConfigError(
            "method: "
            + "; ".join(
                f"{'.'.join(map(str, x['loc'][1:])) or (x['loc'] or ('name',))[0]}: {x['msg']}" for x in e.errors()
            )
        ) from None


def edit(
    prompts,
    target_new,
    subject,
    *,
    method: Any = "memoe",
    model: Any = "embedded:smollm2-135m",
    tokenizer=None,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    generation: bool = True,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    generation_batch_size: int = 64,
    **fields_and_hparams,
) -> EditResult:
    """Edit ``model`` (a memoe model name, or a loaded model with its ``tokenizer``) on the given
    facts with ``method`` and score the edits as the pipeline does (reliability, generality, locality
    against the unedited model, portability, exact generation). The other keyword arguments are the
    records' fields in ``records``' names (``rephrase_prompts``, ``locality_prompts``,
    ``locality_ground_truth``, ``portability_prompts``, ``portability_ground_truth``, ``target_true``)
    and the method's hyperparameters (e.g. ``steps=40``; an unknown name is an error naming it)."""
    import torch

    from memoe.editors import make_editor
    from memoe.metrics import evaluate, locality_predictions, summarize

    hparams = dict(fields_and_hparams)
    fields = {k: hparams.pop(k) for k in RECORD_FIELDS if k in hparams and k != "ids"}
    recs = records(prompts, target_new, subject, **fields)
    mcfg = method_config(method, **hparams)
    if isinstance(model, str):
        from memoe.models import load_model

        model, tokenizer = load_model(model, device, dtype)
    elif tokenizer is None:
        raise TypeError("memoe.api.edit: a loaded model needs its tokenizer= as well")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = locality_predictions(model, tokenizer, recs, batch_size=batch_size)  # the unedited model's answers
    torch.manual_seed(seed)
    editor = make_editor(model, tokenizer, mcfg, seed=seed)
    stats = editor.edit(recs)
    table = evaluate(
        model,
        tokenizer,
        recs,
        base,
        editor=editor,
        batch_size=batch_size,
        generation=generation,
        max_new_tokens=max_new_tokens,
        generation_batch_size=generation_batch_size,
    )
    table = recs.select("id", "subject", "prompt", "target_new").join(table, on="id", how="left", maintain_order="left")
    return EditResult(
        scores=summarize(table), per_edit=table, stats=stats, editor=editor, model=model, tokenizer=tokenizer
    )
