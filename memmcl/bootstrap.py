"""Paired bootstrap intervals for a difference in mean-over-tasks accuracy between two models on the same examples.

Test examples are resampled with replacement within each task (a task keeps its size, so every task weighs the same
in each resample as in the reported mean), and both models are read on the same resampled examples: the interval is
that of the paired difference, narrower than two separate intervals would suggest when the models agree on most rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 1000


@dataclass(frozen=True)
class PairedDifference:
    """Model A's mean-over-tasks accuracy minus model B's, and its bootstrap 95% percentile interval [low, high]."""

    diff: float
    low: float
    high: float
    resamples: int
    seed: int

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of zero."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        """Returns the fields and `excludes_zero`, as stored in eval/results.json."""
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def paired_bootstrap(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], seed: int,
                     resamples: int = RESAMPLES) -> PairedDifference:
    """Returns A − B in mean-over-tasks accuracy with its paired bootstrap 95% percentile interval.

    `a[task]` and `b[task]` hold each test example's correctness (0/1, or a mean over draws in [0, 1]) in the same
    example order. The draws: `numpy.random.default_rng(seed)`, then for each task in sorted name order one
    `integers(0, n_task, size=(resamples, n_task))` of example indices, read by both models; the interval is the
    2.5th and 97.5th percentile (numpy's linear interpolation) of the resampled differences.
    """
    if set(a) != set(b) or not a:
        raise ValueError(f"tasks {sorted(a)} vs {sorted(b)}: expected the same, non-empty set of tasks for both models")
    rng = np.random.default_rng(seed)
    diffs, resampled = [], np.zeros(resamples)
    for task in sorted(a):
        x, y = np.asarray(a[task], dtype=float), np.asarray(b[task], dtype=float)
        if x.shape != y.shape or x.ndim != 1 or x.size == 0:
            raise ValueError(f"task {task!r}: shapes {x.shape} vs {y.shape}; expected one non-empty vector per model "
                             "over the same examples")
        if ((x < 0) | (x > 1) | (y < 0) | (y > 1)).any():
            raise ValueError(f"task {task!r}: correctness outside [0, 1]")
        d = x - y
        diffs.append(d.mean())
        resampled += d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    resampled /= len(diffs)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return PairedDifference(float(np.mean(diffs)), float(low), float(high), resamples, seed)
