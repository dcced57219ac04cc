"""`TangentScorer`: label scores of a merge of tangent experts (`memmcl.experts.tangent`) in the tangent model.

The tangent model of a merge is the base model's first-order expansion along the merged delta: score₀ + J·ΔW. It is
computed by forward-mode AD through the base model (`MultiLoRAModel.tangent_pass`, eager attention). Because it is
linear in the genome, data scored under many genomes keeps each prompt's shift along each expert (and block), and a
genome switch is then one small product per batch.
"""

from __future__ import annotations

import contextlib

import torch

from memmcl.experts.scoring import score_labels
from memmcl.merging.multilora import MultiLoRAModel


class TangentScorer:
    """Scores the current merge of `model` (whose experts are tangent experts) in the tangent model.

    Args:
        model: the experts' factors over the base model; put in tangent mode here (eager attention, no folding).
        pad_id: the tokenizer's padding id.
        width: the most labels of any task (kept shifts are stored at this width, so a batch stacks them).
    """

    # A batch of kept shifts costs one small product whatever its size (the model runs in chunks of `score_labels`),
    # so evaluation loops over tangent merges use batches of at least this many prompts: less per-batch overhead.
    batch_size = 512

    def __init__(self, model: MultiLoRAModel, pad_id: int, width: int):
        model.model.set_attn_implementation("eager")  # forward-mode AD needs attention written in plain ops
        model.tangent = True
        self.model, self.pad_id, self.width = model, pad_id, width
        # prompt -> (label scores of the base [width], their shift along each expert's delta per block [K, T, width])
        self.shifts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.caching = False

    @contextlib.contextmanager
    def cached(self):
        """Within: scores come from per-expert shifts kept per prompt (for data scored under many genomes)."""
        before, self.caching = self.caching, True
        try:
            yield
        finally:
            self.caching = before

    def _pass(self, prompts, answers) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.tangent_pass(lambda: score_labels(self.model, prompts, answers, self.pad_id, reuse_prefix=False))

    def scores(self, prompts: list[list[int]], answers: list[list[list[int]]]) -> torch.Tensor:
        """Returns the tangent model's label scores, score₀ + Σ_{block, t} c_{block, t} · shift_{block, t}.

        Outside `cached`: one forward-mode pass along the current merge's delta. Within it, each new prompt's
        per-expert, per-block shifts are computed once (one pass each) and kept.
        """
        if not self.caching:
            value, shift = self._pass(prompts, answers)
            return value + shift
        keys = [(tuple(p), tuple(map(tuple, a))) for p, a in zip(prompts, answers, strict=True)]
        first: dict[tuple, int] = {}
        for i, k in enumerate(keys):
            if k not in self.shifts:
                first.setdefault(k, i)
        if first:
            self._keep([prompts[i] for i in first.values()], [answers[i] for i in first.values()], list(first))
        n_labels = max(map(len, answers))
        value = torch.stack([self.shifts[k][0] for k in keys])
        shifts = torch.stack([self.shifts[k][1] for k in keys])
        return (value + torch.einsum("nktl,kt->nl", shifts, self.model.genome.cpu()))[:, :n_labels]

    def _keep(self, prompts, answers, keys) -> None:
        """Computes and keeps the prompts' base scores and per-expert, per-block shifts (one pass per unit genome)."""
        genome = self.model.genome.clone()
        K, T = genome.shape
        shifts = torch.zeros(len(prompts), K, T, max(map(len, answers)))
        try:
            for k in range(K):
                for t in range(T):
                    unit = torch.zeros(K, T)
                    unit[k, t] = 1.0
                    self.model.set_genome(unit)
                    value, shifts[:, k, t] = self._pass(prompts, answers)
        finally:
            self.model.set_genome(genome)
        for row, (key, example) in enumerate(zip(keys, answers, strict=True)):
            n = len(example)
            v, d = torch.full((self.width,), float("-inf")), torch.zeros(K, T, self.width)
            v[:n], d[..., :n] = value[row, :n], shifts[row, ..., :n]
            self.shifts[key] = (v, d)
