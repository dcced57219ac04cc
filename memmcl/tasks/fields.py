"""The fields of a task spec file: names, formats, metrics and limits, the data folder, the YAML dialect, and the
checks of each field (`memmcl.tasks.spec.spec_from_dict` assembles them into a `TaskSpec`). Every error is a
`TaskError` naming the spec file and the field."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

GROUPS: tuple[str, ...] = ("SC", "ABSA", "MAST")
FORMATS: tuple[str, ...] = ("jsonl", "json", "csv", "tsv", "semeval_xml", "tweeteval", "absa_lines")
KINDS: tuple[str, ...] = ("classification", "extraction")
# A task's standard metric: accuracy, macro-F1, F1 of one label `f1(irony)`, the mean F1 of labels
# `mean_f1(against, favor)`, or exact-match micro-F1 over tuples (extraction tasks).
METRIC = re.compile(r"accuracy|macro_f1|tuple_f1|(f1|mean_f1)\(([^()]+)\)")
EMBEDDED_PREFIX = "embedded:"
DATA_PREFIX = "data:"  # a split path inside the data folder (`data_dir` setting, $MEMMCL_DATA_DIR, ../shared/realdata)
DATA_DIR_ENV = "MEMMCL_DATA_DIR"
SPLIT_KEYS = {"path", "format", "fields"}
# A task's name names its folder and files in a run directory (experts/<name>, weak/<name>.jsonl): never a path.
TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
NAME_RULE = "letters, digits, '_', '-', '.' (not leading '.' or '-')"


def default_data_dirs() -> list[Path]:
    """Returns where the data folder is looked for when no `data_dir` is set: ../shared/realdata beside the working
    directory, then beside the project's checkout."""
    return [Path.cwd().parent / "shared" / "realdata", Path(__file__).resolve().parents[3] / "shared" / "realdata"]


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """Returns the data folder: `data_dir`, else $MEMMCL_DATA_DIR, else the first default that exists (None if none)."""
    if data_dir is not None:
        return Path(data_dir).expanduser().resolve()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser().resolve()
    return next((d.resolve() for d in default_data_dirs() if d.is_dir()), None)


class TaskError(ValueError):
    """Bad task input; the message names the file, line or field and what was expected."""



KEYS = {"name", "group", "instruction", "labels", "aliases", "format", "fields", "aspect_name", "splits", "semeval_unit",
         "keep_conflict", "kind", "metric", "slots", "file_slots", "spans", "nullable", "slot_values", "unmatched_spans"}


# Fields that hold one word or sentence, and a bound on the size of a whole spec: a YAML alias expanded many times
# over (a "billion laughs" mapping inside a field) is an error naming the field, never a gigabyte string.
STRING_FIELDS = ("group", "instruction", "format", "aspect_name", "semeval_unit", "kind", "metric", "unmatched_spans")
MAX_SPEC_NODES = 10_000
MAX_SPEC_CHARS = 100_000


def check_size(data: dict, source: str) -> None:
    """Fails, naming the top-level field, when the spec (aliases counted each time they are used) holds more than
    `MAX_SPEC_NODES` values or `MAX_SPEC_CHARS` characters of text."""
    nodes = chars = 0
    for key, value in data.items():
        stack = [value]
        while stack:
            item = stack.pop()
            nodes += 1
            if isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, list | tuple):
                stack.extend(item)
            else:
                chars += len(str(item)) if isinstance(item, str | bytes) else 0
            if nodes > MAX_SPEC_NODES or chars > MAX_SPEC_CHARS:
                raise TaskError(f"{source}: field '{key}' is too large (over {MAX_SPEC_NODES} values or "
                                f"{MAX_SPEC_CHARS} characters in the spec, YAML aliases counted each time); expected a "
                                f"task spec, not a data file")


def default_metric(kind: str) -> str:
    return "tuple_f1" if kind == "extraction" else "accuracy"


def names_field(data: dict, key: str, source: str) -> tuple[str, ...]:
    value = data.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise TaskError(f"{source}: field '{key}' must be a list of slot names, got {value!r}")
    return tuple(v.strip() for v in value)


def extraction_fields(data: dict, source: str, labels: list[str]) -> dict:
    """Returns the checked extraction fields (kind, metric, slots, file_slots, spans, nullable, slot_values) of a spec."""
    kind = data.get("kind", "classification")
    if kind not in KINDS:
        raise TaskError(f"{source}: field 'kind' is {kind!r}; expected one of {list(KINDS)}")
    metric = str(data.get("metric", default_metric(kind)))
    m = METRIC.fullmatch(metric)
    if m is None or (kind == "extraction") != (metric == "tuple_f1"):
        allowed = "tuple_f1" if kind == "extraction" else "accuracy, macro_f1, f1(<label>), mean_f1(<label>, ...)"
        raise TaskError(f"{source}: field 'metric' is {metric!r}; a {kind} task takes {allowed}")
    if m.group(2) and any(n.strip() not in labels for n in m.group(2).split(",")):
        raise TaskError(f"{source}: field 'metric' is {metric!r}; its labels must be among {labels}")
    extraction_keys = sorted(k for k in ("slots", "file_slots", "spans", "nullable", "slot_values", "unmatched_spans")
                             if k in data)
    if kind != "extraction":
        if extraction_keys:
            raise TaskError(f"{source}: field(s) {extraction_keys} belong to extraction tasks; set kind: extraction")
        return {"kind": kind, "metric": metric}
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
    return {"kind": kind, "metric": metric, "slots": slots, "file_slots": file_slots, "spans": spans,
            "unmatched_spans": unmatched,
            "nullable": nullable, "slot_values": {k: tuple(str(x) for x in v) for k, v in values.items()}}


def check_fields(fields, where: str) -> dict:
    if not isinstance(fields, dict):
        raise TaskError(f"{where}: expected a mapping of text, label, aspect, id to column names")
    unknown = set(fields) - {"text", "label", "aspect", "id"}
    if unknown:
        raise TaskError(f"{where} has unknown key(s) {sorted(unknown)}; expected text, label, aspect, id")
    return fields


def split_entry(split: str, entry, source: str, data_dir: Path | None) -> tuple[str, dict]:
    """Returns (resolved path, own format/fields) of one `splits` entry: a path, or {path, format, fields}."""
    where = f"{source}: field 'splits.{split}'"
    options = {}
    if isinstance(entry, dict):
        unknown = set(entry) - SPLIT_KEYS
        if unknown or "path" not in entry:
            raise TaskError(f"{where}: expected a path or a mapping with 'path' and optional 'format', 'fields'; "
                            f"got keys {sorted(entry)}")
        if "format" in entry:
            if entry["format"] not in FORMATS:
                raise TaskError(f"{where}.format is '{entry['format']}'; expected one of {list(FORMATS)}")
            options["format"] = entry["format"]
        if "fields" in entry:
            options["fields"] = dict(check_fields(entry["fields"], f"{where}.fields"))
        entry = entry["path"]
    if not isinstance(entry, str) or not entry.strip():
        raise TaskError(f"{where}: expected a file or folder path, got {entry!r}")
    if entry.startswith(EMBEDDED_PREFIX):
        return entry, options
    if entry.startswith(DATA_PREFIX):
        return (str(data_dir / entry[len(DATA_PREFIX) :]) if data_dir is not None else entry), options
    path = Path(entry).expanduser()
    if not path.is_absolute() and source != "<memory>":
        path = (Path(source).parent / path).resolve()
    return str(path), options



class SpecLoader(yaml.SafeLoader):
    """YAML as task specs mean it: `yes`, `no`, `on`, `off` stay words (YAML 1.2); only true/false are booleans."""


SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
SpecLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
