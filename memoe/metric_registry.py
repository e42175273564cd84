"""The metric registry: every per-edit metric of the evaluation (``memoe.metrics.evaluate``; the
re-edit ones in ``tasks/steps.py: evaluate_round``), in the order of the tables, with a one-line
description and whether it is a headline metric (the console table, ``memoe ls`` / ``show`` /
``compare``, the plots, the Prefect artifacts and the headline MLflow metrics). ``METRICS`` and
``HEADLINE`` are derived from it, kept current in place, so every importer sees a metric registered
later. No torch here: the CLI's listing commands read it."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from memoe.registry import Registry


@dataclass(frozen=True)
class Metric:
    description: str  # what it scores, against what (README: What the metrics mean)
    headline: bool = False
    short: str | None = None  # its column heading in the run listings (default: the name)
    # its function ``(memoe.metrics.Scoring) -> one value per record | None``, or the "module:function"
    # holding it (imported on first use: this registry stays free of torch); None: a column another
    # step fills (the re-edit metrics: the sequential protocol)
    compute: Callable | str | None = None

    def compute_fn(self) -> Callable:
        if not isinstance(self.compute, str):
            return self.compute
        module, _, name = self.compute.partition(":")
        return getattr(importlib.import_module(module), name)


METRICS: list[str] = []  # every registered metric; ``summarize`` averages these columns
HEADLINE: list[str] = []  # the headline ones


def _derive() -> None:
    METRICS[:] = list(REGISTRY)
    HEADLINE[:] = [n for n, m in REGISTRY.items() if m.headline]


REGISTRY: Registry = Registry("metric", on_change=_derive)


def register_metric(
    name: str,
    description: str,
    *,
    headline: bool = False,
    short: str | None = None,
    compute: Callable | str | None = None,
) -> None:
    """Register a per-edit metric: its column in ``evaluate``'s table (one value per record, None where it
    does not apply), computed by ``compute`` (a function of ``memoe.metrics.Scoring``, or its
    "module:function")."""
    REGISTRY[name] = Metric(description, headline, short, compute)


register_metric(
    "reliability",
    "the edit prompt, teacher-forced: share of the new target's tokens predicted",
    headline=True,
    short="rel",
    compute="memoe.metrics:reliability",
)
register_metric(
    "generality",
    "the data's rephrases of the edit prompt, against the new target",
    headline=True,
    short="gen",
    compute="memoe.metrics:generality",
)
register_metric(
    "locality",
    "unrelated prompts: agreement with the unedited model's predictions",
    headline=True,
    short="loc",
    compute="memoe.metrics:locality",
)
register_metric(
    "specificity",
    "the edited subject with other relations: agreement with the unedited model",
    headline=True,
    compute="memoe.metrics:specificity",
)
register_metric(
    "restyled_generality",
    "a rephrase lower-cased, upper-cased, after an unrelated sentence",
    headline=True,
    compute="memoe.metrics:restyled_generality",
)
register_metric(
    "chat_generality",
    "a rephrase inside the tokenizer's chat template",
    headline=True,
    compute="memoe.metrics:chat_generality",
)
register_metric(
    "portability",
    "a multi-hop question about the edited fact, against its answer",
    headline=True,
    short="port",
    compute="memoe.metrics:portability",
)
register_metric(
    "generation_reliability",
    "greedy generation on the edit prompt starts with the new target",
    headline=True,
    short="gen_rel",
    compute="memoe.metrics:generation_reliability",
)
register_metric(
    "efficacy",
    "CounterFact: the new target more likely than the true one on the edit prompt",
    compute="memoe.metrics:efficacy",
)
register_metric("paraphrase", "CounterFact: the same on the rephrases", compute="memoe.metrics:paraphrase")
register_metric(
    "neighborhood",
    "CounterFact: the true target still more likely on the neighbour prompts",
    compute="memoe.metrics:neighborhood",
)
register_metric(
    "locality_conflicts",
    "share of the locality prompts left out of locality: they ask a fact another edit in force changed",
    compute="memoe.metrics:locality_conflicts",
)
register_metric(
    "fluency", "n-gram entropy of generations on the generation prompts (eval.fluency)", compute="memoe.metrics:fluency"
)
register_metric(
    "reedit_reliability", "reliability of the re-edits, a fact's newer target (protocol.re_edit)", headline=True
)
register_metric(
    "overwritten_reliability",
    "a re-edited fact's earlier target on its prompt, teacher-forced: should be gone (protocol.re_edit)",
    headline=True,
)
register_metric(
    "overwritten_preferred", "a re-edited fact's earlier target more likely than its latest one (protocol.re_edit)"
)
register_metric(
    "overwritten_generation",
    "greedy generation on a re-edited fact's prompt starts with its earlier target (protocol.re_edit, eval.generation)",
)
