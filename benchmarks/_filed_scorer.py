"""The label scorer as it was when the shared-prefix issue was filed (commit 4a6c1be), kept as the benchmarks'
"today's scorer" reference: whole left-padded prompts in one forward, LM head at the last position, and for
multi-token answers the prompt's key/value cache repeated once per label and continued with every label's tokens.
Not used by memmcl itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memmcl.experts.scoring import left_pad, position_ids, with_cache


@torch.no_grad()
def filed_score_labels(model, prompts, answers, pad_id: int, chunk_size: int = 64) -> torch.Tensor:
    """Returns [N, max labels] summed answer log-probabilities, computed as the filing-time scorer did."""
    n_labels = max(len(a) for a in answers)
    scores = torch.full((len(prompts), n_labels), float("-inf"))
    for start in range(0, len(prompts), chunk_size):
        stop = min(start + chunk_size, len(prompts))
        scores[start:stop] = _chunk(model, prompts[start:stop], answers[start:stop], pad_id, n_labels)
    return scores


def _chunk(model, prompts, answers, pad_id: int, n_labels: int) -> torch.Tensor:
    ids, mask = left_pad(prompts, pad_id)
    longest = max(len(a) for example in answers for a in example)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=1,
                use_cache=longest > 1)
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)
    B = len(prompts)
    tokens = torch.full((B, n_labels, longest), pad_id, dtype=torch.long)
    present = torch.zeros((B, n_labels, longest), dtype=torch.bool)
    for i, example in enumerate(answers):
        for l, a in enumerate(example):
            tokens[i, l, : len(a)] = torch.tensor(a)
            present[i, l, : len(a)] = True
    token_logp = torch.zeros((B, n_labels, longest))
    token_logp[:, :, 0] = first.gather(-1, tokens[:, :, 0])
    if longest > 1:
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        cache.batch_repeat_interleave(n_labels)
        cont = tokens[:, :, :-1].reshape(B * n_labels, longest - 1)
        cont_mask = present[:, :, :-1].reshape(B * n_labels, longest - 1).long()
        full_mask = torch.cat([mask.repeat_interleave(n_labels, 0), cont_mask], dim=1)
        positions = mask.sum(-1).repeat_interleave(n_labels)[:, None] + torch.arange(longest - 1)[None]
        logits = model(input_ids=cont, attention_mask=full_mask, position_ids=positions, use_cache=False,
                       **with_cache(model, cache)).logits
        rest = F.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, :, 1:].reshape(B * n_labels, longest - 1, 1))
        token_logp[:, :, 1:] = rest.view(B, n_labels, longest - 1)
    result = (token_logp * present).sum(-1)
    return torch.where(present[:, :, 0], result, torch.full_like(result, float("-inf")))
