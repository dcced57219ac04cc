"""Float32 top logits for a 16-bit model: bf16 rounds a logit near SmolLM2's 20-30 to a step of 1/8, so the best two
tokens of a position tie or swap far more often than the hidden state's own rounding makes them. Label scoring and
greedy decoding (`memmcl.experts.scoring`, `memmcl.experts.generation`) read logits under `exact_top_logits`."""

from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD

from memmcl.experts.packing import language_model

# Under `exact_top_logits`, how many of each position's highest 16-bit logits are recomputed in float32.
EXACT_CANDIDATES = 16


def _exact_top_logits(head, args, logits):
    """Forward hook of the output embedding: 16-bit logits come back as float32, their `EXACT_CANDIDATES` highest per
    position recomputed in float32 from the same hidden state and weights (the rest keep their 16-bit values)."""
    if logits.dtype not in (torch.bfloat16, torch.float16) or logits.requires_grad \
            or fwAD.unpack_dual(logits).tangent is not None:  # gradients, tangents: left as the model made them
        return None
    hidden = args[0]
    index = logits.topk(min(EXACT_CANDIDATES, logits.shape[-1]), dim=-1).indices  # [..., k]
    with torch.autocast(hidden.device.type, enabled=False):
        exact = (head.weight[index].float() @ hidden.float().unsqueeze(-1)).squeeze(-1)
        if head.bias is not None:
            exact = exact + head.bias[index].float()
    return logits.float().scatter_(-1, index, exact)


@contextlib.contextmanager
def exact_top_logits(model):
    """Within, the model's 16-bit logits come back as float32 with each position's highest `EXACT_CANDIDATES`
    exact. The token that is highest in float32 arithmetic on the bf16 hidden state is always among the bf16 logits
    within one rounding step of the highest, which the candidates hold unless more than `EXACT_CANDIDATES` are.
    Float32 logits and output embeddings other than a plain linear layer are left alone."""
    inner = language_model(model)
    head = inner.get_output_embeddings() if inner is not None else None
    handle = head.register_forward_hook(_exact_top_logits) if isinstance(head, torch.nn.Linear) else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
