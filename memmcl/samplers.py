"""The datamodule's samplers: evaluation shards without padding, evaluation batches of one task each, and training's
re-weightable task mixture (the curriculum callback drives its weights)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler


class EvalShardSampler(DistributedSampler):
    """Shards evaluation data across ranks without the padding DistributedSampler adds, so no example counts twice."""

    def __init__(self, dataset: Sequence, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def task_batches(items: Sequence[dict], size: int) -> list[list[dict]]:
    """Returns the items cut into consecutive batches of at most `size` that never span two tasks."""
    batches: list[list[dict]] = []
    for item in items:
        if not batches or len(batches[-1]) == size or batches[-1][-1]["task"] != item["task"]:
            batches.append([])
        batches[-1].append(item)
    return batches


class TaskMixtureSampler(DistributedSampler):
    """Samples a fixed number of training indices per epoch from several tasks in proportion to weight × task size.

    With every weight 1 an epoch is one shuffled pass over all examples; weight 0 switches a task off. The weights
    can change between epochs (the curriculum callback drives them). Deterministic in (seed, epoch, weights); every
    rank computes the same global order and takes its own shard.
    """

    def __init__(self, task_sizes: Sequence[int], num_replicas: int = 1, rank: int = 0, seed: int = 0, num_samples: int | None = None):
        offsets = [0]
        for n in task_sizes:
            offsets.append(offsets[-1] + n)
        super().__init__(range(offsets[-1]), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.task_sizes = list(task_sizes)
        self.offsets = offsets
        self.weights = [1.0] * len(task_sizes)
        self.epoch_samples = num_samples or offsets[-1]

    def set_weights(self, weights: Sequence[float]) -> None:
        if len(weights) != len(self.task_sizes) or any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ValueError(f"task weights must be {len(self.task_sizes)} non-negative numbers, not all zero; got {list(weights)}")
        self.weights = [float(w) for w in weights]

    def global_order(self) -> list[int]:
        """Returns this epoch's indices over all ranks, before sharding."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        mass = [w * n for w, n in zip(self.weights, self.task_sizes, strict=True)]
        quotas = [math.floor(self.epoch_samples * m / sum(mass)) for m in mass]
        for t in sorted(range(len(mass)), key=lambda t: -mass[t])[: self.epoch_samples - sum(quotas)]:
            quotas[t] += 1 if mass[t] > 0 else 0
        picked: list[int] = []
        for t, quota in enumerate(quotas):
            while quota > 0:
                take = torch.randperm(self.task_sizes[t], generator=g)[:quota]
                picked.extend((take + self.offsets[t]).tolist())
                quota -= len(take)
        return [picked[i] for i in torch.randperm(len(picked), generator=g).tolist()]

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        per_rank = math.ceil(len(order) / self.num_replicas)
        order += order[: per_rank * self.num_replicas - len(order)]
        return iter(order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return math.ceil(self.epoch_samples / self.num_replicas)
