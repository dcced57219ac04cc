"""What a task is: a frozen `TaskSpec` loaded from YAML, and the `Example` record every reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

Group = Literal["SC", "ABSA", "MAST"]
GROUPS: tuple[str, ...] = ("SC", "ABSA", "MAST")
FORMATS: tuple[str, ...] = ("jsonl", "json", "csv", "tsv", "semeval_xml", "tweeteval")
EMBEDDED_PREFIX = "embedded:"


class TaskError(ValueError):
    """Bad task input; the message names the file, line or field and what was expected."""


@dataclass(frozen=True)
class Example:
    """One labelled input. `label` indexes `TaskSpec.labels`; `aspect` is the aspect term or stance target."""

    id: str
    text: str
    label: int
    aspect: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A sentiment task: its group, ordered labels with their answer words, instruction, file format and splits."""

    name: str
    group: Group
    labels: tuple[str, ...]
    answers: tuple[str, ...]
    instruction: str
    splits: dict[str, str] = field(hash=False)
    format: str = "jsonl"
    text_field: str = "text"
    label_field: str = "label"
    aspect_field: str | None = None
    id_field: str | None = "id"
    aspect_name: str = "Aspect"
    semeval_unit: Literal["term", "category"] = "term"
    keep_conflict: bool = False
    source: str = "<memory>"

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    def split_path(self, split: str) -> Path:
        """Returns the file (or folder) of a split; `embedded:` paths point into the package's embedded suite."""
        if split not in self.splits:
            raise TaskError(f"{self.source}: task '{self.name}' has no split '{split}'; it has {sorted(self.splits)}")
        raw = self.splits[split]
        if raw.startswith(EMBEDDED_PREFIX):
            return Path(str(resources.files("memmcl.tasks") / "embedded" / raw[len(EMBEDDED_PREFIX) :]))
        path = Path(raw).expanduser()
        if not path.is_absolute() and self.source != "<memory>":
            path = Path(self.source).parent / path
        return path

    def to_dict(self) -> dict:
        """Returns the spec as the plain mapping `spec_from_dict` reads (saved beside each trained expert)."""
        out = {
            "name": self.name,
            "group": self.group,
            "instruction": self.instruction,
            "labels": dict(zip(self.labels, self.answers, strict=True)),
            "format": self.format,
            "fields": {"text": self.text_field, "label": self.label_field, "aspect": self.aspect_field, "id": self.id_field},
            "aspect_name": self.aspect_name,
            # Relative paths are resolved, so the mapping stays valid wherever it is saved.
            "splits": {k: v if v.startswith(EMBEDDED_PREFIX) else str(self.split_path(k)) for k, v in self.splits.items()},
        }
        if self.format == "semeval_xml":
            out.update(semeval_unit=self.semeval_unit, keep_conflict=self.keep_conflict)
        return out


_KEYS = {"name", "group", "instruction", "labels", "format", "fields", "aspect_name", "splits", "semeval_unit", "keep_conflict"}


def spec_from_dict(data: dict, source: str = "<memory>") -> TaskSpec:
    """Returns a validated `TaskSpec` from a YAML mapping; errors name `source` and the field."""
    if not isinstance(data, dict):
        raise TaskError(f"{source}: expected a mapping with fields {sorted(_KEYS)}, got {type(data).__name__}")
    unknown = set(data) - _KEYS
    if unknown:
        raise TaskError(f"{source}: unknown field(s) {sorted(unknown)}; expected some of {sorted(_KEYS)}")
    for key in ("name", "group", "instruction", "labels", "splits"):
        if not data.get(key):
            raise TaskError(f"{source}: field '{key}' is missing or empty")
    if data["group"] not in GROUPS:
        raise TaskError(f"{source}: field 'group' is '{data['group']}'; expected one of {list(GROUPS)}")
    fmt = data.get("format", "jsonl")
    if fmt not in FORMATS:
        raise TaskError(f"{source}: field 'format' is '{fmt}'; expected one of {list(FORMATS)}")
    labels = data["labels"]
    if not isinstance(labels, dict) or len(labels) < 2:
        raise TaskError(f"{source}: field 'labels' must map at least two label names to answer words")
    answers = [str(a).strip() for a in labels.values()]
    if any(not a for a in answers) or len(set(answers)) != len(answers):
        raise TaskError(f"{source}: field 'labels': answer words must be non-empty and distinct, got {answers}")
    if not isinstance(data["splits"], dict):
        raise TaskError(f"{source}: field 'splits' must map split names (train, validation, test) to files")
    fields = data.get("fields") or {}
    unknown_fields = set(fields) - {"text", "label", "aspect", "id"}
    if unknown_fields:
        raise TaskError(f"{source}: field 'fields' has unknown key(s) {sorted(unknown_fields)}; expected text, label, aspect, id")
    aspect_field = fields.get("aspect")
    if data["group"] == "ABSA" and not aspect_field and fmt not in ("semeval_xml",):
        raise TaskError(f"{source}: ABSA task needs 'fields.aspect' (the field holding the aspect term)")
    return TaskSpec(
        name=str(data["name"]),
        group=data["group"],
        labels=tuple(str(k) for k in labels),
        answers=tuple(answers),
        instruction=str(data["instruction"]).strip(),
        splits={str(k): str(v) for k, v in data["splits"].items()},
        format=fmt,
        text_field=fields.get("text", "text"),
        label_field=fields.get("label", "label"),
        aspect_field="aspect" if fmt == "semeval_xml" else aspect_field,
        id_field=fields.get("id", "id"),
        aspect_name=str(data.get("aspect_name", "Aspect")),
        semeval_unit=data.get("semeval_unit", "term"),
        keep_conflict=bool(data.get("keep_conflict", False)),
        source=source,
    )


def task_config_dir() -> Path:
    """Returns the folder of the shipped task specs (`configs/tasks`, installed as `memmcl.configs`)."""
    return Path(str(resources.files("memmcl.configs") / "tasks"))


def embedded_task_names() -> list[str]:
    """Returns the names of the shipped task specs, sorted."""
    return sorted(p.stem for p in task_config_dir().glob("*.yaml"))


def load_task_spec(name_or_path: str) -> TaskSpec:
    """Returns the spec for a shipped task name (`sc_binary`) or a path to a task YAML file."""
    path = Path(name_or_path).expanduser()
    if not path.suffix:
        path = task_config_dir() / f"{name_or_path}.yaml"
        if not path.exists():
            raise TaskError(f"task '{name_or_path}': not a YAML file and not a shipped task; shipped: {embedded_task_names()}")
    if not path.exists():
        raise TaskError(f"{path}: no such task spec file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TaskError(f"{path}: not valid YAML ({err})") from err
    return spec_from_dict(data, source=str(path))


def load_task_specs(names: list[str | TaskSpec]) -> list[TaskSpec]:
    """Returns the specs for several tasks (names, paths or specs); two tasks with one name is an error naming both sources."""
    specs = [n if isinstance(n, TaskSpec) else load_task_spec(n) for n in names]
    seen: dict[str, TaskSpec] = {}
    for spec in specs:
        if spec.name in seen:
            raise TaskError(f"two tasks are named '{spec.name}': {seen[spec.name].source} and {spec.source}")
        seen[spec.name] = spec
    return specs
