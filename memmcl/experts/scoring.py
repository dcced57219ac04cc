"""Rank classification: each label's answer tokens scored by log-likelihood after the prompt; the argmax predicts.

This one module serves validation, test, predict, weak-data mining, merge fitness and the training loss. Sequences
are left-padded so every answer ends at the last position; the LM head runs only over the last `max answer length + 1`
positions (`logits_to_keep`), never over the full sequence × vocabulary.

Shared prefix and packing: the prompts of one batch usually begin with the same tokens (chat template, system
prompt, instruction, a fixed demonstration set). That prefix is encoded once (batch 1); everything after it (each
prompt's own suffix, and the rows that continue a prompt with a multi-token answer) runs in one forward packed into a
single batch row, without padding, positions continuing the prefix. `packed_prefix_attention`
(`memmcl.experts.packing`), an attention function registered with transformers' `AttentionInterface`, gathers each
sequence's tokens into an attention row, attends causally over them and over the prefix's keys/values: one GEMM per
key/value head over every query against the single prefix copy, one joint softmax. Neither the prefix nor its heads are ever repeated, and the linear layers see only real
tokens. The result equals encoding every sequence whole (up to float rounding). Label scoring also keeps the last
prefix cache per model for the next batches (a task's batches share it), keyed on the model's state: the address and
version counter of every parameter and buffer, which any in-place update (an optimizer step, a new genome, a folded
merge) or move changes, so a stale cache is never used. Models whose attention does not dispatch through
transformers' attention interface, or that use sliding-window layers, run whole left-padded sequences instead.
A 16-bit model's scoring reads each position's highest logits recomputed in float32 (`memmcl.experts.exact_logits`):
bf16's rounding of the logits alone swaps the best two tokens of a position often enough to change predictions.
"""

from __future__ import annotations

import functools
import inspect
import weakref

import torch
import torch.nn.functional as F

from memmcl.experts.exact_logits import exact_top_logits
from memmcl.experts.packing import language_model, pack, prefix_attention, shares_prefix

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


def last_positions(length: int, keep: int, device) -> torch.Tensor:
    """`logits_to_keep` for the last `keep` of `length` positions, as an index tensor. An int makes transformers slice
    the hidden states to a strided [B, keep, d] view, and `F.linear` on that view (batch > 1) makes torch's matmul
    expand the output embedding to [B, d, vocab]: 2-3 s a SmolLM2 batch of 64 in place of 7 ms."""
    return torch.arange(length - keep, length, device=device)


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
        if reuse_prefix:  # the prefix's keys/values, kept for the next batches
            start, shared = _prefix_cache(model, seqs, keep, device, reuse_prefix) or (0, None)
            inputs, packing = pack([s[start:] for s in seqs], start, continuations, device)
        else:  # the prefix runs in the same forward, first in the packed row
            start, shared = shared_prefix_length(seqs, keep=keep), None
            start = start if start >= MIN_SHARED_PREFIX else 0
            inputs, packing = pack([s[start:] for s in seqs], start, continuations, device,
                                   prefix=seqs[0][:start] if start else None)
        ends = packing.in_row_prefix + torch.tensor([len(s) - start for s in seqs]).cumsum(0)
        last = (ends[:, None] - keep + torch.arange(keep)[None]).flatten()
        index = torch.cat([last, torch.arange(int(ends[-1]), inputs["input_ids"].shape[1])]).to(device)
        with prefix_attention(model):
            logits = model(**inputs, logits_to_keep=index, use_cache=False, packing=packing,
                           shared_prefix=shared).logits[0]
        return logits[: last.numel()].view(len(seqs), keep, -1), logits[last.numel() :] if continuations else None
    ids, mask = left_pad(seqs, pad_id, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                logits_to_keep=last_positions(ids.shape[1], keep, device),
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
                 share_prefix: bool = True, reuse_prefix: bool | None = None) -> torch.Tensor:
    """Returns [N, max labels] summed log-probabilities of each example's label answers (-inf where a task has fewer labels).

    `answers[i][l]` holds the token ids of label l's answer for example i. The prompt's last position scores every
    label's first token; a longer answer continues the prompt with its tokens but the last, one row per distinct
    continuation (labels that share all but their last token share a row), packed into the same forward as the
    prompts (or, on whole sequences, a second forward from the prompts' key/value cache). The LM head runs only at
    those positions. So each prompt is encoded once however many labels there are. Results do not depend on batch
    size, padding, packing or prefix sharing. `reuse_prefix` (default: `share_prefix`) keeps a batch's prefix
    keys/values for the next batches; off for forward-mode AD, whose tangents do not outlive their dual level.
    """
    device = next(model.parameters()).device
    n_labels = max(len(a) for a in answers)
    scores = torch.full((len(prompts), n_labels), float("-inf"))
    with exact_top_logits(model):
        for start in range(0, len(prompts), chunk_size):
            stop = min(start + chunk_size, len(prompts))
            scores[start:stop] = score_chunk(model, prompts[start:stop], answers[start:stop], pad_id, n_labels, device,
                                             share_prefix, share_prefix if reuse_prefix is None else reuse_prefix)
    return scores


def continuation_rows(answers: list[list[list[int]]]) -> dict[tuple[int, tuple[int, ...]], int]:
    """Returns {(example, continuation tokens): row} of the rows that continue prompts with multi-token answers.

    A multi-token answer continues its prompt with all of its tokens but the last; labels whose continuation is the
    same ("very negative" / "very positive": "very") share one row. Rows are numbered in example order.
    """
    rows: dict[tuple[int, tuple[int, ...]], int] = {}
    for i, example in enumerate(answers):
        for a in example:
            if len(a) > 1:
                rows.setdefault((i, tuple(a[:-1])), len(rows))
    return rows


def score_chunk(model, prompts, answers, pad_id: int, n_labels: int, device, share_prefix: bool,
                reuse_prefix: bool | None = None) -> torch.Tensor:
    """Returns [B, n_labels] answer log-likelihoods of one chunk of prompts (-inf past an example's labels): the step
    `score_labels` runs per chunk, which `experts.tangent` also calls on whole sequences for per-example gradients."""
    rows = continuation_rows(answers)
    continuations = [(i, list(c)) for i, c in rows]
    last, later_logits = _run(model, prompts, pad_id, device, keep=1, continuations=continuations,
                              share_prefix=share_prefix,
                              reuse_prefix=share_prefix if reuse_prefix is None else reuse_prefix)
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
