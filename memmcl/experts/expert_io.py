"""A saved expert directory: a peft LoRA adapter plus `expert.yaml` (backbone, task specs, tangent flag): writing LoRA
factors as an adapter, checking a directory before it is loaded, and the error both raise."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

EXPERT_FILE = "expert.yaml"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class ExpertError(ValueError):
    """A saved expert directory that cannot be loaded; the message names the path and what was expected."""


def write_lora_adapter(out_dir: str | Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float,
                       base_name_or_path: str = "") -> Path:
    """Writes LoRA factors {module: (A [r, in], B [out, r])} into `out_dir` as a peft adapter whose every module
    applies scaling · B A (ranks may differ per module); `merging.factors.read_lora_factors` reads it back."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    def alpha(rank: int) -> float:
        value = rank * scaling
        return int(value) if float(value).is_integer() else value

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    r = max(ranks.values())
    config = LoraConfig(r=r, lora_alpha=alpha(r), target_modules=sorted(ranks), lora_dropout=0.0, bias="none",
                        rank_pattern={n: k for n, k in ranks.items() if k != r},
                        alpha_pattern={n: alpha(k) for n, k in ranks.items() if k != r},
                        task_type="CAUSAL_LM", base_model_name_or_path=base_name_or_path)
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous().cpu()
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS))
    return out_dir


def check_expert_dir(path: str | os.PathLike) -> dict:
    """Returns the expert.yaml of a saved expert directory; errors name the path and what was expected."""
    path = Path(path)
    if not path.is_dir():
        raise ExpertError(f"{path}: no such expert directory; expected one written by LoRAExpert.save_expert")
    for name in ("adapter_config.json", EXPERT_FILE):
        if not (path / name).exists():
            raise ExpertError(f"{path}: missing {name}; expected a peft adapter plus {EXPERT_FILE}")
    return yaml.safe_load((path / EXPERT_FILE).read_text())
