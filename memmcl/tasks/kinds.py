"""Task kinds: what a task asks of a model, one registry entry per kind.

A spec's `kind` names its task kind (`classification`: a label word, scored; `extraction`: tuples, generated). The
kind is an object on the spec (`TaskSpec.task_kind`) that holds the spec fields only that kind reads and answers
every question the rest of the code asks of a task's answers:

- `from_fields(data, source, labels)`: its own fields of a spec mapping, checked (errors name the file and field),
  and `to_dict(out)`: writes them back; `keys` lists them, `string_keys` those that must be strings;
  `check_metric(metric, labels, source)`: the metrics it allows, `default_metric` the one it takes unset;
  `check_format(fmt, where, name)`: a file format that holds another kind's answers (`FORMAT_KINDS`) is refused;
- `example(spec, row, text, ident, where)`: one file row as an `Example`; `answer_text(spec, example)`: its gold
  answer as text; `ask`: the last line of a chat prompt;
- `answer_stats(spec, train)`: the label list that label entropy and imbalance count, and the answer-size features
  of its metadata; `majority_key(spec, example)`: what the majority baseline counts; `weak_label(spec, example)`: the
  label a weak-data row stores, and `as_written()` the kind as weak-data files hold it;
- `corpus_answer(spec, rng, examples)`: the answer the tiny backbone's corpus draws for a prompt;
- `generates`: how it is evaluated. False: every label word is scored (`metric_value(spec, acc, macro_f1,
  class_f1)` gives the task's metric); True: greedy generation, read back by `parse_answer(spec, text)` and counted
  by `counts()` (an accumulator with `add(predicted, gold) -> exact`, `+` and `scores()`) against `gold(example)`,
  `render` writing gold and predicted answers as text and `prediction_fields(predicted)` what else a prediction
  record holds.

Adding a kind is a module with a `TaskKind` subclass plus one line in `KINDS` (a class path, as Lightning's
`class_path`: the kinds' modules read specs, so the spec layer loads them by name).
"""

from __future__ import annotations

import importlib
from functools import cache

from memmcl.tasks.fields import TaskError

KINDS: dict[str, str] = {
    "classification": "memmcl.tasks.classification:Classification",
    "extraction": "memmcl.tasks.extraction:Extraction",
}
DEFAULT_KIND = "classification"
# Formats that only one kind reads (its files hold that kind's answers).
FORMAT_KINDS: dict[str, str] = {"absa_lines": "extraction"}


class TaskKind:
    """The base of a task kind (see the module's docstring); a subclass is a frozen dataclass of its own fields."""

    name: str = ""
    keys: tuple[str, ...] = ()
    string_keys: tuple[str, ...] = ()
    default_metric: str = "accuracy"
    generates: bool = False
    ask: str = "Answer with one word."

    @classmethod
    def check_format(cls, fmt: str, where: str, name: str) -> None:
        """Fails when the kind does not read the file format `fmt` (`where`: the field that set it)."""
        owner = FORMAT_KINDS.get(fmt)
        if owner is not None and owner != cls.name:
            raise TaskError(f"{where} is '{fmt}', which holds {owner} answers; task '{name}' is a {cls.name} task "
                            f"(set kind: {owner})")

    def to_dict(self, out: dict) -> None:
        """Writes the kind's own fields into a spec mapping (`TaskSpec.to_dict`); a kind without fields writes none."""

    def as_written(self) -> TaskKind:
        """Returns the kind as weak-data files (`weak_label`) hold its answers; a kind without fields: itself."""
        return self


@cache
def kind_class(name: str) -> type[TaskKind]:
    """Returns the registered kind class `name`; an entry that does not load is an error naming it."""
    module, _, attr = KINDS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise TaskError(f"task kind {name!r}: its registry entry {KINDS[name]!r} does not load ({err})") from None


def task_kind_class(name, source: str) -> type[TaskKind]:
    """Returns the kind class a spec's `kind` field names; anything else is an error naming the spec file."""
    if not isinstance(name, str) or name not in KINDS:
        raise TaskError(f"{source}: field 'kind' is {name!r}; expected one of {list(KINDS)}")
    return kind_class(name)


def kind_keys() -> dict[str, list[str]]:
    """Returns every kind's own spec fields, field -> the kinds that read it."""
    out: dict[str, list[str]] = {}
    for name in KINDS:
        for key in kind_class(name).keys:
            out.setdefault(key, []).append(name)
    return out


def generated_record(record: dict) -> bool:
    """Whether a prediction record (`LabelScoringModule.predict_step`) is a generated answer, whose one score is the
    gold answer's log-likelihood, rather than every label's score."""
    return kind_class(record.get("kind", DEFAULT_KIND)).generates
