"""Rank classification: each label's answer tokens scored by log-likelihood after the prompt; the argmax predicts.

This one module serves validation, test, predict, weak-data mining, merge fitness and the training loss. Sequences
are left-padded so every answer ends at the last position; the LM head runs only over the last `max answer length + 1`
positions (`logits_to_keep`), never over the full sequence × vocabulary.

Shared prefix and packing: the prompts of one batch usually begin with the same tokens (chat template, system
prompt, instruction, a fixed demonstration set). That prefix is encoded once (batch 1); everything after it (each
prompt's own suffix, and the rows that continue a prompt with a multi-token answer) runs in one forward packed into a
single batch row, without padding, positions continuing the prefix. `packed_prefix_attention`, an attention function
registered with transformers' `AttentionInterface`, gathers each sequence's tokens into an attention row, attends
causally over them and over the prefix's keys/values: one GEMM per key/value head over every query against the single
prefix copy, one joint softmax. Neither the prefix nor its heads are ever repeated, and the linear layers see only real
tokens. The result equals encoding every sequence whole (up to float rounding). Label scoring also keeps the last
prefix cache per model for the next batches (a task's batches share it), keyed on the model's state: the address and
version counter of every parameter and buffer, which any in-place update (an optimizer step, a new genome, a folded
merge) or move changes, so a stale cache is never used. Models whose attention does not dispatch through
transformers' attention interface, or that use sliding-window layers, run whole left-padded sequences instead.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# A shared prefix shorter than this is not worth a second forward.
MIN_SHARED_PREFIX = 8


def left_pad(seqs: list[list[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (input_ids, attention_mask) of sequences padded on the left to the longest one."""
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return input_ids.to(device), mask.to(device)


def right_pad(seqs: list[list[int]], pad_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (input_ids, attention_mask) of sequences padded on the right to the longest one."""
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return input_ids.to(device), mask.to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Returns per-sequence positions for a left-padded batch, so padding never shifts a sequence's positions."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


PREFIX_ATTENTION = "memmcl_packed_prefix"


@dataclass
class Packing:
    """Where the attention rows of a packed forward (every sequence's tokens one after another in one batch row,
    no padding) find their tokens. Per group of rows: `queries` [R, Lq] and `keys` [R, Lk] hold packed token indices
    (-1: none), `query_at` [R, Lq] each query's place in its key row (it sees the row's keys up to there); `order`
    takes the groups' queries, concatenated, back to packed order."""

    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    order: torch.Tensor


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
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    outputs = []
    for queries, keys, query_at in packing.groups:
        rows = lambda states, index: states[0][:, index.clamp(min=0)].transpose(0, 1)  # noqa: E731 [R, heads, L, D]
        visible = (keys[:, None, :] >= 0) & (torch.arange(keys.shape[1], device=keys.device) <= query_at[..., None])
        out = _attend(rows(query, queries), rows(key, keys), rows(value, keys), visible, prefix, scale,
                      dropout if module.training else 0.0)
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
    own = own.masked_fill(~visible[:, None, None], float("-inf"))
    if prefix is None:
        weights = F.dropout(own.softmax(-1), p=dropout).to(v.dtype)
        return torch.matmul(weights.view(R, H_kv, g * Lq, Lk), v).view(R, H, Lq, D)
    prefix_keys, prefix_values = prefix
    P = prefix_keys.shape[2]
    q_by_head = q.transpose(0, 1).reshape(H_kv, R * g * Lq, D)
    to_prefix = (torch.bmm(q_by_head, prefix_keys[0].transpose(1, 2)).float() * scale).view(H_kv, R, g, Lq, P)
    top = torch.maximum(own.amax(-1), to_prefix.amax(-1).transpose(0, 1))  # [R, H_kv, g, Lq]
    p_own = (own - top[..., None]).exp()
    p_prefix = (to_prefix - top.transpose(0, 1)[..., None]).exp()
    norm = (p_own.sum(-1) + p_prefix.sum(-1).transpose(0, 1))[..., None]
    p_own = F.dropout(p_own / norm, p=dropout).to(v.dtype)
    p_prefix = F.dropout(p_prefix / norm.transpose(0, 1), p=dropout).to(v.dtype)
    out = torch.matmul(p_own.view(R, H_kv, g * Lq, Lk), v).view(R, H_kv, g, Lq, D)
    from_prefix = torch.bmm(p_prefix.view(H_kv, R * g * Lq, P), prefix_values[0]).view(H_kv, R, g, Lq, D)
    return (out + from_prefix.transpose(0, 1)).reshape(R, H, Lq, D)


AttentionInterface.register(PREFIX_ATTENTION, packed_prefix_attention)


def pack(suffixes: list[list[int]], start: int = 0, continuations: list[tuple[int, list[int]]] = (),
         device="cpu") -> tuple[dict, Packing]:
    """Returns (model inputs, packing) of sequences packed into one batch row without padding.

    `suffixes` are the sequences' tokens after a shared prefix of `start` tokens (positions continue it);
    `continuations` are (sequence, tokens) rows that continue a sequence's last token (one label's answer), packed
    after the suffixes: each sees its sequence and itself, never another continuation.
    """
    lengths = [len(s) for s in suffixes]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    ids = [t for s in suffixes for t in s]
    positions = [start + j for n in lengths for j in range(n)]
    width = max(lengths)
    seq_index = torch.full((len(suffixes), width), -1, dtype=torch.long)
    for i, n in enumerate(lengths):
        seq_index[i, :n] = torch.arange(offsets[i], offsets[i] + n)
    groups = [(seq_index, seq_index, torch.arange(width).expand(len(suffixes), width))]
    owner = [seq_index[seq_index >= 0]]
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
    packing = Packing([tuple(t.to(device) for t in group) for group in groups], order.to(device))
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
def prefix_attention(model):
    """Routes the model's attention through `packed_prefix_attention` for the duration."""
    config = language_model(model).config
    before = config._attn_implementation
    config._attn_implementation = PREFIX_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


@functools.cache
def _cache_argument(model_class: type) -> str | None:
    """Returns the name under which `model_class.forward` takes a key/value cache (transformers >= 5.2x: `cache`),
    None when it only passes keyword arguments on (a wrapper)."""
    parameters = inspect.signature(model_class.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def with_cache(model, cache) -> dict:
    """Returns the keyword argument that hands `cache` to the model's forward, whatever its transformers version;
    wrappers (peft, `MultiLoRAModel`) are looked through to the language model they call."""
    inner = model
    while (name := _cache_argument(type(inner))) is None:
        inner = inner.get_base_model() if hasattr(inner, "get_base_model") else getattr(inner, "model", None)
        if inner is None:
            return {"past_key_values": cache}
    return {name: cache}


def output_cache(out):
    """Returns the key/value cache of a model output (`cache` in transformers >= 5.2x, `past_key_values` before)."""
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def is_checkpointing(model) -> bool:
    """Returns whether activation (gradient) checkpointing is on: it cannot keep a key/value cache."""
    base = language_model(model)
    if base is None:
        return False
    if hasattr(type(base), "is_activation_checkpointing"):
        return bool(base.is_activation_checkpointing)
    return bool(getattr(base, "is_gradient_checkpointing", False))


def shared_prefix_length(seqs: list[list[int]], keep: int = 1) -> int:
    """Returns the length of the longest token prefix common to every sequence, leaving at least `keep` tokens of each."""
    limit = min(map(len, seqs)) - keep
    if len(seqs) < 2 or limit <= 0:
        return 0
    head = torch.tensor([s[:limit] for s in seqs])
    same = (head == head[:1]).all(0)
    return int(same.long().cumprod(0).sum())


# model -> (its state when the prefix was encoded, prefix tokens, the prefix's per-layer keys/values)
_PREFIX_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# A shared prefix: (its length, per layer the batch-1 (keys, values) [1, H_kv, length, D]).
Prefix = tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]


def clear_prefix_caches() -> None:
    """Drops every kept prefix cache (the next batch of each model encodes its prefix again)."""
    _PREFIX_CACHES.clear()


def _model_state(model) -> tuple:
    tensors = [*model.parameters(), *model.buffers()]
    return model.training, tuple((t.data_ptr(), t._version) for t in tensors)


def _layer_keys_values(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def _prefix_cache(model, seqs: list[list[int]], keep: int, device, reuse: bool) -> Prefix | None:
    """Returns the sequences' shared prefix with its keys/values, or None when none is worth it.

    With `reuse`, the model's last prefix cache serves as far as it is shared by every sequence and the model's state
    is unchanged; a batch that shares less of it (a new task) encodes its own prefix, which then becomes the kept one.
    """
    state = _model_state(model) if reuse else None
    kept = _PREFIX_CACHES.get(model) if reuse else None
    if kept is not None and kept[0] == state:
        tokens = kept[1]
        if min(map(len, seqs)) - keep >= len(tokens) and all(tuple(s[: len(tokens)]) == tokens for s in seqs):
            return len(tokens), kept[2]
    length = shared_prefix_length(seqs, keep=keep)
    if length < MIN_SHARED_PREFIX:
        return None
    cache = output_cache(model(input_ids=torch.tensor([seqs[0][:length]], device=device), use_cache=True))
    keys_values = _layer_keys_values(cache)
    if reuse:
        _PREFIX_CACHES[model] = (state, tuple(seqs[0][:length]), keys_values)
    return length, keys_values


def _run(model, seqs: list[list[int]], pad_id: int, device, keep: int,
         continuations: list[tuple[int, list[int]]] = (), share_prefix: bool = True, reuse_prefix: bool = False):
    """Runs the sequences, and `continuations` ((sequence, tokens) rows that continue a sequence), through the model.

    Returns (logits [B, keep, V] at every sequence's last `keep` positions, logits [Σ continuation tokens, V] at every
    continuation token in order, or None without continuations). With `share_prefix` (and a model whose attention can
    be routed) the sequences' common prefix is encoded once and everything else runs packed into one batch row, no
    padding, through `packed_prefix_attention`; otherwise the whole sequences run left-padded, continuations from
    their key/value cache.
    """
    if share_prefix and shares_prefix(model):
        prefix = _prefix_cache(model, seqs, keep, device, reuse_prefix)
        start = 0 if prefix is None else prefix[0]
        inputs, packing = pack([s[start:] for s in seqs], start, continuations, device)
        ends = torch.tensor([len(s) - start for s in seqs]).cumsum(0)
        last = (ends[:, None] - keep + torch.arange(keep)[None]).flatten()
        index = torch.cat([last, torch.arange(int(ends[-1]), inputs["input_ids"].shape[1])]).to(device)
        with prefix_attention(model):
            logits = model(**inputs, logits_to_keep=index, use_cache=False, packing=packing,
                           shared_prefix=None if prefix is None else prefix[1]).logits[0]
        return logits[: last.numel()].view(len(seqs), keep, -1), logits[last.numel() :] if continuations else None
    ids, mask = left_pad(seqs, pad_id, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=keep,
                use_cache=bool(continuations))
    if not continuations:
        return out.logits, None
    rows = torch.tensor([i for i, _ in continuations], device=device)
    cont, cont_mask = right_pad([c for _, c in continuations], pad_id, device)
    cache = output_cache(out)
    cache.batch_select_indices(rows)
    positions = mask.sum(-1)[rows][:, None] + torch.arange(cont.shape[1], device=device)[None]
    logits = model(input_ids=cont, attention_mask=torch.cat([mask[rows], cont_mask], dim=1), position_ids=positions,
                   use_cache=False, **with_cache(model, cache)).logits
    return out.logits, logits[cont_mask.bool()]


def answer_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                share_prefix: bool = True) -> torch.Tensor:
    """Returns the mean cross-entropy over answer tokens (labels != -100) of a left-padded batch.

    With `share_prefix` the batch's common prefix is encoded once (gradients flow through its keys/values).
    Gradient checkpointing cannot keep a cache, so it uses the whole sequences.
    """
    answer_mask = labels != -100
    n_tail = int(answer_mask.sum(-1).max())
    seqs = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask, strict=True)]
    share = share_prefix and not is_checkpointing(model)
    logits, _ = _run(model, seqs, 0, input_ids.device, n_tail + 1, share_prefix=share)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, -n_tail:]
    return F.nll_loss(logp.reshape(-1, logp.shape[-1]), targets.reshape(-1), ignore_index=-100)


@torch.no_grad()
def score_labels(model, prompts: list[list[int]], answers: list[list[list[int]]], pad_id: int, chunk_size: int = 64,
                 share_prefix: bool = True) -> torch.Tensor:
    """Returns [N, max labels] summed log-probabilities of each example's label answers (-inf where a task has fewer labels).

    `answers[i][l]` holds the token ids of label l's answer for example i. The prompt's last position scores every
    label's first token; a longer answer continues the prompt with its tokens but the last, one row per distinct
    continuation (labels that share all but their last token share a row), packed into the same forward as the
    prompts (or, on whole sequences, a second forward from the prompts' key/value cache). The LM head runs only at
    those positions. So each prompt is encoded once however many labels there are. Results do not depend on batch
    size, padding, packing or prefix sharing.
    """
    device = next(model.parameters()).device
    n_labels = max(len(a) for a in answers)
    scores = torch.full((len(prompts), n_labels), float("-inf"))
    for start in range(0, len(prompts), chunk_size):
        stop = min(start + chunk_size, len(prompts))
        scores[start:stop] = _score_chunk(model, prompts[start:stop], answers[start:stop], pad_id, n_labels, device,
                                          share_prefix)
    return scores


def _score_chunk(model, prompts, answers, pad_id: int, n_labels: int, device, share_prefix: bool) -> torch.Tensor:
    # Multi-token answers continue the prompt with all of their tokens but the last; labels whose continuation is
    # the same ("very negative" / "very positive": "very") share one row.
    rows: dict[tuple[int, tuple[int, ...]], int] = {}
    for i, example in enumerate(answers):
        for a in example:
            if len(a) > 1:
                rows.setdefault((i, tuple(a[:-1])), len(rows))
    continuations = [(i, list(c)) for i, c in rows]
    last, later_logits = _run(model, prompts, pad_id, device, keep=1, continuations=continuations,
                              share_prefix=share_prefix, reuse_prefix=share_prefix)
    first = F.log_softmax(last[:, -1].float(), dim=-1)  # [B, V]
    B = len(prompts)
    first_tokens = torch.zeros((B, n_labels), dtype=torch.long)
    present = torch.zeros((B, n_labels), dtype=torch.bool)
    for i, example in enumerate(answers):
        first_tokens[i, : len(example)] = torch.tensor([a[0] for a in example])
        present[i, : len(example)] = True
    result = first.gather(-1, first_tokens.to(device))  # [B, L], on the model's device: only this leaves it
    if rows:
        logp = F.log_softmax(later_logits.float(), dim=-1)  # [continuation tokens, V]
        start = [0]
        for _, c in continuations:
            start.append(start[-1] + len(c))
        # every later answer token: (flat continuation position, token) -> the flat (example, label) it adds to
        position_of, token_of, owner = [], [], []
        for i, example in enumerate(answers):
            for l, a in enumerate(example):
                for j, token in enumerate(a[1:]):
                    position_of.append(start[rows[(i, tuple(a[:-1]))]] + j)
                    token_of.append(token)
                    owner.append(i * n_labels + l)
        later = logp[torch.tensor(position_of, device=device), torch.tensor(token_of, device=device)]
        result = result.flatten().index_add(0, torch.tensor(owner, device=device), later).view(B, n_labels)
    return torch.where(present, result.cpu(), torch.full((B, n_labels), float("-inf")))
