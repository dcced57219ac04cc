"""Prompt building, the one place that turns (instruction, demonstrations, input, aspect) into token ids."""

from __future__ import annotations

from dataclasses import dataclass

from memmcl.tasks.spec import Example, TaskError, TaskSpec


@dataclass(frozen=True)
class Demonstration:
    """An in-context example: its input text, optional aspect, and its answer word."""

    text: str
    answer: str
    aspect: str | None = None


def _block(spec: TaskSpec, text: str, aspect: str | None, answer: str | None) -> str:
    lines = [f"Text: {text}"]
    if aspect is not None:
        lines.append(f"{spec.aspect_name}: {aspect}")
    lines.append("Answer:" if answer is None else f"Answer: {answer}")
    return "\n".join(lines)


def answer_text(spec: TaskSpec, example: Example) -> str:
    """Returns the gold answer of an example as its task kind writes it (a label word, an extraction task's tuples)."""
    return spec.task_kind.answer_text(spec, example)


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_body(spec: TaskSpec, text: str, aspect: str | None, demos: list[Demonstration]) -> str:
    """Returns the plain-format prompt text: instruction, demonstrations, then the input ending in `Answer:`."""
    return "\n\n".join([spec.instruction, *(_block(spec, d.text, d.aspect, d.answer) for d in demos), _block(spec, text, aspect, None)])


def _prompt_text(tokenizer, spec: TaskSpec, text: str, aspect: str | None, demos: list[Demonstration]) -> str:
    body = prompt_body(spec, text, aspect, demos)
    if uses_chat_template(tokenizer):
        messages = [{"role": "user", "content": body.removesuffix("Answer:").rstrip() + "\n" + spec.task_kind.ask}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return body


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Returns the token ids of an answer word as it follows a prompt (a leading space in the plain format)."""
    ids = tokenizer(answer if uses_chat_template(tokenizer) else " " + answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TaskError(f"answer word {answer!r} tokenizes to nothing")
    return ids


def target_ids(tokenizer, spec: TaskSpec, example: Example) -> list[int]:
    """Returns a generated task's answer ids (extraction): its target text, then the end-of-sequence token that stops
    generation."""
    return answer_ids(tokenizer, answer_text(spec, example)) + [tokenizer.eos_token_id]


def _encode(tokenizer, prompt: str) -> list[int]:
    # A chat template already wrote its special tokens into the text.
    return tokenizer(prompt, add_special_tokens=not uses_chat_template(tokenizer))["input_ids"]


def _cut(tokenizer, text: str, n_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[: max(n_tokens, 1)]).strip()


def build_prompt(
    tokenizer,
    spec: TaskSpec,
    example: Example,
    max_length: int,
    demos: list[Demonstration] | tuple = (),
    longest_answer: int | None = None,
) -> list[int]:
    """Returns the prompt's token ids, leaving room for the longest answer of the task within `max_length`
    (`longest_answer` tokens when the caller knows it).

    When too long, input texts are cut (the longest first: the query or a demonstration's), never the instruction,
    the demonstrations' answers or the answer itself.
    """
    demos = list(demos)
    if longest_answer is None:
        longest_answer = max(len(answer_ids(tokenizer, a)) for a in spec.answers)
    budget = max_length - longest_answer
    text = example.text
    for _ in range(8 + 2 * len(demos)):
        ids = _encode(tokenizer, _prompt_text(tokenizer, spec, text, example.aspect, demos))
        excess = len(ids) - budget
        if excess <= 0:
            return ids
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in [text, *(d.text for d in demos)]]
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[longest] <= 1:
            break
        keep = max(lengths[longest] - excess, 1)
        if longest == 0:
            text = _cut(tokenizer, text, keep)
        else:
            d = demos[longest - 1]
            demos[longest - 1] = Demonstration(_cut(tokenizer, d.text, keep), d.answer, d.aspect)
    raise TaskError(
        f"task '{spec.name}': the instruction, demonstrations' answers and answer need more than max_length={max_length} "
        f"tokens even with input texts cut to one token; raise max_length or use fewer demonstrations"
    )
