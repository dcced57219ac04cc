"""Rank classification: each label's answer tokens scored by log-likelihood after the prompt; the argmax predicts.

This one module serves validation, test, predict, weak-data mining and merge fitness. Sequences are left-padded so
every answer ends at the last position; the LM head runs only over the last `max answer length + 1` positions
(`logits_to_keep`), never over the full sequence × vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def last_log_probs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Returns next-token log-probabilities [B, k, V] computed at the last `k` positions only."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                logits_to_keep=k, use_cache=False)
    return F.log_softmax(out.logits.float(), dim=-1)


def tail_log_probs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_tail: int) -> torch.Tensor:
    """Returns log-probabilities [B, n_tail, V] predicting the tokens at the last `n_tail` positions."""
    return last_log_probs(model, input_ids, attention_mask, n_tail + 1)[:, :-1]


def answer_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Returns the mean cross-entropy over answer tokens (labels != -100) of a left-padded batch."""
    answer_mask = labels != -100
    n_tail = int(answer_mask.sum(-1).max())
    logp = tail_log_probs(model, input_ids, attention_mask, n_tail)
    targets = labels[:, -n_tail:]
    return F.nll_loss(logp.reshape(-1, logp.shape[-1]), targets.reshape(-1), ignore_index=-100)


@torch.no_grad()
def score_labels(model, prompts: list[list[int]], answers: list[list[list[int]]], pad_id: int, chunk_size: int = 64) -> torch.Tensor:
    """Returns [N, max labels] summed log-probabilities of each example's label answers (-inf where a task has fewer labels).

    `answers[i][l]` holds the token ids of label l's answer for example i. One forward over the prompts (LM head at
    the last position only) scores every label's first token; when some answer has more tokens, that forward keeps
    its key/value cache, which is repeated once per label, and one short forward over the labels' remaining tokens
    scores them. So the prompt is encoded once however many labels there are. Results do not depend on batch size
    or padding.
    """
    device = next(model.parameters()).device
    n_labels = max(len(a) for a in answers)
    scores = torch.full((len(prompts), n_labels), float("-inf"))
    for start in range(0, len(prompts), chunk_size):
        stop = min(start + chunk_size, len(prompts))
        scores[start:stop] = _score_chunk(model, prompts[start:stop], answers[start:stop], pad_id, n_labels, device)
    return scores


def _score_chunk(model, prompts, answers, pad_id: int, n_labels: int, device) -> torch.Tensor:
    ids, mask = left_pad(prompts, pad_id, device)
    longest = max(len(a) for example in answers for a in example)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=1,
                use_cache=longest > 1)
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
    B = len(prompts)
    # [B, L, A] answer tokens (pad where a label is absent or shorter) and their mask
    tokens = torch.full((B, n_labels, longest), pad_id, dtype=torch.long, device=device)
    present = torch.zeros((B, n_labels, longest), dtype=torch.bool, device=device)
    for i, example in enumerate(answers):
        for l, a in enumerate(example):
            tokens[i, l, : len(a)] = torch.tensor(a, device=device)
            present[i, l, : len(a)] = True
    token_logp = torch.zeros((B, n_labels, longest), device=device)
    token_logp[:, :, 0] = first.gather(-1, tokens[:, :, 0])
    if longest > 1:
        # Continue every (example, label) from the shared prompt cache with the answer's tokens but its last.
        cache = out.past_key_values
        cache.batch_repeat_interleave(n_labels)
        cont = tokens[:, :, :-1].reshape(B * n_labels, longest - 1)
        cont_mask = present[:, :, :-1].reshape(B * n_labels, longest - 1).long()
        full_mask = torch.cat([mask.repeat_interleave(n_labels, 0), cont_mask], dim=1)
        start = mask.sum(-1).repeat_interleave(n_labels)[:, None]
        positions = start + torch.arange(longest - 1, device=device)[None]
        logits = model(input_ids=cont, attention_mask=full_mask, position_ids=positions, past_key_values=cache,
                       use_cache=False).logits
        rest = F.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, :, 1:].reshape(B * n_labels, longest - 1, 1))
        token_logp[:, :, 1:] = rest.view(B, n_labels, longest - 1)
    result = (token_logp * present).sum(-1)
    has_label = present[:, :, 0]
    return torch.where(has_label, result, torch.full_like(result, float("-inf"))).cpu()
