"""Rank classification: each label's answer tokens scored by log-likelihood after the prompt; the argmax predicts.

This one module serves validation, test, predict, weak-data mining, merge fitness and the training loss. Sequences
are left-padded so every answer ends at the last position; the LM head runs only over the last `max answer length + 1`
positions (`logits_to_keep`), never over the full sequence × vocabulary.

Shared prefix: the prompts of one batch usually begin with the same tokens (chat template, system prompt,
instruction, a fixed demonstration set). That prefix is encoded once (batch 1) and only each sequence's own suffix
runs through the model, with positions continuing the prefix. The suffix attends to the prefix's keys/values through
`shared_prefix_attention`, an attention function registered with transformers' `AttentionInterface`: one GEMM per
key/value head over every query of the batch against the single prefix copy, and one joint softmax over prefix and
suffix keys. The prefix cache is never repeated over the batch, nor its heads over the query groups. The result equals
encoding every sequence whole (up to float rounding). Label scoring also keeps the last prefix cache per model for
the next batches (a task's batches share it), keyed on the model's state: the address and version counter of every
parameter and buffer, which any in-place update (an optimizer step, a new genome, a folded merge) or move changes, so
a stale cache is never used. Models whose attention does not dispatch through transformers' attention interface, or
that use sliding-window layers, are scored on whole sequences.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Returns per-sequence positions for a left-padded batch, so padding never shifts a sequence's positions."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


PREFIX_ATTENTION = "memmcl_shared_prefix"


def shared_prefix_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            shared_prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None, **kwargs):
    """Attention of a batch of suffixes over one shared prefix plus their own keys, in transformers' attention-function
    form: query [B, H, S, D], key/value [B, H_kv, K, D] (the suffix's own, after the cache update), attention_mask
    None (causal) or [B, 1, S, K] (True/0 where visible); returns ([B, S, H, D], None).

    `shared_prefix[layer] = (keys, values)` [1, H_kv, P, D] of the prefix, visible to every query. Without it, this is
    transformers' SDPA attention.
    """
    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    prefix_keys, prefix_values = shared_prefix[module.layer_idx]
    B, H, S, D = query.shape
    H_kv, K, P = key.shape[1], key.shape[2], prefix_keys.shape[2]
    g = H // H_kv  # query heads per key/value head: head h reads key/value head h // g
    scale = D**-0.5 if scaling is None else scaling
    q = query.reshape(B, H_kv, g, S, D)
    # every query of the batch against the one prefix copy: one [B·g·S, D] x [D, P] GEMM per key/value head
    q_by_head = q.permute(1, 0, 2, 3, 4).reshape(H_kv, B * g * S, D)
    to_prefix = torch.bmm(q_by_head, prefix_keys[0].transpose(1, 2)).view(H_kv, B, g, S, P).float() * scale
    to_own = torch.matmul(q.reshape(B, H_kv, g * S, D), key.transpose(2, 3)).view(B, H_kv, g, S, K).float() * scale
    if attention_mask is None:
        visible = torch.ones((S, K), dtype=torch.bool, device=query.device).tril(K - S)
    else:
        mask = attention_mask[..., :K]
        visible = mask if mask.dtype == torch.bool else mask == 0
    to_own = to_own.masked_fill(~visible.reshape(-1, 1, 1, S, K), float("-inf"))
    top = torch.maximum(to_own.amax(-1), to_prefix.amax(-1).permute(1, 0, 2, 3))  # [B, H_kv, g, S]
    p_own = (to_own - top[..., None]).exp()
    p_prefix = (to_prefix - top.permute(1, 0, 2, 3)[..., None]).exp()
    norm = (p_own.sum(-1) + p_prefix.sum(-1).permute(1, 0, 2, 3))[..., None]
    p_own = F.dropout(p_own / norm, p=dropout, training=module.training).to(value.dtype)
    p_prefix = F.dropout(p_prefix / norm.permute(1, 0, 2, 3, 4), p=dropout, training=module.training)
    out = torch.matmul(p_own.view(B, H_kv, g * S, K), value).view(B, H_kv, g, S, D)
    from_prefix = torch.bmm(p_prefix.to(value.dtype).view(H_kv, B * g * S, P), prefix_values[0])
    out = out + from_prefix.view(H_kv, B, g, S, D).permute(1, 0, 2, 3, 4)
    return out.reshape(B, H, S, D).transpose(1, 2).contiguous(), None


AttentionInterface.register(PREFIX_ATTENTION, shared_prefix_attention)
AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)


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
    """Routes the model's attention through `shared_prefix_attention` for the duration."""
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


def _forward(model, prefix: Prefix | None, **inputs):
    """Runs the model on `inputs`; after a shared prefix, through `shared_prefix_attention`."""
    if prefix is None:
        return model(**inputs)
    with prefix_attention(model):
        return model(**inputs, shared_prefix=prefix[1])


def _causal_lm(model, seqs: list[list[int]], pad_id: int, device, logits_to_keep: int, use_cache: bool,
               share_prefix: bool = True, reuse_prefix: bool = False):
    """Runs the sequences through the model, their shared prefix (if any) once.

    Returns (output, attention mask of the tokens the output covers, the shared prefix or None). Without a shared
    prefix the output covers the whole left-padded sequences; with one, only their left-padded suffixes (positions
    continue the prefix). Rows end at the last column, so `logits_to_keep` positions are every sequence's last ones;
    a later forward with `_forward(model, prefix, ...)` and the output's cache continues from it.
    """
    share = share_prefix and shares_prefix(model)
    prefix = _prefix_cache(model, seqs, logits_to_keep, device, reuse_prefix) if share else None
    start = 0 if prefix is None else prefix[0]
    ids, mask = left_pad([s[start:] for s in seqs], pad_id, device)
    out = _forward(model, prefix, input_ids=ids, attention_mask=mask, position_ids=start + position_ids(mask),
                   logits_to_keep=logits_to_keep, use_cache=use_cache)
    return out, mask, prefix


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
    out, _, _ = _causal_lm(model, seqs, 0, input_ids.device, n_tail + 1, use_cache=False, share_prefix=share)
    logp = F.log_softmax(out.logits[:, :-1].float(), dim=-1)
    targets = labels[:, -n_tail:]
    return F.nll_loss(logp.reshape(-1, logp.shape[-1]), targets.reshape(-1), ignore_index=-100)


@torch.no_grad()
def score_labels(model, prompts: list[list[int]], answers: list[list[list[int]]], pad_id: int, chunk_size: int = 64,
                 share_prefix: bool = True) -> torch.Tensor:
    """Returns [N, max labels] summed log-probabilities of each example's label answers (-inf where a task has fewer labels).

    `answers[i][l]` holds the token ids of label l's answer for example i. One forward over the prompts (their shared
    prefix once, LM head at the last position only) scores every label's first token; when some answer has more
    tokens, that forward keeps its key/value cache, which is selected once per distinct continuation (labels that
    share all but their last token share a row), and one short forward over the continuations scores the rest. So
    each prompt is encoded once however many labels there are. Results do not depend on batch size, padding or prefix
    sharing.
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
    # Multi-token answers continue from the prompt cache with all of their tokens but the last; labels whose
    # continuation is the same ("very negative" / "very positive": "very") share one row.
    rows: dict[tuple[int, tuple[int, ...]], int] = {}
    for i, example in enumerate(answers):
        for a in example:
            if len(a) > 1:
                rows.setdefault((i, tuple(a[:-1])), len(rows))
    out, mask, prefix = _causal_lm(model, prompts, pad_id, device, logits_to_keep=1, use_cache=bool(rows),
                                   share_prefix=share_prefix, reuse_prefix=share_prefix)
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
    B = len(prompts)
    first_tokens = torch.zeros((B, n_labels), dtype=torch.long)
    present = torch.zeros((B, n_labels), dtype=torch.bool)
    for i, example in enumerate(answers):
        first_tokens[i, : len(example)] = torch.tensor([a[0] for a in example])
        present[i, : len(example)] = True
    result = first.gather(-1, first_tokens.to(device))  # [B, L], on the model's device: only this leaves it
    if rows:
        example_of_row = torch.tensor([i for i, _ in rows], device=device)
        continuations = [list(c) for _, c in rows]
        width = max(map(len, continuations))
        cont = torch.full((len(rows), width), pad_id, dtype=torch.long)
        cont_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, c in enumerate(continuations):
            cont[r, : len(c)] = torch.tensor(c)
            cont_mask[r, : len(c)] = 1
        cache = output_cache(out)
        cache.batch_select_indices(example_of_row)
        full_mask = torch.cat([mask[example_of_row], cont_mask.to(device)], dim=1)
        start = 0 if prefix is None else prefix[0]
        positions = start + mask.sum(-1)[example_of_row][:, None] + torch.arange(width, device=device)[None]
        logits = _forward(model, prefix, input_ids=cont.to(device), attention_mask=full_mask, position_ids=positions,
                          use_cache=False, **with_cache(model, cache)).logits
        logp = F.log_softmax(logits.float(), dim=-1)  # [rows, width, V]
        # every later answer token: (row, position, token) -> the flat (example, label) whose score it adds to
        row_of, position_of, token_of, owner = [], [], [], []
        for i, example in enumerate(answers):
            for l, a in enumerate(example):
                for j, token in enumerate(a[1:]):
                    row_of.append(rows[(i, tuple(a[:-1]))])
                    position_of.append(j)
                    token_of.append(token)
                    owner.append(i * n_labels + l)
        later = logp[torch.tensor(row_of, device=device), torch.tensor(position_of, device=device),
                     torch.tensor(token_of, device=device)]
        result = result.flatten().index_add(0, torch.tensor(owner, device=device), later).view(B, n_labels)
    return torch.where(present, result.cpu(), torch.full((B, n_labels), float("-inf")))
