"""The text a tiny backbone's tokenizer is trained on: the shipped tasks' training inputs, instructions and answers."""

from __future__ import annotations

from memmcl.tasks.readers import read_split
from memmcl.tasks.spec import embedded_task_names, load_task_spec


def embedded_corpus() -> list[str]:
    """Returns instructions, answer words, aspects and train/validation texts of every shipped task (never test)."""
    texts: list[str] = []
    for name in embedded_task_names():
        spec = load_task_spec(name)
        texts.append(spec.instruction)
        texts.extend(f"{spec.aspect_name}: Text: Answer: {a}" for a in spec.answers)
        for split in ("train", "validation"):
            for ex in read_split(spec, split):
                texts.append(ex.text if ex.aspect is None else f"{ex.text} {ex.aspect}")
    return texts
