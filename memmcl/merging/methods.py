"""Merge methods on materialized deltas, as small pure tensor functions.

`deltas` is a stack [T, ...] of task vectors (ΔW_t of one weight matrix), `weights` a [T] tensor.
- linear:      Σ_t w_t ΔW_t
- TIES:        trim each ΔW_t to its top-`density` entries by magnitude, elect the sign of Σ_t w_t ΔW'_t per entry,
               and average the weighted entries that agree with it (Yadav et al., 2023; as peft's `ties`).
- DARE:        drop each entry with probability 1 - `density` and rescale the kept ones by 1 / `density`
               (Yu et al., 2023), then combine linearly (`dare_linear`) or by TIES' sign election (`dare_ties`).
DARE's mask comes from a `torch.Generator`, so a fixed seed gives the same mask for every genome.
"""

from __future__ import annotations

from typing import Literal

import torch

MergeMethod = Literal["linear", "ties", "dare_linear", "dare_ties"]


def linear(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.tensordot(weights.to(deltas), deltas, dims=1)


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keeps the `round(density * numel)` entries of largest magnitude (ties broken by position), zeroes the rest."""
    k = int(round(density * delta.numel()))
    if k >= delta.numel():
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
    """Σ over agreeing entries / their count, where the elected sign is that of Σ_t w_t ΔW_t."""
    weighted = deltas * weights.to(deltas).view(-1, *([1] * (deltas.dim() - 1)))
    sign = torch.sign(weighted.sum(0))
    agree = (torch.sign(weighted) == sign) & (weighted != 0)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def ties(deltas: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    trimmed = torch.stack([magnitude_trim(d, density) for d in deltas])
    return sign_elect_merge(trimmed, weights)


def dare_linear(deltas: torch.Tensor, weights: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    return linear(torch.stack([dare_drop(d, density, generator) for d in deltas]), weights)


def dare_ties(deltas: torch.Tensor, weights: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    return sign_elect_merge(torch.stack([dare_drop(d, density, generator) for d in deltas]), weights)


def merge_deltas(method: MergeMethod, deltas: torch.Tensor, weights: torch.Tensor, density: float = 0.5,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Returns the merged delta of one weight matrix by `method`."""
    if method == "linear":
        return linear(deltas, weights)
    if method == "ties":
        return ties(deltas, weights, density)
    if method == "dare_linear":
        return dare_linear(deltas, weights, density, generator)
    if method == "dare_ties":
        return dare_ties(deltas, weights, density, generator)
    raise ValueError(f"merge method '{method}': expected one of linear, ties, dare_linear, dare_ties")
