"""The text a tiny backbone's tokenizer is trained on: the shipped tasks' training inputs, instructions and answers."""

from __future__ import annotations

import random

from memmcl.tasks.readers import read_split
from memmcl.tasks.spec import embedded_task_names, load_task_spec


def embedded_corpus(seed: int = 0) -> list[str]:
    """Returns the unlabelled pretraining text of the tiny backbone, from train and validation splits (never test).

    Each input appears as plain text and once in the plain prompt format with an answer word drawn uniformly at
    random from its task's answers (extraction tasks: a random sentence's tuples): the base learns the answer *format* (as an instruction-tuned LLM knows it)
    but no label, so its zero-shot accuracy stays at chance and experts have everything to learn.
    """
    from memmcl.tasks.prompts import prompt_body

    rng = random.Random(seed)
    texts: list[str] = []
    for name in embedded_task_names():
        spec = load_task_spec(name)
        for split in ("train", "validation"):
            examples = read_split(spec, split)
            for ex in examples:
                texts.append(ex.text if ex.aspect is None else f"{ex.text} {ex.aspect}")
                answer = spec.task_kind.corpus_answer(spec, rng, examples)  # extraction: another sentence's tuples
                texts.append(f"{prompt_body(spec, ex.text, ex.aspect, [])} {answer}")
    return texts
