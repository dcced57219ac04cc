"""Merge methods: one registry (name → combine function, whether it folds, whether it exports as a LoRA adapter).

A combine function takes a stack [T, ...] of task vectors (ΔW_t of one weight matrix) and a [T] weight tensor.
- linear:      Σ_t w_t ΔW_t. Exact on the factors (rescaled, never materialized); exports as one LoRA adapter.
- ties:        TIES-merging as peft's `merge_utils.ties` defines it (Yadav et al., 2023): trim each ΔW_t to its
               top-`int(density · numel)` entries by magnitude; elect each entry's sign from the sum of the trimmed,
               *unweighted* deltas (a zero sum elects +); average the weighted entries whose sign agrees with it.
- dare_linear: DARE (Yu et al., 2023): drop each entry with probability 1 - `density`, rescale the kept ones by
               1 / `density`, then combine linearly.
- dare_ties:   DARE's drop, then TIES' sign election and disjoint mean (peft's `dare_ties`).
TIES and DARE need materialized deltas: the merged weights are folded into the layers and exported as a full model.
DARE's mask comes from a `torch.Generator`, so a fixed seed gives the same mask for every genome (peft draws it from
the global RNG).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

MergeMethod = Literal["linear", "ties", "dare_linear", "dare_ties"]


def linear(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.tensordot(weights.to(deltas), deltas, dims=1)


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keeps the `int(density * numel)` entries of largest magnitude (peft's count), zeroes the rest."""
    k = int(density * delta.numel())
    if density >= 1.0 or k >= delta.numel():
        return delta.clone()
    out = torch.zeros_like(delta)
    if k > 0:
        flat = delta.flatten()
        idx = flat.abs().topk(k, sorted=False).indices
        out.view(-1)[idx] = flat[idx]
    return out


def dare_drop(delta: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keeps each entry with probability `density`, rescaled by 1 / `density`."""
    if density >= 1.0:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def sign_elect_merge(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint merge: the sign of Σ_t ΔW_t (unweighted; + where it is 0) is elected per entry; returns the sum
    of the weighted entries with that sign over their count (entries that are 0 never count)."""
    elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(deltas)
    agree = torch.sign(deltas) == elected
    weighted = deltas * weights.to(deltas).view(-1, *([1] * (deltas.dim() - 1)))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def ties(deltas: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    return sign_elect_merge(torch.stack([magnitude_trim(d, density) for d in deltas]), weights)


def dare_linear(deltas: torch.Tensor, weights: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    return linear(torch.stack([dare_drop(d, density, generator) for d in deltas]), weights)


def dare_ties(deltas: torch.Tensor, weights: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    return sign_elect_merge(torch.stack([dare_drop(d, density, generator) for d in deltas]), weights)


@dataclass(frozen=True)
class MethodInfo:
    """A merge method: `combine(deltas, weights, density, generator)` → merged delta; `folds`: the merge needs
    materialized deltas written into the weights; `low_rank_export`: the merge is exactly one LoRA adapter."""

    combine: Callable[[torch.Tensor, torch.Tensor, float, torch.Generator | None], torch.Tensor]
    folds: bool
    low_rank_export: bool


METHODS: dict[str, MethodInfo] = {
    "linear": MethodInfo(lambda d, w, density, gen: linear(d, w), folds=False, low_rank_export=True),
    "ties": MethodInfo(lambda d, w, density, gen: ties(d, w, density), folds=True, low_rank_export=False),
    "dare_linear": MethodInfo(dare_linear, folds=True, low_rank_export=False),
    "dare_ties": MethodInfo(dare_ties, folds=True, low_rank_export=False),
}


def method_info(name: str) -> MethodInfo:
    """Returns the registered merge method `name`; an unknown name is a ValueError listing the registered ones."""
    if name not in METHODS:
        raise ValueError(f"merge method '{name}': expected one of {', '.join(METHODS)}")
    return METHODS[name]


def merge_deltas(method: MergeMethod, deltas: torch.Tensor, weights: torch.Tensor, density: float = 0.5,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Returns the merged delta of one weight matrix by `method`."""
    return method_info(method).combine(deltas, weights, density, generator)
