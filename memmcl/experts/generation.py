"""Batched greedy decoding for extraction tasks: the shared prompt prefix encoded once, a key/value cache, rows that
finish dropped from the batch.

The prompts of a chunk share a prefix (chat template, instruction, a fixed demonstration set); it runs once at batch
1 and its keys/values are repeated for every row. Each row's own suffix follows, left-padded against the prefix
(`[prefix][pad…][suffix]`, the padding masked out, positions continuing the prefix), so every row's last prompt
token sits in the last column. Then one token per step for every unfinished row; a row stops at an end token or at
its token budget, and finished rows leave the cache. Where the model's attention can be routed, decoding steps run
`decode_attention` with the rows' key masks. The tokens equal `model.generate(do_sample=False)` on each
prompt alone, up to float rounding.
"""

from __future__ import annotations

import contextlib

import torch

from memmcl.experts.exact_logits import exact_top_logits
from memmcl.experts.packing import DECODE_ATTENTION, routed_attention, shares_prefix
from memmcl.experts.scoring import (
    MIN_SHARED_PREFIX,
    last_positions,
    left_pad,
    output_cache,
    position_ids,
    shared_prefix_length,
    with_cache,
)


def stop_ids(tokenizer) -> frozenset[int]:
    """Returns the tokens that end an extraction answer: the end-of-sequence token, and every token whose text holds a
    line break (the answer format is one line, so a model that goes on to a second line has answered); kept on the
    tokenizer."""
    if "_memmcl_stop_ids" not in vars(tokenizer):
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        lines = {i for i, t in enumerate(vocab) if t is not None and "\n" in tokenizer.convert_tokens_to_string([t])}
        vars(tokenizer)["_memmcl_stop_ids"] = frozenset({tokenizer.eos_token_id, *lines})
    return vars(tokenizer)["_memmcl_stop_ids"]


@torch.no_grad()
def generate_greedy(model, prompts: list[list[int]], pad_id: int, stops: set[int] | frozenset[int] | list[int],
                    max_new_tokens: int | list[int], chunk_size: int = 64, share_prefix: bool = True) -> list[list[int]]:
    """Returns each prompt's greedy continuation: its tokens up to (not including) the first of `stops`, at most
    `max_new_tokens` (one budget, or one per prompt)."""
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    out: list[list[int]] = []
    with exact_top_logits(model):
        for start in range(0, len(prompts), chunk_size):
            stop = min(start + chunk_size, len(prompts))
            out.extend(_generate_chunk(model, prompts[start:stop], pad_id, set(stops), budgets[start:stop], share_prefix))
    return out


def _generate_chunk(model, prompts, pad_id: int, stops: set[int], budgets: list[int], share_prefix: bool):
    device = next(model.parameters()).device
    B = len(prompts)
    length = shared_prefix_length(prompts, keep=1) if share_prefix else 0
    cache = None
    if length >= MIN_SHARED_PREFIX:
        cache = output_cache(model(input_ids=torch.tensor([prompts[0][:length]], device=device), use_cache=True))
        cache.batch_repeat_interleave(B)
    else:
        length = 0
    ids, suffix_mask = left_pad([p[length:] for p in prompts], pad_id, device)
    mask = torch.cat([torch.ones((B, length), dtype=torch.long, device=device), suffix_mask], dim=1)
    positions = position_ids(mask)[:, length:]
    kwargs = with_cache(model, cache) if cache is not None else {}
    result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   logits_to_keep=last_positions(ids.shape[1], 1, device), **kwargs)
    cache = output_cache(result)
    logits = result.logits[:, -1]
    last = positions[:, -1]
    tokens: list[list[int]] = [[] for _ in range(B)]
    active = torch.arange(B)
    routed = shares_prefix(model)  # the attention interface, no sliding windows: one query over the whole cache
    while True:
        nxt = logits.argmax(-1).cpu()
        keep = []
        for row, (i, token) in enumerate(zip(active.tolist(), nxt.tolist(), strict=True)):
            if token in stops or budgets[i] <= 0:
                continue
            tokens[i].append(token)
            if len(tokens[i]) < budgets[i]:
                keep.append(row)
        if not keep:
            return tokens
        if len(keep) < len(active):
            rows = torch.tensor(keep)
            cache.batch_select_indices(rows.to(device))
            active, nxt, mask, last = active[rows], nxt[rows], mask[rows.to(device)], last[rows.to(device)]
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=device)], dim=1)
        last = last + 1
        with routed_attention(model, DECODE_ATTENTION) if routed else contextlib.nullcontext():
            result = model(input_ids=nxt[:, None].to(device), attention_mask=mask[:, None, None].bool() if routed else mask,
                           position_ids=last[:, None], use_cache=True, **with_cache(model, cache))
        cache = output_cache(result)
        logits = result.logits[:, -1]
