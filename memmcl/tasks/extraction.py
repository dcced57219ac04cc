"""Extraction tasks (UABSA, ASTE, ASQP): a sentence's tuples, their one target format, and exact-match micro-F1. The
task kind `extraction` (`memmcl.tasks.kinds`).

A tuple has named slots (`Extraction.slots`, in answer order): *span* slots hold words of the sentence
(`Extraction.spans`; `Extraction.nullable` ones may be `NULL`, as ASQP's implicit aspects are), the `sentiment` slot
holds one of the task's label names, and any other slot holds a value of its closed set (`Extraction.slot_values`) or,
without one, free text.

Target format (what the model learns and `Extraction.parse_answer` reads back): the tuples in the gold order, each its
slot values joined by `" | "`, tuples joined by `" ; "`; a sentence without tuples answers `none`. E.g.
`waitress | positive ; service | negative`. Values never hold either separator and are single spaced: readers check
this, so every gold set survives the round trip through text and tokenization.
An answer that does not parse (a wrong arity, an unknown sentiment or category, an empty value) is *malformed*: it
yields no tuples and is counted, never an error.
"""

from __future__ import annotations

import ast
import dataclasses
from collections import Counter
from dataclasses import dataclass, field, fields

from memmcl.tasks.fields import TaskError
from memmcl.tasks.kinds import TaskKind
from memmcl.tasks.spec import Example, TaskSpec

SLOT_SEP, TUPLE_SEP, EMPTY, NULL = " | ", " ; ", "none", "NULL"
Tuple = tuple[str, ...]


def render(tuples: tuple[Tuple, ...] | list[Tuple]) -> str:
    """Returns the target text of a tuple set."""
    return TUPLE_SEP.join(SLOT_SEP.join(t) for t in tuples) if tuples else EMPTY


def names_field(data: dict, key: str, source: str) -> tuple[str, ...]:
    value = data.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise TaskError(f"{source}: field '{key}' must be a list of slot names, got {value!r}")
    return tuple(v.strip() for v in value)


@dataclass(frozen=True)
class Extraction(TaskKind):
    """Tuples per sentence (`Example.tuples`), generated as target text and scored by exact-match micro-F1.

    Attributes:
        slots: the tuple's slots in answer order.
        file_slots: the slots' order in the files (default `slots`).
        spans: slots whose values are words of the sentence.
        nullable: span slots that may be NULL (implicit).
        slot_values: the closed value sets of other slots (the sentiment slot's are the task's labels).
        unmatched_spans: a gold span not in its sentence is an `error`, or kept (`keep`).
    """

    slots: tuple[str, ...]
    file_slots: tuple[str, ...] = ()
    spans: tuple[str, ...] = ()
    nullable: tuple[str, ...] = ()
    slot_values: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    unmatched_spans: str = "error"

    name = "extraction"
    keys = ("slots", "file_slots", "spans", "nullable", "slot_values", "unmatched_spans")
    string_keys = ("unmatched_spans",)
    default_metric = "tuple_f1"
    generates = True
    ask = "Answer in the format above."

    @classmethod
    def check_metric(cls, metric: str, labels: list[str], source: str) -> None:
        if metric != "tuple_f1":
            raise TaskError(f"{source}: field 'metric' is {metric!r}; an extraction task takes tuple_f1")

    @classmethod
    def from_fields(cls, data: dict, source: str, labels: list[str]) -> Extraction:
        """Returns the checked extraction fields of a spec mapping."""
        slots = names_field(data, "slots", source)
        if not slots or len(set(slots)) != len(slots):
            raise TaskError(f"{source}: field 'slots' must list the tuple's distinct slot names (e.g. [aspect, sentiment])")
        file_slots = names_field(data, "file_slots", source) or slots
        spans, nullable = names_field(data, "spans", source), names_field(data, "nullable", source)
        if sorted(file_slots) != sorted(slots):
            raise TaskError(f"{source}: field 'file_slots' {list(file_slots)} must order the same slots as 'slots' {list(slots)}")
        if not set(spans) <= set(slots) or "sentiment" in spans or not set(nullable) <= set(spans):
            raise TaskError(f"{source}: fields 'spans' {list(spans)} / 'nullable' {list(nullable)}: expected span slots "
                            f"among {list(slots)} (not sentiment), nullable ones among the spans")
        values = data.get("slot_values") or {}
        if not isinstance(values, dict) or any(k not in slots or k in spans or k == "sentiment" or not isinstance(v, list)
                                               or not v for k, v in values.items()):
            raise TaskError(f"{source}: field 'slot_values' must map non-span slots other than sentiment to lists of values")
        if "aspect" in (data.get("fields") or {}):
            raise TaskError(f"{source}: field 'fields.aspect': an extraction task finds its aspects; expected no aspect field")
        unmatched = data.get("unmatched_spans", "error")
        if unmatched not in ("error", "keep"):
            raise TaskError(f"{source}: field 'unmatched_spans' is {unmatched!r}; expected error or keep")
        return cls(slots=slots, file_slots=file_slots, spans=spans, nullable=nullable, unmatched_spans=unmatched,
                   slot_values={k: tuple(str(x) for x in v) for k, v in values.items()})

    def to_dict(self, out: dict) -> None:
        out.update(kind=self.name, slots=list(self.slots), spans=list(self.spans))
        out["fields"] = {k: v for k, v in out["fields"].items() if k != "aspect"}
        if self.file_slots != self.slots:
            out["file_slots"] = list(self.file_slots)
        if self.nullable:
            out["nullable"] = list(self.nullable)
        if self.unmatched_spans != "error":
            out["unmatched_spans"] = self.unmatched_spans
        if self.slot_values:
            out["slot_values"] = {k: list(v) for k, v in self.slot_values.items()}

    def as_written(self) -> Extraction:
        """Weak-data rows hold tuples in answer order."""
        return dataclasses.replace(self, file_slots=self.slots)

    # ---- answers -------------------------------------------------------------------------------------------------

    def example(self, spec: TaskSpec, row: dict, text: str, ident: str, where: str) -> Example:
        """Returns one row's example: its checked gold tuples in answer order, its text single spaced."""
        if spec.label_field not in row or row[spec.label_field] is None:
            raise TaskError(f"{where}: field '{spec.label_field}' is missing; expected a list of tuples ({', '.join(self.file_slots)})")
        tuples = self.check_tuples(spec, row[spec.label_field], text, where)
        return Example(id=ident, text=" ".join(text.split()), label=0, tuples=tuples)

    def answer_text(self, spec: TaskSpec, example: Example) -> str:
        return render(example.tuples)

    def answer_stats(self, spec: TaskSpec, train: list[Example]) -> tuple[list[int], dict]:
        """The sentiment slot's labels counted over tuples; tuples per sentence, the share without any, and values to
        produce per sentence."""
        sentiment = self.slots.index("sentiment") if "sentiment" in self.slots else None
        labels = [spec.labels.index(t[sentiment]) for e in train for t in e.tuples] if sentiment is not None else []
        n_tuples = [len(e.tuples) for e in train]
        return labels or [0], {"tuples_mean": sum(n_tuples) / len(train), "empty_share": n_tuples.count(0) / len(train),
                               "answer_values_mean": sum(n_tuples) * len(self.slots) / len(train)}

    def majority_key(self, spec: TaskSpec, example: Example) -> bool:
        """Answering `none` everywhere: exact on the sentences without tuples."""
        return bool(example.tuples)

    def weak_label(self, spec: TaskSpec, example: Example) -> list[list[str]]:
        return [list(t) for t in example.tuples]

    def corpus_answer(self, spec: TaskSpec, rng, examples: list[Example]) -> str:
        """A random sentence's tuples: the answer format, not this sentence's answer."""
        return self.answer_text(spec, rng.choice(examples))

    # ---- evaluation by generation --------------------------------------------------------------------------------

    render = staticmethod(render)

    def gold(self, example: Example) -> tuple[Tuple, ...]:
        """The gold answer that `counts().add` compares a parsed answer with: the example's tuples."""
        return example.tuples

    def prediction_fields(self, predicted: tuple[Tuple, ...] | None) -> dict:
        """What a prediction record holds besides the answer texts: the parsed tuples (None: malformed)."""
        return {"tuples": None if predicted is None else [list(t) for t in predicted]}

    def counts(self) -> TupleCounts:
        return TupleCounts()

    def parse_answer(self, spec: TaskSpec, text: str) -> tuple[Tuple, ...] | None:
        """Returns the tuples of a generated answer, or None when it is malformed (see the module's docstring)."""
        text = " ".join(text.split())
        if text.lower() == EMPTY:
            return ()
        out = []
        for part in text.split(TUPLE_SEP.strip()):
            values = tuple(v.strip() for v in part.split(SLOT_SEP.strip()))
            if len(values) != len(self.slots) or any(not v for v in values):
                return None
            for slot, value in zip(self.slots, values, strict=True):
                allowed = self.closed_values(spec, slot)
                if allowed is not None and value not in allowed:
                    return None
            out.append(values)
        return tuple(out)

    def closed_values(self, spec: TaskSpec, slot: str) -> tuple[str, ...] | None:
        """Returns the values a closed-set slot allows (the sentiment slot: the label names), None for span / free slots."""
        if slot == "sentiment":
            return spec.labels
        return self.slot_values.get(slot)

    def check_tuples(self, spec: TaskSpec, raw, text: str, where: str) -> tuple[Tuple, ...]:
        """Returns the gold tuples of one row in answer order from a list of tuples in file order (`file_slots`):
        word values, or token-index lists for span slots (`([2], [5], 'NEG')`, positions in the whitespace-split
        sentence). `raw` is that list or its Python-literal text. Errors name `where`."""
        file_slots = self.file_slots or self.slots
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
            for slot in self.slots:
                value = values[slot]
                if isinstance(value, (list, tuple)) and slot in self.spans:
                    if not value or not all(isinstance(i, int) and 0 <= i < len(words) for i in value):
                        raise TaskError(f"{where}: tuple {k}: {slot} indices {list(value)} are not positions of the "
                                        f"{len(words)} words of the sentence")
                    value = " ".join(words[i] for i in range(min(value), max(value) + 1))
                if not isinstance(value, str) or not value.strip():
                    raise TaskError(f"{where}: tuple {k}: {slot} is {value!r}; expected a non-empty string")
                value = " ".join(value.split())
                if slot == "sentiment":
                    value = spec.aliases.get(value, value)
                allowed = self.closed_values(spec, slot)
                if allowed is not None and value not in allowed:
                    raise TaskError(f"{where}: tuple {k}: {slot} '{value}' is not one of {list(allowed)}")
                if slot in self.spans:
                    if value == NULL:
                        if slot not in self.nullable:
                            raise TaskError(f"{where}: tuple {k}: {slot} is NULL; expected words of the sentence "
                                            f"(list '{slot}' in the task's 'nullable' to allow implicit ones)")
                    # ABSA-QUAD has spans inside a word ('consistency-not'), and 1-3 per file that are not in the
                    # sentence at all (a case change, a paraphrase), kept as gold with `unmatched_spans: keep`.
                    elif value not in " ".join(words) and self.unmatched_spans == "error":
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
