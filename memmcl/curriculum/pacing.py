"""Pacing functions: how many tasks of an easy → hard order are active at a given epoch."""

from __future__ import annotations

import math
from typing import Literal

Pacing = Literal["baby_steps", "linear", "root", "none"]
PACINGS: tuple[str, ...] = ("baby_steps", "linear", "root", "none")
START_COMPETENCE = 0.25  # the share of tasks open at the first epoch (linear / root), one default everywhere


def competence(pacing: Pacing, epoch: int, full_epoch: int, start: float) -> float:
    """Returns the share of the curriculum open at `epoch` (0-based), reaching 1 at `full_epoch`.

    linear: c0 + (1 - c0)·e/E; root: sqrt(c0² + (1 - c0²)·e/E) (Platanios et al., 2019); none: 1.
    """
    if pacing == "none":
        return 1.0
    progress = min(epoch / max(full_epoch, 1), 1.0)
    if pacing == "linear":
        return min(1.0, start + (1 - start) * progress)
    if pacing == "root":
        return min(1.0, math.sqrt(start**2 + (1 - start**2) * progress))
    raise ValueError(f"pacing '{pacing}' has no competence; expected one of {PACINGS}")


def active_count(pacing: Pacing, epoch: int, n_tasks: int, epochs_per_step: int = 1, full_epoch: int = 1,
                 start: float = START_COMPETENCE) -> int:
    """Returns how many of the easiest tasks train at `epoch`: baby steps add the next task every
    `epochs_per_step` epochs; linear / root open ceil(competence · n) tasks; none opens all."""
    if pacing not in PACINGS:
        raise ValueError(f"pacing '{pacing}': expected one of {PACINGS}")
    if pacing == "baby_steps":
        return min(n_tasks, 1 + epoch // max(epochs_per_step, 1))
    return max(1, min(n_tasks, math.ceil(competence(pacing, epoch, full_epoch, start) * n_tasks - 1e-9)))
