"""Validated study configuration: YAML + ``--set key=value`` overrides -> pydantic models.

Unknown keys and wrong types are errors that name the key. A config has a stable hash
(``config_hash``) used for cache keys and run names.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from memoe.catalogue import DatasetError, dataset
from memoe.methods import METHODS, Method, Strict, discover, on_change, register_method, unregister_method  # noqa: F401
from memoe.paths import PROJECT_ROOT, resolve_path

DEFAULT_DATASET = "zsre"  # the catalogue's dataset (configs/datasets/catalogue.yaml) a config edits by default


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


class ModelConfig(Strict):
    name: str = Field(
        "embedded:smollm2-135m", description="'embedded:smollm2-135m', 'embedded:gemma3-270m', a HF id or a local path"
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|mps|cuda(:\d+)?|xpu(:\d+)?)$",
        description="'auto' picks CUDA when present, else CPU; or 'cpu', 'cuda', 'cuda:N', 'mps', 'xpu'",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype: 'auto' = bf16 on CUDA, else fp32"
    )
    max_length: int | None = Field(None, description="context limit for prompts; default: the model's own")


class DataConfig(Strict):
    """``dataset: NAME`` (a name of the dataset catalogue, configs/datasets/catalogue.yaml) stands for
    that dataset's ``path`` and ``format``; it is not kept, so a config naming a dataset equals (and
    hashes as) the config giving its path and format."""

    path: str = Field(
        dataset(DEFAULT_DATASET).path,
        description="edit data file (relative: the current folder, then the project root); or "
        "data.dataset: a name of the dataset catalogue (configs/datasets/catalogue.yaml)",
    )
    format: str = Field("zsre", description="file format (README: Data formats; the registry memoe.data.FORMATS)")
    n_edits: int | None = Field(100, ge=1, description="number of edits sampled; null = all")
    seed: int = Field(0, description="seed of data.sample=random")
    sample: Literal["first", "random"] = Field(
        "first", description="which n_edits records: the first ones or a seeded random sample"
    )
    skip_bad: bool = Field(False, description="skip and count bad records instead of failing")
    probes: bool = Field(
        True,
        description="add the hard probes to every record (memoe/probes.py): subject "
        "specificity, restyled and chat-template rephrases",
    )
    mix: list[str] | None = Field(
        None,
        min_length=2,
        description="datasets of the catalogue studied together, instead of data.path: their records, ids "
        "prefixed by the dataset's name, shuffled together (data.seed), then sampled as usual",
    )

    @property
    def files(self) -> list[tuple[Path, str, str | None]]:
        """(file, format, id prefix) of every file the edits come from."""
        if self.mix:
            return [(resolve_path(dataset(n).path), dataset(n).format, n) for n in self.mix]
        return [(resolve_path(self.path), self.format, None)]

    @property
    def label(self) -> str:
        """A short name of the data for titles and tags: the file's name, or the mixed datasets' names."""
        return "+".join(self.mix) if self.mix else Path(self.path).name

    @model_validator(mode="before")
    @classmethod
    def _dataset(cls, data):
        if isinstance(data, dict) and data.get("mix") is not None:
            # a resolved config written back (path and format at their defaults) reads the same
            default = {"path": cls.model_fields["path"].default, "format": cls.model_fields["format"].default}
            given = [f"data.{k}" for k in ("path", "format", "dataset") if k in data and data[k] != default.get(k)]
            if given:
                raise ValueError(f"data.mix names its datasets; leave out {' and '.join(given)}")
            mix = data["mix"]
            if isinstance(mix, list):
                for name in mix:
                    dataset(name)  # an unknown name: an error naming the catalogue's names
                if len(set(mix)) != len(mix):
                    raise ValueError(f"data.mix names a dataset twice: {mix}")
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


MethodConfig: Any = None  # the discriminated union of the registered settings classes (kept current by _rebuild)
_method_adapter: TypeAdapter | None = None


def _rebuild() -> None:
    """The method union from the registry; once ``Config`` exists, its ``method`` and ``methods`` too."""
    global MethodConfig, _method_adapter
    # by name: the same union (and error messages) whichever method package was imported first
    configs = tuple(dict.fromkeys(METHODS[n].config for n in sorted(METHODS)))
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


# the method packages (memoe/editors/<m>/) register their methods; the union follows the registry
on_change(_rebuild)
discover()
_rebuild()


class ReEditConfig(Strict):
    round: int = Field(
        2, ge=2, description="the (1-based) round that re-edits an earlier round's edits with new targets"
    )
    of_round: int = Field(1, ge=1, description="the round whose edits are re-edited")


class ProtocolConfig(Strict):
    mode: Literal["batch", "sequential"] = Field(
        "batch", description="'batch': all edits at once; 'sequential': `rounds` rounds of `batch_size` edits"
    )
    rounds: int = Field(1, ge=1, description="sequential: number of rounds")
    batch_size: int | None = Field(None, ge=1, description="edits per round; default n_edits / rounds")
    re_edit: ReEditConfig | None = Field(
        None,
        description="sequential: one round re-edits an earlier round's edits (same prompts, new targets): "
        "scored as reedit_reliability (the latest target) and overwritten_reliability (the earlier one)",
    )


class EvalConfig(Strict):
    batch_size: int = Field(16, ge=1, description="prompts per evaluation batch")
    generation_batch_size: int = Field(
        64,
        ge=1,
        description="prompts per generation batch (a decode step reads every weight once, whatever its rows: "
        "64 rows decode 1.4x faster than 16 on a CPU core)",
    )
    generation: bool = Field(True, description="also score greedy generation (generation_reliability)")
    max_new_tokens: int = Field(16, ge=1, description="generated tokens per prompt (at least the target's length + 2)")
    fluency: bool = Field(False, description="also score n-gram entropy of generations on generation_prompts")
    retention_sample: int | None = Field(
        None, ge=0, description="score at most this many earlier edits per round (null = all)"
    )
    reuse_states: bool = Field(
        True,
        description="sequential studies: the unedited model's states below the edit are computed once per "
        "prompt and reused by the later rounds' evaluations (memoe/frozen.py; about 0.5 GB of disk per "
        "1,000 ZsRE edits with their probes)",
    )
    reuse_scores: bool = Field(
        True,
        description="sequential studies: a sequence scored in an earlier round is not scored again while "
        "the editor says its effect there is unchanged (Editor.row_versions; MEMoE with growth 'round': "
        "an edit in a frozen block keeps its scores until its subject moves; memoe/memo.py)",
    )


class TrackingConfig(Strict):
    mlflow_uri: str | None = Field(None, description="default: sqlite database in runs/")
    experiment: str = Field("memoe", description="MLflow experiment name")
    enabled: bool = Field(True, description="log to MLflow")


class Config(Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=lambda: METHODS["memoe"].config())
    methods: list[MethodConfig] | None = Field(
        None, min_length=1, description="compare flow: several methods on the same edits"
    )
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
                raise ValueError(
                    "protocol.batch_size applies to sequential mode only (batch mode edits data.n_edits "
                    "at once); leave it out or set protocol.mode: sequential"
                )
            if p.rounds != 1:
                raise ValueError(
                    f"protocol.rounds={p.rounds} applies to sequential mode only; leave it out or set "
                    "protocol.mode: sequential"
                )
            if p.re_edit is not None:
                raise ValueError("protocol.re_edit applies to sequential mode only; set protocol.mode: sequential")
            return self
        if p.re_edit is not None and not p.re_edit.of_round < p.re_edit.round <= p.rounds:
            raise ValueError(
                f"protocol.re_edit: round {p.re_edit.round} cannot re-edit round {p.re_edit.of_round} "
                f"of a {p.rounds}-round study (need 1 <= of_round < round <= protocol.rounds)"
            )
        if p.batch_size is not None:
            need = p.rounds * p.batch_size
            if "n_edits" not in d.model_fields_set:
                d.n_edits = need
            elif d.n_edits != need:
                raise ValueError(
                    f"data.n_edits={d.n_edits} but protocol.rounds x protocol.batch_size = {p.rounds} x "
                    f"{p.batch_size} = {need} edits; set data.n_edits: {need} or leave it out"
                )
        elif d.n_edits is None:
            raise ValueError("sequential mode with data.n_edits: null needs protocol.batch_size (edits per round)")
        elif d.n_edits % p.rounds:
            raise ValueError(
                f"data.n_edits={d.n_edits} is not a multiple of protocol.rounds={p.rounds}; set "
                "protocol.batch_size or a multiple"
            )
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
