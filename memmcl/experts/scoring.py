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

    `answers[i][l]` holds the token ids of label l's answer for example i. When every answer is one token, one
    forward over the prompts alone gives all labels' scores; otherwise each (example, label) pair is scored as
    prompt + answer, in chunks of `chunk_size` sequences. Results do not depend on batch size or padding.
    """
    device = next(model.parameters()).device
    n_labels = max(len(a) for a in answers)
    scores = torch.full((len(prompts), n_labels), float("-inf"))
    if all(len(ans) == 1 for example in answers for ans in example):
        for start in range(0, len(prompts), chunk_size):
            ids, mask = left_pad(prompts[start : start + chunk_size], pad_id, device)
            logp = last_log_probs(model, ids, mask, 1)[:, 0]
            for i in range(ids.shape[0]):
                firsts = torch.tensor([a[0] for a in answers[start + i]], device=device)
                scores[start + i, : len(firsts)] = logp[i, firsts].cpu()
        return scores
    pairs = [(i, l) for i, example in enumerate(answers) for l in range(len(example))]
    for start in range(0, len(pairs), chunk_size):
        block = pairs[start : start + chunk_size]
        seqs = [prompts[i] + answers[i][l] for i, l in block]
        n_tail = max(len(answers[i][l]) for i, l in block)
        ids, mask = left_pad(seqs, pad_id, device)
        logp = tail_log_probs(model, ids, mask, n_tail)
        for row, (i, l) in enumerate(block):
            ans = torch.tensor(answers[i][l], device=device)
            token_logp = logp[row, n_tail - len(ans) :].gather(-1, ans[:, None])
            scores[i, l] = token_logp.sum().cpu()
    return scores
