"""Rank classification: each label's answer tokens scored by log-likelihood after the prompt; the argmax predicts.

This one module serves validation, test, predict, weak-data mining, merge fitness and the training loss. Sequences
are left-padded so every answer ends at the last position; the LM head runs only over the last `max answer length + 1`
positions (`logits_to_keep`), never over the full sequence × vocabulary.

Shared prefix: the prompts of one batch usually begin with the same tokens (chat template, system prompt,
instruction, a fixed demonstration set). That prefix is encoded once, its key/value cache is repeated over the batch,
and only each sequence's own suffix runs through the model, with positions and attention masks continuing the prefix,
so the result is the same as encoding every sequence whole (up to float rounding). Label scoring also keeps the last
prefix cache per model for the next batches (a task's batches share it), keyed on the model's state: the address
and version counter of every parameter and buffer, which any in-place update (an optimizer step, a new genome, a
folded merge) or move changes, so a stale cache is never used.
"""

from __future__ import annotations

import copy
import functools
import inspect
import weakref

import torch
import torch.nn.functional as F

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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
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


# model -> (its state when the prefix was encoded, prefix tokens, batch-1 key/value cache of the prefix)
_PREFIX_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clear_prefix_caches() -> None:
    """Drops every kept prefix cache (the next batch of each model encodes its prefix again)."""
    _PREFIX_CACHES.clear()


def _model_state(model) -> tuple:
    tensors = [*model.parameters(), *model.buffers()]
    return model.training, tuple((t.data_ptr(), t._version) for t in tensors)


def _prefix_cache(model, seqs: list[list[int]], keep: int, device, reuse: bool):
    """Returns (prefix length, batch-1 cache of the prefix) for the sequences, or (0, None) when none is worth it.

    With `reuse`, the model's last prefix cache serves as far as it is shared by every sequence and the model's state
    is unchanged; a batch that shares less of it (a new task) encodes its own prefix, which then becomes the kept one.
    """
    state = _model_state(model) if reuse else None
    kept = _PREFIX_CACHES.get(model) if reuse else None
    if kept is not None and kept[0] == state:
        tokens = kept[1]
        if min(map(len, seqs)) - keep >= len(tokens) and all(tuple(s[: len(tokens)]) == tokens for s in seqs):
            return len(tokens), kept[2]
    prefix = shared_prefix_length(seqs, keep=keep)
    if prefix < MIN_SHARED_PREFIX:
        return 0, None
    cache = output_cache(model(input_ids=torch.tensor([seqs[0][:prefix]], device=device), use_cache=True))
    if reuse:
        _PREFIX_CACHES[model] = (state, tuple(seqs[0][:prefix]), cache)
    return prefix, cache


def _causal_lm(model, seqs: list[list[int]], pad_id: int, device, logits_to_keep: int, use_cache: bool,
               share_prefix: bool = True, reuse_prefix: bool = False):
    """Runs the sequences through the model, their shared prefix (if any) once; returns (output, full attention mask).

    The mask covers prefix + padded suffixes, so a later forward with the returned cache continues from it; rows end
    at the last column, so `logits_to_keep` positions are every sequence's last ones.
    """
    prefix, prefix_cache = _prefix_cache(model, seqs, logits_to_keep, device, reuse_prefix) if share_prefix else (0, None)
    if prefix_cache is None:
        ids, mask = left_pad(seqs, pad_id, device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=logits_to_keep,
                    use_cache=use_cache)
        return out, mask
    cache = copy.deepcopy(prefix_cache) if reuse_prefix else prefix_cache
    cache.batch_repeat_interleave(len(seqs))
    ids, suffix_mask = left_pad([s[prefix:] for s in seqs], pad_id, device)
    mask = torch.cat([torch.ones((len(seqs), prefix), dtype=suffix_mask.dtype, device=device), suffix_mask], dim=1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=prefix + position_ids(suffix_mask),
                logits_to_keep=logits_to_keep, use_cache=use_cache, **with_cache(model, cache))
    return out, mask


def answer_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                share_prefix: bool = True) -> torch.Tensor:
    """Returns the mean cross-entropy over answer tokens (labels != -100) of a left-padded batch.

    With `share_prefix` the batch's common prefix is encoded once (gradients flow through its repeated cache).
    Gradient checkpointing cannot keep a cache, so it uses the whole sequences.
    """
    answer_mask = labels != -100
    n_tail = int(answer_mask.sum(-1).max())
    seqs = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask, strict=True)]
    share = share_prefix and not is_checkpointing(model)
    out, _ = _causal_lm(model, seqs, 0, input_ids.device, n_tail + 1, use_cache=False, share_prefix=share)
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
    out, mask = _causal_lm(model, prompts, pad_id, device, logits_to_keep=1, use_cache=bool(rows),
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
        positions = mask.sum(-1)[example_of_row][:, None] + torch.arange(width, device=device)[None]
        logits = model(input_ids=cont.to(device), attention_mask=full_mask, position_ids=positions, use_cache=False,
                       **with_cache(model, cache)).logits
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
