"""Task examples as items (prompt ids, every label's answer ids, the gold label) and items as left-padded batches
whose labels mask all but the answer tokens: what `MultiTaskDataModule` encodes and its loaders collate."""

from __future__ import annotations

import torch

from memmcl.experts.scoring import left_pad
from memmcl.tasks.prompts import answer_ids, build_prompt, target_ids
from memmcl.tasks.spec import Example, TaskSpec

IGNORE_INDEX = -100


def encode_examples(tokenizer, spec: TaskSpec, task_index: int, examples: list[Example], max_length: int,
                    demonstrations: list[list] | None = None, demo_max_length: int | None = None,
                    max_new_tokens: int = 0) -> list[dict]:
    """Returns one item per example: its prompt ids (with its list in `demonstrations`, within `demo_max_length`
    tokens when it has any), every label's answer ids, the gold label, the number of demonstrations and identifiers;
    an extraction example has its target ids as its one answer (label 0), its gold tuples and `max_new_tokens`."""
    generates = spec.task_kind.generates
    answers = None if generates else [answer_ids(tokenizer, a) for a in spec.answers]
    items = []
    for e, demos in zip(examples, demonstrations or [[] for _ in examples], strict=True):
        length = (demo_max_length or max_length) if demos else max_length
        if generates:  # one answer, the target: training and the gold score use it, evaluation generates
            target = target_ids(tokenizer, spec, e)
            items.append({"task": task_index, "id": e.id, "label": 0, "answers": [target], "demos": len(demos),
                          "prompt": build_prompt(tokenizer, spec, e, length, demos, len(target)), "gold": spec.task_kind.gold(e),
                          "max_new": max_new_tokens})
            continue
        items.append({"task": task_index, "id": e.id, "label": e.label, "answers": answers, "demos": len(demos),
                      "prompt": build_prompt(tokenizer, spec, e, length, demos, max(map(len, answers)))})
    return items


def generation_budget(tokenizer, spec: TaskSpec, examples: list[Example]) -> int:
    """Returns an extraction task's new-token budget: its longest target among `examples` (its training split), plus
    a quarter and 8 tokens."""
    longest = max(len(target_ids(tokenizer, spec, e)) for e in examples)
    return longest + longest // 4 + 8


def collate(items: list[dict], pad_id: int) -> dict:
    """Returns a left-padded batch of prompt + gold answer whose `labels` mask everything but the answer tokens.

    Left padding puts every answer at the end, so only the last positions need the LM head. The raw prompt and
    answer ids stay in the batch for label scoring.
    """
    input_ids, attention_mask = left_pad([it["prompt"] + it["answers"][it["label"]] for it in items], pad_id)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, it in enumerate(items):
        n_answer = len(it["answers"][it["label"]])
        labels[i, -n_answer:] = input_ids[i, -n_answer:]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "task": torch.tensor([it["task"] for it in items]),
        "label": torch.tensor([it["label"] for it in items]),
        "id": [it["id"] for it in items],
        "prompt": [it["prompt"] for it in items],
        "answers": [it["answers"] for it in items],
        "gold": [it.get("gold") for it in items],  # a generated task's gold answer (its kind's `gold`)
        "max_new": [it.get("max_new", 0) for it in items],
    }
