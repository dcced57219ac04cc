"""File formats our users have, each read into the same `Example` records: JSONL/JSON, CSV/TSV, SemEval-2014 ABSA XML,
TweetEval-style folders. Every error names the file and line (or item / sentence id) and what was expected."""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

from memmcl.tasks.spec import FORMATS, Example, TaskError, TaskSpec

log = logging.getLogger(__name__)


def read_text(path: Path) -> str:
    """Returns a file's text as UTF-8 (a leading byte-order mark, as Excel writes, is dropped); a byte that is not
    UTF-8 is an error naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise TaskError(f"{path}:{line}: byte 0x{data[err.start]:02x} is not UTF-8; expected a UTF-8 text file "
                        f"(re-save it as UTF-8)") from None


def _record(spec: TaskSpec, row: dict, where: str, default_id: str) -> Example:
    """Returns an Example from one mapping row, checking text, label and aspect."""
    if not isinstance(row, dict):
        raise TaskError(f"{where}: expected an object with field '{spec.text_field}', got {type(row).__name__}")
    text = row.get(spec.text_field)
    if not isinstance(text, str) or not text.strip():
        raise TaskError(f"{where}: field '{spec.text_field}' is missing or empty; expected non-empty text")
    ident = row.get(spec.id_field) if spec.id_field else None
    ident = str(ident) if ident is not None else default_id
    return spec.task_kind.example(spec, row, text, ident, where)  # its answer, as the task's kind reads it


def read_jsonl(spec: TaskSpec, path: Path) -> Iterator[Example]:
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from err
        yield _record(spec, row, f"{path}:{lineno}", f"{spec.name}-{lineno}")


def read_json(spec: TaskSpec, path: Path) -> Iterator[Example]:
    try:
        rows = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise TaskError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from err
    if not isinstance(rows, list):
        raise TaskError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        yield _record(spec, row, f"{path}: item {i}", f"{spec.name}-{i}")


def _read_delimited(spec: TaskSpec, path: Path, delimiter: str) -> Iterator[Example]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter=delimiter)
    columns = [c for c in (spec.text_field, spec.label_field, spec.aspect_field) if c]
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise TaskError(f"{path}:1: header {reader.fieldnames} has no column(s) {missing}; set the task's 'fields'")
    try:
        for row in reader:
            yield _record(spec, row, f"{path}:{reader.line_num}", f"{spec.name}-{reader.line_num}")
    except csv.Error as err:  # e.g. a field over csv.field_size_limit(), a NUL byte
        raise TaskError(f"{path}:{reader.line_num + 1}: not a readable {spec.format.upper()} row ({err})") from None


def read_csv(spec: TaskSpec, path: Path) -> Iterator[Example]:
    return _read_delimited(spec, path, ",")


def read_tsv(spec: TaskSpec, path: Path) -> Iterator[Example]:
    return _read_delimited(spec, path, "\t")


def read_semeval_xml(spec: TaskSpec, path: Path) -> Iterator[Example]:
    """SemEval-2014 Task 4 XML: one example per aspect term (or category); `conflict` kept only if the spec says so."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        line, col = err.position
        raise TaskError(f"{path}:{line}: malformed XML at column {col}") from err
    tag, attr = ("aspectTerm", "term") if spec.semeval_unit == "term" else ("aspectCategory", "category")
    for sentence in root.iter("sentence"):
        sid = sentence.get("id", "?")
        where = f"{path}: sentence id={sid}"
        text_el = sentence.find("text")
        text = text_el.text if text_el is not None else None
        for k, unit in enumerate(sentence.iter(tag)):
            polarity = unit.get("polarity")
            if polarity == "conflict" and not spec.keep_conflict:
                continue
            row = {spec.text_field: text, spec.label_field: polarity, "aspect": unit.get(attr), spec.id_field or "id": f"{sid}-{k}"}
            yield _record(spec, row, where, f"{sid}-{k}")


_TWEETEVAL_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}


def read_tweeteval(spec: TaskSpec, path: Path, split: str) -> Iterator[Example]:
    """TweetEval folder: `{split}_text.txt`, `{split}_labels.txt` (integers) and `mapping.txt` (`0<TAB>name`).

    A stance folder holds one such folder per target (`stance/abortion/...`) with `mapping.txt` one level up: every
    target's examples are read, with the folder name as their aspect (the stance target).
    """
    prefix = _TWEETEVAL_SPLITS.get(split, split)
    if not (path / f"{prefix}_text.txt").exists():
        targets = sorted(d for d in path.iterdir() if (d / f"{prefix}_text.txt").exists()) if path.is_dir() else []
        if targets:
            if not spec.aspect_field:
                raise TaskError(f"{path}: a TweetEval folder of targets {[d.name for d in targets]}; task '{spec.name}' "
                                f"needs fields.aspect to keep each example's target")
            for folder in targets:
                yield from _read_tweeteval_folder(spec, folder, prefix, target=folder.name)
            return
    yield from _read_tweeteval_folder(spec, path, prefix)


def _read_tweeteval_folder(spec: TaskSpec, path: Path, prefix: str, target: str | None = None) -> Iterator[Example]:
    text_file, label_file = path / f"{prefix}_text.txt", path / f"{prefix}_labels.txt"
    mapping_file = path / "mapping.txt" if (path / "mapping.txt").exists() or target is None else path.parent / "mapping.txt"
    for f in (text_file, label_file, mapping_file):
        if not f.exists():
            raise TaskError(f"{f}: missing; a TweetEval folder needs {prefix}_text.txt, {prefix}_labels.txt and mapping.txt")
    mapping = {}
    for lineno, line in enumerate(read_text(mapping_file).splitlines(), 1):
        if line.strip():
            parts = line.split("\t")
            if len(parts) != 2:
                raise TaskError(f"{mapping_file}:{lineno}: expected '<id><TAB><label>', got {line!r}")
            mapping[parts[0].strip()] = parts[1].strip()
    texts = read_text(text_file).splitlines()
    labels = read_text(label_file).splitlines()
    if len(texts) != len(labels):
        raise TaskError(f"{label_file}: {len(labels)} lines, but {text_file.name} has {len(texts)}; expected one label per text")
    id_prefix = f"{target}-{prefix}" if target else prefix
    for lineno, (text, raw) in enumerate(zip(texts, labels, strict=True), 1):
        if raw.strip() not in mapping:
            raise TaskError(f"{label_file}:{lineno}: label id '{raw.strip()}' is not in {mapping_file.name} {sorted(mapping)}")
        row = {spec.text_field: text, spec.label_field: mapping[raw.strip()], spec.id_field or "id": f"{id_prefix}-{lineno}"}
        if target is not None:
            row[spec.aspect_field] = target
        yield _record(spec, row, f"{text_file}:{lineno}", f"{id_prefix}-{lineno}")


def read_absa_lines(spec: TaskSpec, path: Path) -> Iterator[Example]:
    """The line format of the public generative-ABSA corpora: `sentence####[tuples]`, tuples of words or of token
    indices (`([2], [5], 'NEG')`); a line with more `####` parts (tags) takes the first as the sentence and the last as
    the tuples. Extraction tasks only (`memmcl.tasks.kinds.FORMAT_KINDS`)."""
    spec.task_kind.check_format("absa_lines", f"{path}: format", spec.name)
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("####")
        if len(parts) < 2:
            raise TaskError(f"{path}:{lineno}: expected 'sentence####[tuples]', got {line[:80]!r}")
        row = {spec.text_field: parts[0], spec.label_field: parts[-1], spec.id_field or "id": f"{spec.name}-{lineno}"}
        yield _record(spec, row, f"{path}:{lineno}", f"{spec.name}-{lineno}")


READERS: dict[str, Callable[[TaskSpec, Path], Iterator[Example]]] = {
    "absa_lines": read_absa_lines,
    "jsonl": read_jsonl,
    "json": read_json,
    "csv": read_csv,
    "tsv": read_tsv,
    "semeval_xml": read_semeval_xml,
}
assert set(READERS) | {"tweeteval"} == set(FORMATS)


def read_split(spec: TaskSpec, split: str) -> list[Example]:
    """Returns all examples of one split (read with the split's own format and fields, if it sets them); a missing
    file or an empty split is an error naming the file."""
    path = spec.split_path(split)
    spec = spec.for_split(split)
    if not path.exists():
        raise TaskError(f"{path}: no such file for split '{split}' of task '{spec.name}' ({spec.source})")
    if path.is_dir() and spec.format != "tweeteval":
        raise TaskError(f"{path}: a folder, given as split '{split}' of task '{spec.name}' ({spec.source}); expected a "
                        f"{spec.format} file")
    examples = list(read_tweeteval(spec, path, split) if spec.format == "tweeteval" else READERS[spec.format](spec, path))
    if not examples:
        raise TaskError(f"{path}: split '{split}' of task '{spec.name}' is empty; expected at least one example")
    return examples


def stratified_sample(examples: list[Example], n: int | None, seed: int = 0) -> list[Example]:
    """Returns n examples drawn per label in proportion to the label counts (largest remainders, seeded), in their
    original order; all of them when n is None or not smaller. A label-sorted file capped this way keeps its mix."""
    if n is None or len(examples) <= n:
        return list(examples)
    by_label: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        by_label.setdefault(e.label, []).append(i)
    exact = {label: n * len(idx) / len(examples) for label, idx in by_label.items()}
    quota = {label: int(q) for label, q in exact.items()}
    for label in sorted(exact, key=lambda k: (quota[k] - exact[k], k))[: n - sum(quota.values())]:
        quota[label] += 1
    rng = random.Random(seed)
    chosen = sorted(i for label in sorted(by_label) for i in rng.sample(by_label[label], quota[label]))
    return [examples[i] for i in chosen]


_LEAKS_LOGGED: set[tuple[str, int]] = set()


def find_leakage(train: list[Example], test: list[Example]) -> list[Example]:
    """Returns the test examples whose (text, aspect) also stands in train, exactly."""
    seen = {(e.text, e.aspect) for e in train}
    return [e for e in test if (e.text, e.aspect) in seen]


def read_task(spec: TaskSpec, splits: tuple[str, ...] = ("train", "validation", "test")) -> tuple[dict[str, list[Example]], int]:
    """Returns every requested split that the spec names, and how many test examples also stand in train.

    Such duplicates are logged with their count and first examples, once per task and process (every phase reads
    the data again), so leakage is never silent and never repeated.
    """
    data = {s: read_split(spec, s) for s in splits if s in spec.splits}
    leaked = find_leakage(data["train"], data["test"]) if "train" in data and "test" in data else []
    if leaked and (spec.name, len(leaked)) not in _LEAKS_LOGGED:
        _LEAKS_LOGGED.add((spec.name, len(leaked)))
        first = "; ".join(repr(e.text[:60]) for e in leaked[:3])
        log.warning("task '%s': %d test example(s) also stand in train, e.g. %s", spec.name, len(leaked), first)
    return data, len(leaked)
