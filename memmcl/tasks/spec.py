"""What a task is: a frozen `TaskSpec` loaded from YAML, and the `Example` record every reader returns."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

from memmcl.tasks.fields import (  # noqa: F401  (re-exported: the names a task spec uses)
    DATA_DIR_ENV,
    DATA_PREFIX,
    EMBEDDED_PREFIX,
    FORMATS,
    GROUPS,
    KEYS,
    NAME_RULE,
    STRING_FIELDS,
    TASK_NAME,
    SpecLoader,
    TaskError,
    check_fields,
    check_size,
    default_data_dirs,
    resolve_data_dir,
    split_entry,
)
from memmcl.tasks.kinds import DEFAULT_KIND, TaskKind, kind_class, kind_keys, task_kind_class

Group = Literal["SC", "ABSA", "MAST"]

@dataclass(frozen=True)
class Example:
    """One labelled input. `label` indexes `TaskSpec.labels` (0 for extraction); `aspect` is the aspect term or stance
    target; `tuples` the gold tuples of an extraction task (`memmcl.tasks.extraction`)."""

    id: str
    text: str
    label: int
    aspect: str | None = None
    tuples: tuple[tuple[str, ...], ...] | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A sentiment task: its name (`TASK_NAME`), group, ordered labels with their answer words, instruction, file
    format and splits, its standard metric, and its task kind (`memmcl.tasks.kinds`: classification unless given),
    which holds the fields only that kind reads."""

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
    aliases: dict[str, str] = field(default_factory=dict, hash=False)  # label value in a file -> label
    split_options: dict[str, dict] = field(default_factory=dict, hash=False)  # split -> its own format / fields
    metric: str | None = None  # None: the kind's default metric; its `check_metric` says which it takes
    task_kind: TaskKind = field(default=None, hash=False)  # None: the default kind (classification)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TASK_NAME.fullmatch(self.name):
            raise TaskError(f"{self.source}: field 'name' is {self.name!r}; expected a task name of {NAME_RULE}")
        if self.task_kind is None:
            object.__setattr__(self, "task_kind", kind_class(DEFAULT_KIND)())
        if self.metric is None:
            object.__setattr__(self, "metric", self.task_kind.default_metric)

    @property
    def kind(self) -> str:
        return self.task_kind.name

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    def split_path(self, split: str) -> Path:
        """Returns the file (or folder) of a split; `embedded:` paths point into the package's embedded suite."""
        if split not in self.splits:
            raise TaskError(f"{self.source}: task '{self.name}' has no split '{split}'; it has {sorted(self.splits)}")
        raw = self.splits[split]
        if raw.startswith(DATA_PREFIX):
            raise TaskError(
                f"{self.source}: split '{split}' of task '{self.name}' is in the data folder ('{raw}'), but no data folder "
                f"is set and none of {[str(d) for d in default_data_dirs()]} exists; build one from the public corpora "
                f"(memmcl data fetch --dest sources && memmcl data build --source sources --out realdata) and set "
                f"data_dir (pipeline `data_dir`, `--data.init_args.data_dir`, make demo-real DATA_DIR=realdata) or "
                f"${DATA_DIR_ENV}")
        if raw.startswith(EMBEDDED_PREFIX):
            return Path(str(resources.files("memmcl.tasks") / "embedded" / raw[len(EMBEDDED_PREFIX) :]))
        return Path(raw)  # resolved (relative to the spec file, `~` expanded) when the spec was read

    def data_hash(self, splits: tuple[str, ...]) -> str:
        """Returns a short hash of the contents of the given splits' files (the data a phase consumed)."""
        digest = hashlib.sha256()
        for split in splits:
            if split in self.splits:
                path = self.split_path(split)
                for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
                    if f.is_file():
                        digest.update(f.read_bytes())
        return digest.hexdigest()[:16]

    def for_split(self, split: str) -> TaskSpec:
        """Returns the spec as it reads one split: that split's own `format` / `fields` where it sets them."""
        options = self.split_options.get(split)
        if not options:
            return self
        fields = options.get("fields") or {}
        return dataclasses.replace(
            self, format=options.get("format", self.format), text_field=fields.get("text", self.text_field),
            label_field=fields.get("label", self.label_field), aspect_field=fields.get("aspect", self.aspect_field),
            id_field=fields.get("id", self.id_field), split_options={})

    def to_dict(self) -> dict:
        """Returns the spec as the plain mapping `spec_from_dict` reads (saved beside each trained expert)."""
        splits = {}
        for k, v in self.splits.items():
            # Paths are resolved, so the mapping stays valid wherever it is saved and whatever the working directory.
            path = v if v.startswith(EMBEDDED_PREFIX) else str(self.split_path(k))
            splits[k] = {"path": path, **self.split_options[k]} if self.split_options.get(k) else path
        out = {
            "name": self.name,
            "group": self.group,
            "instruction": self.instruction,
            "labels": dict(zip(self.labels, self.answers, strict=True)),
            "format": self.format,
            "fields": {"text": self.text_field, "label": self.label_field, "aspect": self.aspect_field, "id": self.id_field},
            "aspect_name": self.aspect_name,
            "splits": splits,
        }
        if self.aliases:
            out["aliases"] = dict(self.aliases)
        if self.metric != self.task_kind.default_metric:
            out["metric"] = self.metric
        self.task_kind.to_dict(out)
        if self.format == "semeval_xml":  # (extraction tasks read no XML)
            out.update(semeval_unit=self.semeval_unit, keep_conflict=self.keep_conflict)
        return out


def check_strings(data: dict, keys: tuple[str, ...], source: str) -> None:
    for key in keys:
        if key in data and data[key] is not None and not isinstance(data[key], str):
            raise TaskError(f"{source}: field '{key}' is a {type(data[key]).__name__}; expected a string")


def spec_from_dict(data: dict, source: str = "<memory>", data_dir: str | os.PathLike | None = None) -> TaskSpec:
    """Returns a validated `TaskSpec` from a YAML mapping; errors name `source` and the field.

    Split paths are resolved here: relative ones against the spec file's folder, `data:` ones inside the data folder
    (`resolve_data_dir(data_dir)`), so a spec reads the same files from any working directory.
    """
    owners = kind_keys()
    if not isinstance(data, dict):
        raise TaskError(f"{source}: expected a mapping with fields {sorted(KEYS | set(owners))}, got {type(data).__name__}")
    unknown = set(data) - KEYS - set(owners)
    if unknown:
        raise TaskError(f"{source}: unknown field(s) {sorted(unknown)}; expected some of {sorted(KEYS | set(owners))}")
    check_size(data, source)
    for key in ("name", "group", "instruction", "labels", "splits"):
        if not data.get(key):
            raise TaskError(f"{source}: field '{key}' is missing or empty")
    check_strings(data, STRING_FIELDS, source)
    kind = task_kind_class(data.get("kind", DEFAULT_KIND), source)
    check_strings(data, kind.string_keys, source)
    if isinstance(data["name"], bool) or not isinstance(data["name"], str | int):
        raise TaskError(f"{source}: field 'name' is a {type(data['name']).__name__}; expected a task name of {NAME_RULE}")
    if data["group"] not in GROUPS:
        raise TaskError(f"{source}: field 'group' is '{data['group']}'; expected one of {list(GROUPS)}")
    fmt = data.get("format", "jsonl")
    if fmt not in FORMATS:
        raise TaskError(f"{source}: field 'format' is '{fmt}'; expected one of {list(FORMATS)}")
    kind.check_format(fmt, f"{source}: field 'format'", str(data["name"]))
    foreign = sorted(k for k in data if k in owners and kind.name not in owners[k])
    if foreign:
        owner = owners[foreign[0]][0]
        raise TaskError(f"{source}: field(s) {foreign} belong to {' / '.join(owners[foreign[0]])} tasks; set kind: {owner}")
    labels = data["labels"]
    if not isinstance(labels, dict) or len(labels) < 2:
        raise TaskError(f"{source}: field 'labels' must map at least two label names to answer words")
    for key, value in labels.items():
        if isinstance(key, dict | list) or isinstance(value, dict | list):
            raise TaskError(f"{source}: field 'labels': {key!r} maps to a {type(value).__name__}; expected label "
                            f"name: answer word")
        if isinstance(key, bool) or isinstance(value, bool):
            raise TaskError(f"{source}: field 'labels': {key!r}: {value!r} holds a YAML boolean, not a word; "
                            f"quote label names and answer words ('yes': 'yes')")
    answers = [str(a).strip() for a in labels.values()]
    if any(not a for a in answers) or len(set(answers)) != len(answers):
        raise TaskError(f"{source}: field 'labels': answer words must be non-empty and distinct, got {answers}")
    if not isinstance(data["splits"], dict):
        raise TaskError(f"{source}: field 'splits' must map split names (train, validation, test) to files")
    fields = check_fields(data.get("fields") or {}, f"{source}: field 'fields'")
    label_names = [str(k) for k in labels]
    aliases = data.get("aliases") or {}
    if not isinstance(aliases, dict):
        raise TaskError(f"{source}: field 'aliases' must map label values found in files to label names")
    for alias, target in aliases.items():
        if isinstance(alias, bool) or str(target) not in label_names:
            raise TaskError(f"{source}: field 'aliases': {alias!r} -> {target!r}; expected a quoted value -> one of {label_names}")
    metric = str(data.get("metric", kind.default_metric))
    kind.check_metric(metric, label_names, source)
    folder = resolve_data_dir(data_dir)
    splits = {str(k): split_entry(str(k), v, source, folder) for k, v in data["splits"].items()}
    for k, (_, options) in splits.items():
        if "format" in options:
            kind.check_format(options["format"], f"{source}: field 'splits.{k}.format'", str(data["name"]))
    aspect_field = fields.get("aspect")
    return TaskSpec(
        name=str(data["name"]),
        group=data["group"],
        labels=tuple(label_names),
        answers=tuple(answers),
        instruction=str(data["instruction"]).strip(),
        splits={k: path for k, (path, _) in splits.items()},
        format=fmt,
        text_field=fields.get("text", "text"),
        label_field=fields.get("label", "label"),
        aspect_field="aspect" if fmt == "semeval_xml" else aspect_field,
        id_field=fields.get("id", "id"),
        aspect_name=str(data.get("aspect_name", "Aspect")),
        semeval_unit=data.get("semeval_unit", "term"),
        keep_conflict=bool(data.get("keep_conflict", False)),
        source=source,
        aliases={str(k): str(v) for k, v in aliases.items()},
        split_options={k: options for k, (_, options) in splits.items() if options},
        metric=metric,
        task_kind=kind.from_fields(data, source, label_names),
    )


def task_config_dir() -> Path:
    """Returns the folder of the shipped task specs (`configs/tasks`, installed as `memmcl.configs`)."""
    return Path(str(resources.files("memmcl.configs") / "tasks"))


def embedded_task_names() -> list[str]:
    """Returns the names of the shipped task specs, sorted."""
    return sorted(p.stem for p in task_config_dir().glob("*.yaml"))


def load_task_spec(name_or_path: str, data_dir: str | os.PathLike | None = None) -> TaskSpec:
    """Returns the spec for a shipped task name (`sc_binary`) or a path to a task YAML file."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        raise TaskError(f"{path}: a folder, not a task spec file; expected a YAML file or a shipped task name")
    if not path.suffix:
        path = task_config_dir() / f"{name_or_path}.yaml"
        if not path.exists():
            raise TaskError(f"task '{name_or_path}': not a YAML file and not a shipped task; shipped: {embedded_task_names()}")
    if not path.exists():
        raise TaskError(f"{path}: no such task spec file")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=SpecLoader)
    except yaml.YAMLError as err:
        raise TaskError(f"{path}: not valid YAML ({err})") from err
    return spec_from_dict(data, source=str(path), data_dir=data_dir)


def load_task_specs(names: list[str | TaskSpec], data_dir: str | os.PathLike | None = None) -> list[TaskSpec]:
    """Returns the specs for several tasks (names, paths or specs); two tasks with one name is an error naming both sources."""
    specs = [n if isinstance(n, TaskSpec) else load_task_spec(n, data_dir) for n in names]
    seen: dict[str, TaskSpec] = {}
    for spec in specs:
        if spec.name in seen:
            raise TaskError(f"two tasks are named '{spec.name}': {seen[spec.name].source} and {spec.source}")
        seen[spec.name] = spec
    return specs
