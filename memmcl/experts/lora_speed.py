"""How a peft LoRA layer runs in training: the same function as peft's `lora.Linear`, with less work a step.

- `set_input_casting`: under autocast the LoRA input is not copied to the float32 LoRA weights' dtype first.
- `fuse_lora_forward`: the LoRA product and its scaling go into the base output in one `addmm`, with the scaling folded
  into the small B matrix, instead of a product, a scaling and an addition over the whole [tokens, out] output; the
  dropout mask is drawn by `MaskDropout`.
Measured on a SmolLM2-135M LoRA step (r=8 on all seven projections): docs/benchmarks.md, "LoRA layer".
"""

from __future__ import annotations

import types

import torch
from torch import nn


def set_input_casting(model: nn.Module, enabled: bool) -> None:
    """Sets whether peft casts each LoRA layer's input to its LoRA weights' dtype. Under mixed precision (autocast)
    every matmul casts its operands itself, so the cast of a bfloat16 input to the float32 LoRA weights is a copy (and
    a float32 dropout) that autocast casts straight back: 4% of a bf16-mixed SmolLM2 LoRA step on a quiet machine, 13%
    on a loaded one (docs/benchmarks.md)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled


class MaskDropout(nn.Dropout):
    """`nn.Dropout` with its keep mask drawn from 16 random bits an element, four to one 64-bit draw of torch's
    generator (seeded as any torch randomness), instead of `bernoulli_`'s uniform double an element: a third of the
    time on a CPU. The drop probability is `p` rounded to a multiple of 1/65536; the kept values are scaled by
    1/(1-p) in the input's dtype, as torch's CPU dropout does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * 0
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= round(self.p * 65536) - 32768
        return x * keep.to(x.dtype).div_(1 - self.p)


def fuse_lora_forward(model: nn.Module) -> int:
    """Routes every peft `lora.Linear` of `model` through `_fused_forward` and its dropout through `MaskDropout`;
    returns how many layers. A layer in a state the fused path does not cover (adapters disabled or merged, several
    active adapters, DoRA or another variant, per-row adapter names) runs peft's own forward."""
    from peft.tuners.lora.layer import Linear

    layers = 0
    for module in model.modules():
        if type(module) is Linear:  # the exact class: quantized and other subclasses keep their own forward
            module.forward = types.MethodType(_fused_forward, module)
            for name, dropout in module.lora_dropout.items():
                if type(dropout) is nn.Dropout:
                    module.lora_dropout[name] = MaskDropout(dropout.p)
            layers += 1
    return layers


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = [a for a in self.active_adapters if a in self.lora_A]
    if args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] in self.lora_variant:
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    result = self.base_layer(x)
    x = self._cast_input_dtype(x, self.lora_A[name].weight.dtype)
    hidden = self.lora_A[name](self.lora_dropout[name](x))
    up = self.lora_B[name].weight * self.scaling[name]
    if not (torch.is_autocast_enabled(x.device.type) or result.dtype == hidden.dtype == up.dtype):
        return (result + hidden @ up.t()).to(result.dtype)
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), up.t())
    return flat.view(result.shape).to(result.dtype)
