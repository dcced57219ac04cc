"""Weak data: the training examples an expert gets wrong, written as JSONL, never touching test data.

Each weak file is a validation-only task (`weak_spec`) the merge search scores with the shared label scorer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
from pathlib import Path

from memmcl.tasks.readers import read_split
from memmcl.tasks.spec import Example, TaskSpec

log = logging.getLogger(__name__)


class WeakDataError(ValueError):
    """Weak data that would leak test examples, or cannot be built; the message names the task and what happened."""


def content_hash(text: str, aspect: str | None) -> str:
    return hashlib.sha256(json.dumps([text.strip(), aspect]).encode()).hexdigest()


def test_hashes(spec: TaskSpec) -> set[str]:
    """Returns the content hashes of a task's test split (empty when it has none)."""
    if "test" not in spec.splits:
        return set()
    return {content_hash(e.text, e.aspect) for e in read_split(spec, "test")}


def margin(record: dict) -> float:
    """Returns the gold label's score minus the best other label's: how narrowly the expert got an example right."""
    scores = record["scores"]
    gold = scores[record["gold"]]
    return gold - max(v for k, v in scores.items() if k != record["gold"])


def gold_loss(record: dict) -> float:
    """Returns -log p(gold) under a softmax over the labels' scores: the expert's loss on one example."""
    scores = list(record["scores"].values())
    top = max(scores)
    log_z = top + math.log(sum(math.exp(v - top) for v in scores))
    return log_z - record["scores"][record["gold"]]


def select_weak(
    spec: TaskSpec,
    train: list[Example],
    records: list[dict],
    min_examples: int = 32,
    seed: int = 0,
    max_examples: int | None = None,
    on_test_overlap: str = "error",
    anchor_ratio: float = 0.0,
) -> tuple[list[dict], dict]:
    """Returns (weak rows, summary) from an expert's predictions on its own training split.

    The weak rows are the mispredicted training examples. A well-fitted expert gets nearly all of its training data
    right, and a fitness over one or two examples is noise, so when there are fewer than `min_examples`, the
    correctly predicted examples with the smallest margin (gold score minus the best other label's) top them up;
    the summary counts both kinds. `max_examples` caps the rows by a seeded sample. Any row whose content matches a
    test example is an error (or is dropped, with `on_test_overlap="drop"`): test data never enters weak data.
    """
    by_id = {e.id: e for e in train}
    if len(by_id) != len(train):
        raise WeakDataError(f"task '{spec.name}': training ids are not unique; weak data needs one id per example")
    unknown = [r["id"] for r in records if r["id"] not in by_id]
    if unknown:
        raise WeakDataError(f"task '{spec.name}': prediction for id '{unknown[0]}' is not a training example")
    wrong = sorted((r for r in records if r["prediction"] != r["gold"]), key=lambda r: r["id"])
    right = sorted((r for r in records if r["prediction"] == r["gold"]), key=lambda r: (margin(r), r["id"]))
    top_up = right[: max(min_examples - len(wrong), 0)]
    if top_up:
        log.info("task '%s': %d mispredicted training example(s); topped up with the %d lowest-margin correct ones",
                 spec.name, len(wrong), len(top_up))
    chosen = wrong + top_up
    if max_examples is not None and len(chosen) > max_examples:
        chosen = random.Random(seed).sample(chosen, max_examples)
    taken = {r["id"] for r in chosen}
    rest = [r for r in right if r["id"] not in taken]
    anchors = random.Random(seed + 1).sample(rest, min(len(rest), round(anchor_ratio * len(chosen)))) if anchor_ratio > 0 else []
    chosen = chosen + anchors
    rows = []
    for r in sorted(chosen, key=lambda r: r["id"]):
        e = by_id[r["id"]]
        rows.append({"id": e.id, "text": e.text, "aspect": e.aspect, "label": spec.labels[e.label],
                     "prediction": r["prediction"], "margin": margin(r), "hash": content_hash(e.text, e.aspect)})
    test = test_hashes(spec)
    overlap = [row for row in rows if row["hash"] in test]
    if overlap:
        if on_test_overlap != "drop":
            raise WeakDataError(
                f"task '{spec.name}': {len(overlap)} weak example(s) have the same content as test examples "
                f"(e.g. id '{overlap[0]['id']}'); deduplicate train against test, or set on_test_overlap: drop "
                f"(pipeline: merge.on_test_overlap)")
        log.warning("task '%s': dropped %d weak example(s) that duplicate test examples", spec.name, len(overlap))
        rows = [row for row in rows if row["hash"] not in test]
    summary = {"train": len(train), "wrong": len(wrong), "low_margin": len(top_up), "anchors": len(anchors), "weak": len(rows),
               "test_overlap_dropped": len(overlap)}
    return rows, summary


def weak_spec(spec: TaskSpec, path: Path) -> TaskSpec:
    """Returns the task with its weak data as the only (validation) split, in the JSONL layout `select_weak` returns."""
    return dataclasses.replace(
        spec, splits={"validation": str(Path(path).resolve())}, format="jsonl", text_field="text", label_field="label",
        aspect_field="aspect" if spec.aspect_field else None, id_field="id", source=str(path))


def check_no_test_content(spec: TaskSpec, path: Path) -> None:
    """Fails if a weak file holds any test example's content (checked again where fitness reads it)."""
    hashes = test_hashes(spec)
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        row = json.loads(line)
        if content_hash(row["text"], row.get("aspect")) in hashes:
            raise WeakDataError(f"{path}:{n}: weak example '{row['id']}' has the content of a test example of '{spec.name}'")
