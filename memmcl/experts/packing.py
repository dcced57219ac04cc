"""Packed attention after a shared prefix: the sequences that follow a common token prefix run in one batch row
without padding, each attending causally over its own tokens and over one copy of the prefix's keys/values.

`packed_prefix_attention` is registered with transformers' attention interface under `PREFIX_ATTENTION`; `pack`
builds a forward's packed inputs and the `Packing` that tells the attention function where each sequence's tokens
are; `prefix_attention` routes a model's attention through it for the duration of a forward. `memmcl.experts.scoring`
uses these for label scoring and the training loss. `decode_attention` (under `DECODE_ATTENTION`, routed by
`routed_attention`) is one new token per row over its key/value cache: greedy generation's decoding steps.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PREFIX_ATTENTION = "memmcl_packed_prefix"
DECODE_ATTENTION = "memmcl_decode"


@dataclass
class Packing:
    """Where the attention rows of a packed forward (every sequence's tokens one after another in one batch row,
    no padding) find their tokens. Per group of rows: `queries` [R, Lq] and `keys` [R, Lk] hold packed token indices
    (-1: none), `query_at` [R, Lq] each query's place in its key row (it sees the row's keys up to there); `order`
    takes the groups' queries, concatenated, back to packed order. `in_row_prefix`: the row begins with that many
    prefix tokens, the first group (causal among themselves); every other group also reads their keys/values."""

    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    order: torch.Tensor
    in_row_prefix: int = 0


def packed_prefix_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            packing: Packing | None = None,
                            shared_prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None, **kwargs):
    """Attention of packed sequences after an optional shared prefix, in transformers' attention-function form:
    query [1, H, N, D], key/value [1, H_kv, N, D] of N packed tokens; returns ([1, N, H, D], None).

    Each row of `packing` attends causally over its own keys and over every key of the shared prefix
    (`shared_prefix[layer] = (keys, values)` [1, H_kv, P, D], encoded once). Without `packing`, this is
    transformers' SDPA attention.
    """
    if packing is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    prefix = None if shared_prefix is None else shared_prefix[module.layer_idx]
    if n := packing.in_row_prefix:  # read as one copy, like a shared prefix: its gradient is a slice's, not a sum
        prefix = (key[:, :, :n], value[:, :, :n])  # over gathered copies (whose order would depend on threads)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    outputs = []
    for g, (queries, keys, query_at) in enumerate(packing.groups):
        rows = lambda states, index: states[0][:, index.clamp(min=0)].transpose(0, 1)  # noqa: E731 [R, heads, L, D]
        visible = (keys[:, None, :] >= 0) & (torch.arange(keys.shape[1], device=keys.device) <= query_at[..., None])
        out = _attend(rows(query, queries), rows(key, keys), rows(value, keys), visible,
                      None if packing.in_row_prefix and g == 0 else prefix, scale, dropout if module.training else 0.0)
        outputs.append(out.transpose(1, 2)[queries >= 0])  # [queries of the group, H, D]
    return torch.cat(outputs)[packing.order][None], None


def _attend(q, k, v, visible, prefix, scale: float, dropout: float) -> torch.Tensor:
    """Returns softmax attention [R, H, Lq, D] of q [R, H, Lq, D] over each row's own k/v [R, H_kv, Lk, D] where
    `visible` [R, Lq, Lk], and over the shared prefix's (keys, values) [1, H_kv, P, D] (None: no prefix) everywhere.
    The prefix is read as one copy: one GEMM per key/value head over every query of every row."""
    R, H, Lq, D = q.shape
    H_kv, Lk = k.shape[1], k.shape[2]
    g = H // H_kv  # query heads per key/value head: head h reads key/value head h // g
    q = q.reshape(R, H_kv, g * Lq, D)
    own = (torch.matmul(q, k.transpose(2, 3)).float() * scale).view(R, H_kv, g, Lq, Lk)
    own = own.masked_fill_(~visible[:, None, None], float("-inf"))
    if prefix is None:
        weights = F.dropout(own.softmax(-1), p=dropout).to(v.dtype)
        return torch.matmul(weights.view(R, H_kv, g * Lq, Lk), v).view(R, H, Lq, D)
    prefix_keys, prefix_values = prefix
    P = prefix_keys.shape[2]
    q_by_head = q.transpose(0, 1).reshape(H_kv, R * g * Lq, D)
    to_prefix = (torch.bmm(q_by_head, prefix_keys[0].transpose(1, 2)).float() * scale).view(H_kv, R, g, Lq, P)
    with torch.no_grad():  # a shift the softmax does not depend on: no gradient, and the logits can change in place
        top = torch.maximum(own.amax(-1), to_prefix.amax(-1).transpose(0, 1))  # [R, H_kv, g, Lq]
    p_own = own.sub_(top[..., None]).exp_()
    p_prefix = to_prefix.sub_(top.transpose(0, 1)[..., None]).exp_()
    norm = p_own.sum(-1) + p_prefix.sum(-1).transpose(0, 1)  # [R, H_kv, g, Lq]
    # Normalised after the value products: a division over [.., D] outputs instead of over every key's weight.
    p_own = F.dropout(p_own, p=dropout).to(v.dtype)
    p_prefix = F.dropout(p_prefix, p=dropout).to(v.dtype)
    out = torch.matmul(p_own.view(R, H_kv, g * Lq, Lk), v).view(R, H_kv, g, Lq, D)
    from_prefix = torch.bmm(p_prefix.view(H_kv, R * g * Lq, P), prefix_values[0]).view(H_kv, R, g, Lq, D)
    return ((out + from_prefix.transpose(0, 1)).float() / norm[..., None]).to(v.dtype).reshape(R, H, Lq, D)


AttentionInterface.register(PREFIX_ATTENTION, packed_prefix_attention)


def decode_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs):
    """One query per row over its keys/values, in transformers' attention-function form: query [B, H, 1, D],
    key/value [B, H_kv, L, D], `attention_mask` a boolean [B, 1, 1, L] (True: visible) or None; returns
    ([B, 1, H, D], None). Two small GEMMs per key/value head and a float32 softmax: at one query CPU SDPA's flash
    kernel takes ten times as long (docs/benchmarks.md, "Decoding steps")."""
    B, H, Lq, D = query.shape
    if Lq != 1:
        raise ValueError(f"decode_attention: one query per row, got {Lq}")
    H_kv = key.shape[1]
    scale = D**-0.5 if scaling is None else scaling
    scores = torch.matmul(query.reshape(B, H_kv, H // H_kv, D), key.transpose(2, 3)).float() * scale  # [B, H_kv, g, L]
    if attention_mask is not None:
        scores = scores.masked_fill_(~attention_mask, float("-inf"))
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # [B, H_kv, g, D]: head h reads key/value h // g
    return out.reshape(B, 1, H, D), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention)


def pack(suffixes: list[list[int]], start: int = 0, continuations: list[tuple[int, list[int]]] = (),
         device="cpu", prefix: list[int] | None = None) -> tuple[dict, Packing]:
    """Returns (model inputs, packing) of sequences packed into one batch row without padding.

    `suffixes` are the sequences' tokens after a shared prefix of `start` tokens (positions continue it);
    `continuations` are (sequence, tokens) rows that continue a sequence's last token (one label's answer), packed
    after the suffixes: each sees its sequence and itself, never another continuation. With `prefix` (the `start`
    prefix tokens themselves) the prefix runs first in the same row, causally, and every row also reads its
    keys/values there: one forward instead of a prefix forward and a packed one (`shared_prefix` is then None).
    """
    n_prefix = len(prefix) if prefix is not None else 0
    if prefix is not None and n_prefix != start:
        raise ValueError(f"pack: a prefix of {n_prefix} tokens for suffixes starting at position {start}")
    lengths = [len(s) for s in suffixes]
    offsets = [n_prefix]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    ids = [*(prefix or ()), *(t for s in suffixes for t in s)]
    positions = [*range(n_prefix), *(start + j for n in lengths for j in range(n))]
    width = max(lengths)
    seq_index = torch.full((len(suffixes), width), -1, dtype=torch.long)
    for i, n in enumerate(lengths):
        seq_index[i, :n] = torch.arange(offsets[i], offsets[i] + n)
    groups = [(seq_index, seq_index, torch.arange(width).expand(len(suffixes), width))]
    owner = [seq_index[seq_index >= 0]]
    if prefix is not None:
        steps = torch.arange(n_prefix)[None]
        groups.insert(0, (steps, steps, steps))
        owner.insert(0, steps[0])
    if continuations:
        cont_width = max(len(c) for _, c in continuations)
        queries = torch.full((len(continuations), cont_width), -1, dtype=torch.long)
        keys = torch.full((len(continuations), width + cont_width), -1, dtype=torch.long)
        query_at = torch.full((len(continuations), cont_width), width + cont_width - 1, dtype=torch.long)
        for r, (i, tokens) in enumerate(continuations):
            first = len(ids)
            ids += tokens
            positions += [start + lengths[i] + j for j in range(len(tokens))]
            keys[r, : lengths[i]] = seq_index[i, : lengths[i]]
            keys[r, lengths[i] : lengths[i] + len(tokens)] = queries[r, : len(tokens)] = torch.arange(first, first + len(tokens))
            query_at[r, : len(tokens)] = torch.arange(lengths[i], lengths[i] + len(tokens))
        groups.append((queries, keys, query_at))
        owner.append(queries[queries >= 0])
    order = torch.empty(len(ids), dtype=torch.long)
    order[torch.cat(owner)] = torch.arange(len(ids))
    inputs = {"input_ids": torch.tensor([ids], device=device), "position_ids": torch.tensor([positions], device=device)}
    packing = Packing([tuple(t.to(device) for t in group) for group in groups], order.to(device), n_prefix)
    return inputs, packing


def language_model(model):
    """Returns the transformers model inside wrappers (peft, `MultiLoRAModel`), or None where there is none."""
    inner = model
    while not isinstance(inner, PreTrainedModel):
        inner = inner.get_base_model() if hasattr(inner, "get_base_model") else getattr(inner, "model", None)
        if inner is None:
            return None
    return inner


def shares_prefix(model) -> bool:
    """Returns whether the model's attention can read a shared prefix: it dispatches through transformers'
    attention interface and has no sliding-window layers."""
    inner = language_model(model)
    if inner is None or not getattr(type(inner), "_supports_attention_backend", False):
        return False
    config = inner.config
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return False
    return not (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True))


@contextlib.contextmanager
def routed_attention(model, name: str):
    """Routes the model's attention through the attention function registered as `name` for the duration. Such a
    function gets no mask transformers built: a forward passes its own (or none)."""
    config = language_model(model).config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def prefix_attention(model):
    """Routes the model's attention through `packed_prefix_attention` for the duration."""
    return routed_attention(model, PREFIX_ATTENTION)
