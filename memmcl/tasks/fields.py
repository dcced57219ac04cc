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



# The fields every task kind reads; a kind's own fields are its `keys` (`memmcl.tasks.kinds`).
KEYS = {"name", "group", "instruction", "labels", "aliases", "format", "fields", "aspect_name", "splits", "semeval_unit",
        "keep_conflict", "kind", "metric"}


# Fields that hold one word or sentence, and a bound on the size of a whole spec: a YAML alias expanded many times
# over (a "billion laughs" mapping inside a field) is an error naming the field, never a gigabyte string.
STRING_FIELDS = ("group", "instruction", "format", "aspect_name", "semeval_unit", "kind", "metric")
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
