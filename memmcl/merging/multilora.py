"""Exact multi-LoRA merging by rescaling factors: W = W0 + Σ_t c_t · scale_t · B_t A_t.

Every expert stays a pair of LoRA factors. Per target module the experts' factors are concatenated along the rank
(A [R, in], B [out, R], R = Σ_t r_t) and one flat coefficient vector holds, for each rank column, the genome's
weight of the column's expert (in the column's layer block) times that expert's LoRA scaling. So

    y = W0 x + B · diag(coef) · A x  =  (W0 + Σ_t c_t scale_t B_t A_t) x

exactly: no cross terms between experts, no SVD, no weight rebuild. Setting a genome writes the flat coefficient
vector with one gather and one multiply (microseconds). `fold=True` instead writes W0 + B diag(coef) A into the
weights once per genome (one rank-R GEMM per module), after which the forward costs exactly the base model's.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from memmcl.experts.expert_io import ADAPTER_WEIGHTS, write_lora_adapter  # noqa: F401  (ADAPTER_WEIGHTS re-exported)
from memmcl.merging.factors import (  # noqa: F401  (coefficients_* and read_lora_factors re-exported)
    LoRAFactors,
    MergeError,
    coefficients_from_yaml,
    coefficients_to_yaml,
    read_lora_factors,
)
from memmcl.merging.methods import MergeMethod, merge_deltas, method_info

# Re-exported for modules that still import them from here: merging/search.py (MergeError, coefficients_from_yaml,
# coefficients_to_yaml, read_lora_factors) and pipeline.py (ADAPTER_WEIGHTS). New code imports them from
# memmcl.merging.factors and memmcl.experts.expert_io.

_LAYER = re.compile(r"\.layers\.(\d+)\.")


class MultiLoRALinear(nn.Module):
    """A frozen linear layer plus the concatenated factors of every expert that targets it."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, owner: MultiLoRAModel, offset: int):
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", a.to(base.weight), persistent=False)
        self.register_buffer("lora_b", b.to(base.weight), persistent=False)
        self.offset, self.rank = offset, a.shape[0]
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle)
        self.register_buffer("w0", None, persistent=False)
        self._scaled_b, self._scaled_key = None, None  # see scaled_b
        self.calls = 0  # forwards since `MultiLoRAModel.per_example_coefficients` began (1: the continuation rows)

    def coef(self) -> torch.Tensor:
        return self._owner[0].coef[self.offset : self.offset + self.rank]

    def delta(self) -> torch.Tensor:
        """Returns B · diag(coef) · A, this module's merged weight delta for the current genome."""
        return (self.lora_b * self.coef().to(self.lora_b)) @ self.lora_a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        owner = self._owner[0]
        if owner.per_example is not None:  # per-example coefficients (rows of continuations follow their example)
            coef, continued = owner.per_example
            coef = coef[:, self.offset : self.offset + self.rank]
            if self.calls > 0:
                coef = coef[continued]
            self.calls += 1
            return y + ((x @ self.lora_a.T) * coef[:, None, :].to(x)) @ self.lora_b.T
        if owner.tangent:  # the first-order model: the merged delta moves only the tangent, W0 ẋ + ΔW x
            if not owner.dual:
                raise MergeError("tangent experts are scored in the tangent model: run them through MultiLoRAModel.tangent_pass")
            x = fwAD.unpack_dual(x).primal
            delta = ((x @ self.lora_a.T) * self.coef().to(x)) @ self.lora_b.T
            return y + fwAD.make_dual(torch.zeros_like(delta), delta)
        if owner.folded:
            return y
        # the factors have the base weight's dtype, so y and B·diag(coef) share theirs (or autocast casts both)
        flat = torch.addmm(y.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]) @ self.lora_a.T, self.scaled_b().T)
        return flat.view(y.shape)

    def scaled_b(self) -> torch.Tensor:
        """Returns B · diag(coef), kept until the genome changes: the forward is then two GEMMs, the second adding
        into the base output (`addmm`), instead of four operations over the activations."""
        coef = self._owner[0].coef
        if coef.requires_grad:
            return self.lora_b * self.coef().to(self.lora_b)
        key = (coef.data_ptr(), coef._version, self.lora_b.data_ptr(), self.lora_b._version)
        if self._scaled_key != key:
            self._scaled_b, self._scaled_key = (self.lora_b.float() * self.coef()).to(self.lora_b), key
        return self._scaled_b


class MultiLoRAModel(nn.Module):
    """A frozen causal LM with T LoRA experts as factors; `set_genome` picks the merge.

    Args:
        model: the base causal LM (its target linear layers are wrapped in place).
        experts: the experts' factors (same base model).
        n_blocks: layer blocks per expert in a genome (1: one weight per expert; L: one per expert and layer).
    """

    def __init__(self, model: nn.Module, experts: list[LoRAFactors], n_blocks: int = 1):
        super().__init__()
        if not experts:
            raise MergeError("no experts to merge")
        names = [e.name for e in experts]
        if len(set(names)) != len(names):
            raise MergeError(f"two experts share a name: {names}")
        self.model = model.requires_grad_(False).eval()
        self.expert_names, self.n_blocks = names, n_blocks
        self.folded, self.method, self.density, self.method_seed = False, "linear", 0.5, 0
        # tangent experts (`memmcl.experts.tangent`): scored in the base model's first-order expansion, in a dual pass
        self.tangent, self.dual = False, False
        self.per_example: tuple[torch.Tensor, torch.Tensor] | None = None  # see per_example_coefficients
        modules = dict(model.named_modules())
        n_layers = 1 + max((int(m.group(1)) for n in modules if (m := _LAYER.search(n + "."))), default=0)
        if not 1 <= n_blocks <= n_layers:
            raise MergeError(f"n_blocks={n_blocks}: expected between 1 and the model's {n_layers} layers")
        targets = sorted({n for e in experts for n in e.modules})
        flat_block_expert, flat_scale, offset = [], [], 0
        self.wrapped: dict[str, MultiLoRALinear] = {}
        self.module_block: dict[str, int] = {}
        self.module_experts: dict[str, list[int]] = {}
        for name in targets:
            base = modules.get(name)
            if not isinstance(base, nn.Linear):
                raise MergeError(f"expert module '{name}' is not a linear layer of the base model; wrong backbone?")
            layer = _LAYER.search(name + ".")
            block = (int(layer.group(1)) * n_blocks // n_layers) if layer else 0
            a_parts, b_parts, users = [], [], []
            for t, e in enumerate(experts):
                if name not in e.modules:
                    continue
                a, b, scale = e.modules[name]
                if a.shape[1] != base.in_features or b.shape[0] != base.out_features or a.shape[0] != b.shape[1]:
                    raise MergeError(f"expert '{e.name}', module '{name}': factor shapes {tuple(a.shape)}/{tuple(b.shape)} "
                                     f"do not fit a {base.in_features}->{base.out_features} layer; wrong backbone?")
                a_parts.append(a), b_parts.append(b), users.append(t)
                flat_block_expert += [block * len(experts) + t] * a.shape[0]
                flat_scale += [scale] * a.shape[0]
            wrapper = MultiLoRALinear(base, torch.cat(a_parts), torch.cat(b_parts, dim=1), self, offset)
            offset += wrapper.rank
            parent, _, child = name.rpartition(".")
            setattr(modules[parent] if parent else model, child, wrapper)
            self.wrapped[name], self.module_block[name], self.module_experts[name] = wrapper, block, users
        self.register_buffer("index", torch.tensor(flat_block_expert, dtype=torch.long), persistent=False)
        self.register_buffer("scale", torch.tensor(flat_scale, dtype=torch.float32), persistent=False)
        self.register_buffer("coef", torch.zeros(offset, dtype=torch.float32), persistent=False)
        self.register_buffer("genome", torch.zeros(n_blocks, len(experts)), persistent=False)

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def as_blocks(self, genome) -> torch.Tensor:
        """Returns a genome as a [n_blocks, T] coefficient matrix (a [T] genome is shared by every block)."""
        g = torch.as_tensor(genome, dtype=torch.float32).to(self.coef.device)
        if g.dim() == 1:
            g = g.expand(self.n_blocks, -1)
        if tuple(g.shape) != (self.n_blocks, self.n_experts):
            raise MergeError(f"genome of shape {tuple(g.shape)}: expected ({self.n_experts},) or "
                             f"({self.n_blocks}, {self.n_experts}) for experts {self.expert_names}")
        return g

    def tangent_pass(self, score) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (value, tangent) of `score()` (a function of this model's outputs) at the base model, the tangent
        along the current merge's delta, by forward-mode AD: the tangent model's output is value + tangent."""
        with torch.inference_mode(False), fwAD.dual_level():  # inference mode (validate, test) drops tangents
            self.dual = True
            try:
                out = fwAD.unpack_dual(score())
            finally:
                self.dual = False
        return out.primal, out.tangent if out.tangent is not None else torch.zeros_like(out.primal)

    @contextlib.contextmanager
    def per_example_coefficients(self, coef: torch.Tensor, continued: torch.Tensor):
        """Within: example i of a forward over whole sequences runs with its own coefficient vector `coef[i]`
        ([N, ranks], the layout of `self.coef`), the genome aside; in a second forward (continuation rows of
        multi-token answers) row j runs with `coef[continued[j]]`. For reverse-mode derivatives in the coefficients."""
        self.per_example = (coef, continued)
        for m in self.wrapped.values():
            m.calls = 0
        try:
            yield
        finally:
            self.per_example = None

    @torch.no_grad()
    def set_genome(self, genome, fold: bool = False, method: MergeMethod = "linear", density: float = 0.5, seed: int = 0) -> None:
        """Sets the merge coefficients: a [T] vector or a [n_blocks, T] matrix of expert weights.

        `linear` without `fold` only rewrites the coefficient vector. `fold` writes the merged weights into the layers
        (same result, base-model forward cost). TIES / DARE need materialized deltas, so they always fold.
        """
        g = self.as_blocks(genome)
        self.genome.copy_(g)
        torch.mul(g.flatten()[self.index], self.scale, out=self.coef)
        info = method_info(method)
        self.method, self.density, self.method_seed = method, density, seed
        fold = fold or info.folds
        if fold:
            for name, m in self.wrapped.items():
                if m.w0 is None:
                    m.w0 = m.base.weight.detach().clone()
                if info.folds:
                    torch.add(m.w0, self.merged_delta(name), out=m.base.weight)
                else:  # linear: W0 + (B · diag(coef)) A in one pass over the weight
                    torch.addmm(m.w0, m.lora_b * m.coef().to(m.lora_b), m.lora_a, out=m.base.weight)
        elif self.folded:
            for m in self.wrapped.values():
                m.base.weight.copy_(m.w0)
        self.folded = fold

    def expert_deltas(self, name: str) -> torch.Tensor:
        """Returns the stack [T_m, out, in] of scale_t · B_t A_t of the experts that target module `name`."""
        m = self.wrapped[name]
        parts, start = [], 0
        for t in self.module_experts[name]:
            cols = slice(start, start + int((self.index[m.offset : m.offset + m.rank] % self.n_experts == t).sum()))
            s = self.scale[m.offset + cols.start : m.offset + cols.stop]
            parts.append((m.lora_b[:, cols] * s.to(m.lora_b)) @ m.lora_a[cols])
            start = cols.stop
        return torch.stack(parts)

    def merged_delta(self, name: str) -> torch.Tensor:
        """Returns module `name`'s merged weight delta under the current genome and merge method."""
        m = self.wrapped[name]
        if not method_info(self.method).folds:  # linear: straight from the rescaled factors
            return m.delta()
        weights = self.genome[self.module_block[name], self.module_experts[name]]
        generator = torch.Generator(device=m.lora_a.device).manual_seed(self.method_seed + m.offset)
        return merge_deltas(self.method, self.expert_deltas(name), weights, self.density, generator)

    @torch.no_grad()
    def save_adapter(self, out_dir: str | Path, base_name_or_path: str = "") -> Path:
        """Writes the current linear merge as one peft LoRA adapter, ranks concatenated (exact): scaling 1 and
        B's columns pre-multiplied by their coefficients. Other methods have no low-rank form: use `save_model`."""
        if not method_info(self.method).low_rank_export:
            raise MergeError(f"merge method '{self.method}' has no exact low-rank form; export it with save_model")
        factors = {name: (m.lora_a, m.lora_b * m.coef().to(m.lora_b)) for name, m in self.wrapped.items()}
        return write_lora_adapter(out_dir, factors, 1.0, base_name_or_path)

    @torch.no_grad()
    def save_model(self, out_dir: str | Path, tokenizer=None) -> Path:
        """Writes the merged model (W0 + merged deltas in the weights) as a plain HF checkpoint."""
        import copy

        was_folded = self.folded
        self.set_genome(self.genome, fold=True, method=self.method, density=self.density, seed=self.method_seed)
        plain = copy.deepcopy(self.model)
        for name in self.wrapped:
            parent, _, child = name.rpartition(".")
            holder = plain.get_submodule(parent) if parent else plain
            setattr(holder, child, getattr(holder, child).base)
        plain.save_pretrained(str(out_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
        if not was_folded and not method_info(self.method).folds:
            self.set_genome(self.genome)
        return Path(out_dir)
