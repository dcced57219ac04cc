"""Classification tasks (SC, aspect polarity, MAST): one label per input, answered by its label word and evaluated by
scoring every label word. The task kind `classification` (`memmcl.tasks.kinds`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from memmcl.tasks.fields import TaskError
from memmcl.tasks.kinds import TaskKind
from memmcl.tasks.spec import Example, TaskSpec

# A classification task's standard metric: accuracy, macro-F1, the F1 of one label `f1(irony)`, or the mean F1 of
# labels `mean_f1(against, favor)`.
METRIC = re.compile(r"accuracy|macro_f1|(f1|mean_f1)\(([^()]+)\)")
METRICS = "accuracy, macro_f1, f1(<label>), mean_f1(<label>, ...)"


@dataclass(frozen=True)
class Classification(TaskKind):
    """A label per input (`Example.label` indexes `TaskSpec.labels`), with an optional aspect or stance target."""

    name = "classification"

    @classmethod
    def from_fields(cls, data: dict, source: str, labels: list[str]) -> Classification:
        return cls()

    @classmethod
    def check_metric(cls, metric: str, labels: list[str], source: str) -> None:
        m = METRIC.fullmatch(metric)
        if m is None:
            raise TaskError(f"{source}: field 'metric' is {metric!r}; a classification task takes {METRICS}")
        if m.group(2) and any(n.strip() not in labels for n in m.group(2).split(",")):
            raise TaskError(f"{source}: field 'metric' is {metric!r}; its labels must be among {labels}")

    def metric_value(self, spec: TaskSpec, acc: float, macro_f1: float, class_f1: list[float]) -> float:
        """Returns the task's standard metric (`spec.metric`) of a result."""
        if spec.metric == "accuracy":
            return acc
        if spec.metric == "macro_f1":
            return macro_f1
        names = [n.strip() for n in METRIC.fullmatch(spec.metric).group(2).split(",")]
        return sum(class_f1[spec.labels.index(n)] for n in names) / len(names)

    def example(self, spec: TaskSpec, row: dict, text: str, ident: str, where: str) -> Example:
        """Returns one row's example: its label (aliases applied) and, where the task has an aspect field, its aspect."""
        if spec.label_field not in row or row[spec.label_field] is None:
            raise TaskError(f"{where}: field '{spec.label_field}' is missing; expected one of {list(spec.labels)}")
        label = str(row[spec.label_field]).strip()
        label = spec.aliases.get(label, label)
        if label not in spec.labels:
            also = f" or an alias {sorted(spec.aliases)}" if spec.aliases else ""
            raise TaskError(f"{where}: label '{label}' is not one of {list(spec.labels)}{also}")
        aspect = None
        if spec.aspect_field:
            aspect = row.get(spec.aspect_field)
            if not isinstance(aspect, str) or not aspect.strip():
                raise TaskError(f"{where}: field '{spec.aspect_field}' is missing or empty; task '{spec.name}' needs an aspect")
            aspect = aspect.strip()
        return Example(id=ident, text=text.strip(), label=spec.labels.index(label), aspect=aspect)

    def answer_text(self, spec: TaskSpec, example: Example) -> str:
        return spec.answers[example.label]

    def answer_stats(self, spec: TaskSpec, train: list[Example]) -> tuple[list[int], dict]:
        return [e.label for e in train], {}

    def majority_key(self, spec: TaskSpec, example: Example) -> int:
        return example.label

    def weak_label(self, spec: TaskSpec, example: Example) -> str:
        return spec.labels[example.label]

    def corpus_answer(self, spec: TaskSpec, rng, examples: list[Example]) -> str:
        """A label word drawn uniformly: the tiny base learns the answer format, not the label."""
        return rng.choice(spec.answers)
