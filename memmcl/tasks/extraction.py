"""Extraction tasks (UABSA, ASTE, ASQP): a sentence's tuples, their one target format, and exact-match micro-F1.

A tuple has named slots (`TaskSpec.slots`, in answer order): *span* slots hold words of the sentence (`TaskSpec.spans`;
`TaskSpec.nullable` ones may be `NULL`, as ASQP's implicit aspects are), the `sentiment` slot holds one of the task's
label names, and any other slot holds a value of its closed set (`TaskSpec.slot_values`) or, without one, free text.

Target format (what the model learns and `parse_answer` reads back): the tuples in the gold order, each its slot
values joined by `" | "`, tuples joined by `" ; "`; a sentence without tuples answers `none`. E.g.
`waitress | positive ; service | negative`. Values never hold either separator and are single spaced: readers check this, so every gold set survives the round trip through text and tokenization.
An answer that does not parse (a wrong arity, an unknown sentiment or category, an empty value) is *malformed*: it
yields no tuples and is counted, never an error.
"""

from __future__ import annotations

import ast
from collections import Counter
from dataclasses import dataclass, fields

from memmcl.tasks.spec import TaskError, TaskSpec

SLOT_SEP, TUPLE_SEP, EMPTY, NULL = " | ", " ; ", "none", "NULL"
Tuple = tuple[str, ...]


def render(tuples: tuple[Tuple, ...] | list[Tuple]) -> str:
    """Returns the target text of a tuple set."""
    return TUPLE_SEP.join(SLOT_SEP.join(t) for t in tuples) if tuples else EMPTY


def parse_answer(spec: TaskSpec, text: str) -> tuple[Tuple, ...] | None:
    """Returns the tuples of a generated answer, or None when it is malformed (see the module's docstring)."""
    text = " ".join(text.split())
    if text.lower() == EMPTY:
        return ()
    out = []
    for part in text.split(TUPLE_SEP.strip()):
        values = tuple(v.strip() for v in part.split(SLOT_SEP.strip()))
        if len(values) != len(spec.slots) or any(not v for v in values):
            return None
        for slot, value in zip(spec.slots, values, strict=True):
            allowed = closed_values(spec, slot)
            if allowed is not None and value not in allowed:
                return None
        out.append(values)
    return tuple(out)


def closed_values(spec: TaskSpec, slot: str) -> tuple[str, ...] | None:
    """Returns the values a closed-set slot allows (the sentiment slot: the label names), None for span / free slots."""
    if slot == "sentiment":
        return spec.labels
    return spec.slot_values.get(slot)


def check_tuples(spec: TaskSpec, raw, text: str, where: str, file_slots: tuple[str, ...] | None = None) -> tuple[Tuple, ...]:
    """Returns the gold tuples of one row in answer order from a list of tuples in file order (`file_slots`, default
    `spec.slots`): word values, or token-index lists for span slots (`([2], [5], 'NEG')`, positions in the
    whitespace-split sentence). `raw` is that list or its Python-literal text. Errors name `where`."""
    file_slots = file_slots or spec.slots
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError) as err:
            raise TaskError(f"{where}: tuples {raw[:80]!r} are not a Python/JSON list literal ({type(err).__name__})") from None
    if not isinstance(raw, (list, tuple)):
        raise TaskError(f"{where}: expected a list of tuples, got {type(raw).__name__}")
    words = text.split()
    out = []
    for k, item in enumerate(raw):
        if not isinstance(item, (list, tuple)) or len(item) != len(file_slots):
            raise TaskError(f"{where}: tuple {k} is {item!r}; expected {len(file_slots)} values ({', '.join(file_slots)})")
        values = dict(zip(file_slots, item, strict=True))
        tup = []
        for slot in spec.slots:
            value = values[slot]
            if isinstance(value, (list, tuple)) and slot in spec.spans:
                if not value or not all(isinstance(i, int) and 0 <= i < len(words) for i in value):
                    raise TaskError(f"{where}: tuple {k}: {slot} indices {list(value)} are not positions of the "
                                    f"{len(words)} words of the sentence")
                value = " ".join(words[i] for i in range(min(value), max(value) + 1))
            if not isinstance(value, str) or not value.strip():
                raise TaskError(f"{where}: tuple {k}: {slot} is {value!r}; expected a non-empty string")
            value = " ".join(value.split())
            if slot == "sentiment":
                value = spec.aliases.get(value, value)
            allowed = closed_values(spec, slot)
            if allowed is not None and value not in allowed:
                raise TaskError(f"{where}: tuple {k}: {slot} '{value}' is not one of {list(allowed)}")
            if slot in spec.spans:
                if value == NULL:
                    if slot not in spec.nullable:
                        raise TaskError(f"{where}: tuple {k}: {slot} is NULL; expected words of the sentence "
                                        f"(list '{slot}' in the task's 'nullable' to allow implicit ones)")
                # ABSA-QUAD has spans inside a word ('consistency-not'), and 1-3 per file that are not in the
                # sentence at all (a case change, a paraphrase), kept as gold with `unmatched_spans: keep`.
                elif value not in " ".join(words) and spec.unmatched_spans == "error":
                    raise TaskError(f"{where}: tuple {k}: {slot} '{value}' is not a span of the sentence (a corpus with such "
                                    f"gold spans: set the task's unmatched_spans: keep)")
            if SLOT_SEP.strip() in value or TUPLE_SEP.strip() in value:
                raise TaskError(f"{where}: tuple {k}: {slot} '{value}' holds '|' or ';', which the answer format reserves")
            tup.append(value)
        out.append(tuple(tup))
    return tuple(out)


@dataclass
class TupleCounts:
    """Exact-match counts of one task: matched tuples, predicted, gold; exact sets (a malformed answer never is one);
    malformed answers; examples."""

    tp: int = 0
    predicted: int = 0
    gold: int = 0
    exact: int = 0
    malformed: int = 0
    n: int = 0

    def add(self, predicted: tuple[Tuple, ...] | None, gold: tuple[Tuple, ...]) -> bool:
        """Counts one answer (None: malformed); returns whether its tuple set is exactly the gold set."""
        exact = predicted is not None and set(predicted) == set(gold)
        self.malformed += predicted is None
        self.exact += exact
        p, g = Counter(predicted or ()), Counter(gold)
        self.tp += sum((p & g).values())
        self.predicted += sum(p.values())
        self.gold += sum(g.values())
        self.n += 1
        return exact

    def __add__(self, other: TupleCounts) -> TupleCounts:
        """Returns the field-wise sum (several ranks' counts of one task)."""
        return TupleCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def scores(self) -> dict[str, float]:
        """Returns micro precision / recall / F1 over tuples, the share of exact sets (`acc`) and malformed answers."""
        precision = self.tp / self.predicted if self.predicted else 0.0
        recall = self.tp / self.gold if self.gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"acc": self.exact / self.n if self.n else 0.0, "f1": f1, "precision": precision, "recall": recall,
                "malformed": float(self.malformed), "metric": f1}
