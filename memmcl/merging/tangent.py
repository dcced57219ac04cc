"""`TangentScorer`: label scores of a merge of tangent experts (`memmcl.experts.tangent`) in the tangent model.

The tangent model of a merge is the base model's first-order expansion along the merged delta: score₀ + J·ΔW. It is
computed by forward-mode AD through the base model (`MultiLoRAModel.tangent_pass`, eager attention). Because it is
linear in the genome, data scored under many genomes keeps each prompt's shift along each expert (and block), and a
genome switch is then one small product per batch. Those shifts are the label scores' derivatives in the genome at
genome 0, taken in reverse mode with one genome per example: a forward and one backward per label, however many
experts and blocks (forward mode would need a pass per expert and block).
"""

from __future__ import annotations

import contextlib

import torch

from memmcl.experts.scoring import continuation_rows, score_labels
from memmcl.experts.tangent import per_example_label_gradients
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
        per-expert, per-block shifts are computed once and kept.
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

    def _keep(self, prompts, answers, keys, chunk_size: int = 32) -> None:
        """Computes and keeps the prompts' base scores and per-expert, per-block shifts: d score / d genome at 0."""
        model, device = self.model, self.model.coef.device
        K, T = model.genome.shape
        for start in range(0, len(prompts), chunk_size):
            chunk, chunk_answers = prompts[start : start + chunk_size], answers[start : start + chunk_size]
            n_labels = [len(a) for a in chunk_answers]
            with torch.inference_mode(False), torch.enable_grad():  # also inside validate / test
                coef = torch.zeros(len(chunk), model.coef.numel(), device=device, requires_grad=True)
                continued = torch.tensor([i for i, _ in continuation_rows(chunk_answers)], dtype=torch.long,
                                         device=device)
                with model.per_example_coefficients(coef, continued):
                    value, grads = per_example_label_gradients(model, chunk, chunk_answers, self.pad_id, device, [coef])
            # coef = genome[index] · scale, so d score / d genome[k, t] sums scale · d score / d coef over its ranks
            per_rank = torch.stack([g.cpu() for (g,) in grads], dim=-1) * model.scale.cpu()[None, :, None]  # [N, ranks, L]
            shifts = torch.zeros(len(chunk), K * T, max(n_labels)).index_add_(1, model.index.cpu(), per_rank)
            for row, key in enumerate(keys[start : start + chunk_size]):
                n = n_labels[row]
                v, d = torch.full((self.width,), float("-inf")), torch.zeros(K, T, self.width)
                v[:n], d[..., :n] = value[row, :n], shifts[row, :, :n].view(K, T, n)
                self.shifts[key] = (v, d)
