"""Experts as LoRA factors, and genomes as YAML: reading a peft LoRA adapter into per-module (A, B, scale) factors,
a [blocks, T] coefficient matrix to and from the `{expert: [per-block weight]}` form genome files hold, and the error
for experts or genomes that cannot be merged. `memmcl.merging.multilora` merges the factors."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memmcl.experts.expert_io import ADAPTER_WEIGHTS


class MergeError(ValueError):
    """Experts that cannot be merged, or a genome that does not fit them; the message names what was expected."""


@dataclass
class LoRAFactors:
    """One expert's LoRA factors per module: `modules[name] = (A [r, in], B [out, r], scale)`."""

    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(repr=False)


def _pattern_value(patterns: dict, name: str, default):
    for key, value in patterns.items():  # peft matches pattern keys against the end of the module name
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def read_lora_factors(path: str | Path, name: str | None = None) -> LoRAFactors:
    """Reads a peft LoRA adapter directory (adapter_config.json + adapter_model.safetensors) into factors."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / ADAPTER_WEIGHTS
    for f in (config_file, weights_file):
        if not f.exists():
            raise MergeError(f"{path}: missing {f.name}; expected a peft LoRA adapter saved with save_pretrained")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise MergeError(f"{config_file}: peft_type is {config.get('peft_type')!r}; expected 'LORA'")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise MergeError(f"{config_file}: {key}=true is not supported by the exact rescaling merge")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise MergeError(f"{config_file}: only LoRA factors can be merged; expected bias 'none' and no modules_to_save")
    tensors = load_file(str(weights_file))
    modules = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b_key = key.replace(".lora_A.weight", ".lora_B.weight")
        if b_key not in tensors:
            raise MergeError(f"{weights_file}: {key} has no matching lora_B")
        b = tensors[b_key]
        r = a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[module] = (a, b, float(scale))
    if not modules:
        raise MergeError(f"{weights_file}: no lora_A/lora_B weights found")
    return LoRAFactors(name or path.name, modules)


def coefficients_to_yaml(coef: torch.Tensor, names: list[str]) -> dict[str, list[float]]:
    """Returns a [blocks, T] coefficient matrix as `{expert: [per-block weight]}`, the form genome files hold."""
    return {n: [round(float(c), 8) for c in coef[:, t]] for t, n in enumerate(names)}


def coefficients_from_yaml(coefficients, names: list[str], blocks: int, source: str = "<memory>") -> torch.Tensor:
    """Returns the [blocks, T] matrix of `{expert: [per-block weight]}` (a bare number counts as one block),
    checked against the experts; errors name `source` and what was expected."""
    if not isinstance(coefficients, dict):
        raise MergeError(f"{source}: field 'coefficients' (expert name -> list of per-block weights) is missing")
    missing = set(names) - set(coefficients)
    if missing:
        raise MergeError(f"{source}: field 'coefficients' lacks expert(s) {sorted(missing)}; experts: {names}")
    values = [coefficients[n] if isinstance(coefficients[n], list) else [coefficients[n]] for n in names]
    if any(len(v) != blocks for v in values):
        raise MergeError(f"{source}: every coefficient list needs {blocks} value(s) (blocks)")
    return torch.tensor(values, dtype=torch.float32).T
