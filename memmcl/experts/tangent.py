"""Tangent-space LoRA experts: each expert is linear in its adapter, so a sum of experts is a sum of their effects.

A tangent expert is the first-order Taylor expansion of the label scorer in the LoRA factor B, at B = 0, with the A
factor a fixed random matrix shared by every expert (seeded, peft's initialisation):

    score(x, label; B) ≈ score₀(x, label) + J(x, label) · vec(B),    ΔW = (alpha / r) · B · A0

(Ortiz-Jiménez et al. 2023, "Task arithmetic in the tangent space"). In this model a merge Σ_t w_t B_t moves every
label score by exactly Σ_t w_t J·vec(B_t): experts interfere only through what they change on each other's inputs.
So each expert is also kept from moving other tasks' label scores: `off_task_weight` × the squared, label-centred
score shift it causes on a pool of other tasks' training prompts (unlabelled), as in tangent-space regularisation
(Yoshida et al. 2025). Because J does not depend on B, each prompt's label-score Jacobian is computed once (one
backward pass per label) and kept, after which training is logistic regression on those Jacobians and costs no
forward pass. The expert is saved as an ordinary peft LoRA adapter (lora_A = A0, lora_B = B) whose expert.yaml says
`tangent`; `MergeSearch` then scores merges in the tangent model (forward-mode AD through the base model), which is
not the model peft builds when it loads the adapter (that one applies ΔW inside the network).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from memmcl.experts.backbone import Dtype, load_backbone
from memmcl.experts.expert import DEFAULT_TARGETS
from memmcl.experts.expert_io import EXPERT_FILE, write_lora_adapter
from memmcl.experts.label_scoring import LabelScoringModule
from memmcl.experts.scoring import continuation_rows, score_chunk
from memmcl.rundir import atomic_save_dir

# (space, prompt, answers) -> (label scores at B = 0 [L], their Jacobian [L, P]); shared by the experts of a process,
# so a prompt that is one expert's training example and another's off-task prompt is differentiated once.
_JACOBIANS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def clear_jacobians() -> None:
    """Drops every kept Jacobian."""
    _JACOBIANS.clear()


def per_example_label_gradients(model: nn.Module, prompts: list[list[int]], answers: list[list[list[int]]], pad_id: int,
                                device, wrt: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
    """Scores the prompts on whole sequences, so that row i of the forward is example i (as per-example parameters
    need), and returns (label scores [N, L], detached; per label l, the gradients in each of `wrt` of label l's score
    summed over the examples that have it: one backward per label). With per-example parameters in `wrt`, row i of a
    gradient is example i's own. Call with gradients on, outside inference mode."""
    n_labels = [len(a) for a in answers]
    L = max(n_labels)
    scores = score_chunk(model, prompts, answers, pad_id, L, device, share_prefix=False)
    grads = []
    for label in range(L):
        present = torch.tensor([label < n for n in n_labels])
        grads.append(torch.autograd.grad(scores[present, label].sum(), wrt, retain_graph=label < L - 1))
    return scores.detach(), grads


class TangentLinear(nn.Module):
    """A frozen linear layer plus the tangent adapter path scale · B (A0 x), with B set per example (`per_example`,
    [N, out, r], for per-example Jacobians) or absent (the base layer).

    Label scoring on whole sequences runs the model once over the prompts (row i: example i) and, for answers of
    several tokens, once more over continuation rows (`continuation_example[j]`: the example row j continues)."""

    def __init__(self, base: nn.Linear, a0: torch.Tensor, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.register_buffer("a0", a0.to(base.weight), persistent=False)
        self.per_example: torch.Tensor | None = None
        self.continuation_example: torch.Tensor | None = None
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        b = self.per_example
        if b is None:
            return y
        if self.calls > 0:  # the continuation rows' forward
            b = b[self.continuation_example]
        self.calls += 1
        return y + self.scale * torch.einsum("ntr,nor->nto", x @ self.a0.T, b)


def shared_a0(model: nn.Module, targets: list[str], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Returns the fixed A factor of every targeted linear layer: uniform(±1/sqrt(in)) (peft's LoRA A initialisation),
    drawn from `seed` in module-name order, so every expert of a run shares it."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in sorted(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            bound = 1.0 / math.sqrt(module.in_features)
            out[name] = (torch.rand(rank, module.in_features, generator=generator) * 2 - 1) * bound
    if not out:
        raise ValueError(f"target_modules {targets}: no linear layer of the backbone has one of these names")
    return out


class TangentSpace(nn.Module):
    """The frozen backbone with the shared A0 on every target layer; returns label scores and their Jacobians in B."""

    def __init__(self, model: nn.Module, targets: list[str], rank: int, alpha: float, seed: int):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.rank, self.scale, self.seed = rank, alpha / rank, seed
        self.layers: dict[str, TangentLinear] = {}
        for name, a0 in shared_a0(model, targets, rank, seed).items():
            parent, _, child = name.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            layer = TangentLinear(getattr(holder, child), a0, self.scale)
            setattr(holder, child, layer)
            self.layers[name] = layer
        self.sizes = [layer.base.out_features * rank for layer in self.layers.values()]
        self.n_params = sum(self.sizes)

    def key(self) -> tuple:
        return (id(self.model), self.rank, self.scale, self.seed, tuple(self.layers))

    def factors(self, b: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Returns {module: (A0 [r, in], B [out, r])} of a flat parameter vector b."""
        out = {}
        for (name, layer), part in zip(self.layers.items(), b.split(self.sizes), strict=True):
            out[name] = (layer.a0, part.view(layer.base.out_features, self.rank))
        return out

    def jacobians(self, prompts: list[list[int]], answers: list[list[list[int]]], pad_id: int,
                  chunk_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Returns per example (label scores at B = 0 [L], their Jacobian in vec(B) [L, P]), L its own labels;
        kept per process, so a prompt is differentiated once."""
        space = self.key()
        keys = [(space, tuple(p), tuple(map(tuple, a))) for p, a in zip(prompts, answers, strict=True)]
        missing = list(dict.fromkeys(k for k in keys if k not in _JACOBIANS))
        for chunk in (missing[i : i + chunk_size] for i in range(0, len(missing), chunk_size)):
            for key, value in zip(chunk, self._chunk_jacobians(chunk, pad_id), strict=True):
                _JACOBIANS[key] = value
        return [_JACOBIANS[k] for k in keys]

    def _chunk_jacobians(self, chunk: list[tuple], pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n_labels = [len(k[2]) for k in chunk]
        try:  # Jacobians are also taken inside validate / test / predict (inference mode)
            with torch.inference_mode(False), torch.enable_grad():
                answers = [[list(a) for a in k[2]] for k in chunk]
                device = next(self.model.parameters()).device
                continued = torch.tensor([i for i, _ in continuation_rows(answers)], dtype=torch.long, device=device)
                bs = {}
                for name, layer in self.layers.items():
                    bs[name] = torch.zeros(len(chunk), layer.base.out_features, self.rank, requires_grad=True,
                                           device=layer.a0.device)
                    layer.per_example, layer.continuation_example, layer.calls = bs[name], continued, 0
                scores, grads = per_example_label_gradients(self.model, [list(k[1]) for k in chunk], answers, pad_id,
                                                            device, list(bs.values()))
                rows = [torch.cat([g.flatten(1) for g in label], dim=1).cpu() for label in grads]  # L × [N, P]
        finally:
            for layer in self.layers.values():
                layer.per_example, layer.continuation_example = None, None
        jac = torch.stack(rows, dim=1)  # [N, L, P]
        return [(scores[i, : n], jac[i, : n].clone()) for i, n in enumerate(n_labels)]


class TangentExpert(LabelScoringModule):
    """A tangent-space LoRA expert (see the module docstring): label scores score₀ + J·b, b = vec(B) trained.

    Args:
        backbone, dtype: as `LoRAExpert`.
        lora_r, lora_alpha, target_modules: the adapter (A0 of rank r on every target, scaling alpha / r).
        a0_seed: the seed of the shared A0 (the pipeline gives every expert of a run the same one).
        lr, weight_decay: Adam (constant rate; the objective is convex).
        off_task_weight: weight of the off-task penalty (0: none) over the whole pool `set_off_task` gives, every
            step: the mean squared, label-centred score shift over each other task's prompts, averaged over tasks.
        export_dir: where `fit` writes the expert (peft adapter + expert.yaml); default `<log_dir>/expert`.
    """

    generates = False  # its model is the tangent expansion, scored per label

    def __init__(
        self,
        backbone: str = "tiny",
        dtype: Dtype = "float32",
        lora_r: int = 16,
        lora_alpha: int = 32,
        target_modules: list[str] | None = None,
        a0_seed: int = 0,
        lr: float = 0.05,
        weight_decay: float = 0.0,
        off_task_weight: float = 1.0,
        export_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        base, tokenizer = load_backbone(backbone, dtype)
        self.pad_id = tokenizer.pad_token_id
        self.space = TangentSpace(base, list(target_modules or DEFAULT_TARGETS), lora_r, lora_alpha, a0_seed)
        self.model = self.space.model
        self.b = nn.Parameter(torch.zeros(self.space.n_params))
        self.off_task: dict[str, list[tuple[list[int], list[list[int]]]]] = {}
        self._pool: dict[str, torch.Tensor] = {}  # task -> its pool's centred, scaled Jacobian rows
        self._batches: dict[tuple, tuple[torch.Tensor, ...]] = {}  # recent batches' stacked features (see _features)

    def set_off_task(self, prompts: dict[str, list[tuple[list[int], list[list[int]]]]]) -> None:
        """Sets the off-task pool: {task: [(prompt ids, label answers' ids), ...]} of other tasks' training prompts
        (a task the expert trains on is skipped)."""
        self.off_task = {t: items for t, items in prompts.items() if items}
        self._pool = {}

    def _stack(self, prompts, answers) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (score₀ [N, L], J [N, L, P], present [N, L]) padded to the most labels of the prompts."""
        pairs = self.space.jacobians(prompts, answers, self.pad_id)
        L = max(len(s) for s, _ in pairs)
        s0 = torch.full((len(pairs), L), float("-inf"))
        jac = torch.zeros(len(pairs), L, self.space.n_params)
        for i, (s, j) in enumerate(pairs):
            s0[i, : len(s)], jac[i, : len(s)] = s, j
        return s0.to(self.device), jac.to(self.device), torch.isfinite(s0).to(self.device)

    def _features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the batch's (score₀, J, present) as `_stack`, in an order of its own, and `order` [N]: row k holds
        batch example order[k]. A batch of the same prompts as a recent one (whole-set training batches, the same
        validation batches every epoch) reuses its stacked features in whatever order it comes."""
        contents = [(tuple(p), tuple(map(tuple, a))) for p, a in zip(batch["prompt"], batch["answers"], strict=True)]
        rows = sorted(range(len(contents)), key=contents.__getitem__)
        key = tuple(contents[i] for i in rows)
        if key not in self._batches:
            if len(self._batches) >= 16:  # shuffled minibatches never repeat: keep only recent ones
                self._batches.pop(next(iter(self._batches)))
            self._batches[key] = self._stack([batch["prompt"][i] for i in rows], [batch["answers"][i] for i in rows])
        return (*self._batches[key], torch.tensor(rows, device=self.device))

    def predict_scores(self, batch: dict, b: torch.Tensor | None = None) -> torch.Tensor:
        """Returns [B, max labels] label scores score₀ + J·b in the tangent model (b: this expert's, unless given)."""
        s0, jac, present, order = self._features(batch)
        scores = torch.where(present, s0 + jac @ (self.b if b is None else b).detach(), s0)
        return torch.empty_like(scores).index_copy_(0, order, scores)

    def _off_task_rows(self, task: str) -> torch.Tensor:
        """Returns the task pool's label-centred Jacobian rows [rows, P], scaled so that the squared norm of rows·b
        is the mean squared centred score shift over the pool's (prompt, label) pairs."""
        if task not in self._pool:
            _, jac, present = self._stack([p for p, _ in self.off_task[task]], [a for _, a in self.off_task[task]])
            mask = present.unsqueeze(-1).to(jac.dtype)
            centred = (jac - (jac * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)) * mask
            self._pool[task] = centred[present] / present.sum().sqrt()
        return self._pool[task]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        s0, jac, present, order = self._features(batch)
        scores = torch.where(present, s0 + jac @ self.b, torch.finfo(s0.dtype).min)
        loss = F.cross_entropy(scores, batch["label"].to(self.device)[order])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(order))
        own = {self.specs[t].name for t in batch["task"].tolist()}
        others = [t for t in self.off_task if t not in own]
        if self.hparams.off_task_weight > 0 and others:
            penalty = sum((self._off_task_rows(t) @ self.b).pow(2).sum() for t in others) / len(others)
            self.log("train/off_task", penalty, batch_size=len(order))
            loss = loss + self.hparams.off_task_weight * penalty
        return loss

    @classmethod
    def from_settings(cls, e, backbone: str, dtype: str, seed: int, export_dir: str) -> TangentExpert:
        """A fresh expert from the pipeline's `expert` settings (`memmcl.settings.ExpertConfig`, resolved); its fixed
        A factor is drawn from the run's seed."""
        return cls(backbone=backbone, dtype=dtype, lora_r=e.lora_r, lora_alpha=e.lora_alpha,
                   target_modules=e.target_modules, a0_seed=seed, lr=e.lr, weight_decay=e.weight_decay,
                   off_task_weight=e.off_task_weight, export_dir=export_dir)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.b], lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        return type(full)((k, v) for k, v in full.items() if k.removeprefix(prefix) == "b")

    def on_fit_end(self) -> None:
        out = self.hparams.export_dir or os.path.join(self.trainer.log_dir or ".", "expert")
        self.save_expert(out)

    @rank_zero_only
    def save_expert(self, out_dir: str | os.PathLike) -> Path:
        """Writes the expert as a peft LoRA adapter (lora_A = A0, lora_B = B) plus expert.yaml marked `kind: tangent`,
        atomically; returns `out_dir`."""
        h = self.hparams
        factors = {name: (a, b.detach()) for name, (a, b) in self.space.factors(self.b).items()}
        meta = {"backbone": h.backbone, "tasks": [s.to_dict() for s in self.specs], "kind": "tangent",
                "kind_settings": {"lora_r": h.lora_r, "lora_alpha": h.lora_alpha, "a0_seed": h.a0_seed}}

        def write(tmp: Path) -> None:
            write_lora_adapter(tmp, factors, self.space.scale, h.backbone)
            (tmp / EXPERT_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))

        out_dir = Path(out_dir)
        atomic_save_dir(out_dir, write, replace=True)
        return out_dir

