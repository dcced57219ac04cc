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
from typing import TYPE_CHECKING

import torch
import yaml

from memmcl.experts.expert import gather_records, write_atomic, write_jsonl_atomic
from memmcl.rundir import added_settings, file_problem, file_sha, inside
from memmcl.tasks.kinds import generated_record
from memmcl.tasks.readers import read_split
from memmcl.tasks.spec import Example, TaskSpec

if TYPE_CHECKING:
    import lightning as L

    from memmcl.merging.scorer import MergeScorer

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


def check_task_data(spec: TaskSpec, splits: dict[str, list[Example]], on_test_overlap: str = "error") -> None:
    """What later phases need from a task's data, checked once before the first expert is trained: unique ids in
    every split (weak data and the paired bootstrap key examples by id), and, with `on_test_overlap="error"`, no
    training example (after any `max_train_examples` cap) whose content is a test example's (test data never enters
    weak data; with "drop" such examples are kept out of weak data only)."""
    for split, examples in splits.items():
        seen: set[str] = set()
        for e in examples:
            if e.id in seen:
                raise WeakDataError(f"{spec.source}: split '{split}' of task '{spec.name}' holds id '{e.id}' more than "
                                    f"once; expected one id per example (set fields.id to a unique column, or leave "
                                    f"it out for row numbers)")
            seen.add(e.id)
    if on_test_overlap == "drop" or "train" not in splits:
        return
    test = test_hashes(spec)
    leaked = [e for e in splits["train"] if content_hash(e.text, e.aspect) in test]
    if leaked:
        raise WeakDataError(f"{spec.source}: {len(leaked)} training example(s) of task '{spec.name}' have the content of "
                            f"a test example (e.g. id '{leaked[0].id}'); deduplicate train against test, or set "
                            f"merge.on_test_overlap: drop to keep them out of weak data only")


def margin(record: dict) -> float:
    """Returns the gold label's score minus the best other label's: how narrowly the expert got an example right
    (an extraction record: the gold answer's log-likelihood)."""
    scores = record["scores"]
    if generated_record(record):
        return scores["gold"]
    gold = scores[record["gold"]]
    return gold - max(v for k, v in scores.items() if k != record["gold"])


def gold_loss(record: dict) -> float:
    """Returns -log p(gold) under a softmax over the labels' scores (extraction: of the gold answer): the expert's loss
    on one example."""
    if generated_record(record):
        return -record["scores"]["gold"]
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
        label = spec.task_kind.weak_label(spec, e)
        rows.append({"id": e.id, "text": e.text, "aspect": e.aspect, "label": label,
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
    """Returns the task with its weak data as the only (validation) split, in the JSONL layout `select_weak` returns
    (an extraction task's tuples in answer order)."""
    return dataclasses.replace(
        spec, splits={"validation": str(Path(path).resolve())}, format="jsonl", text_field="text", label_field="label",
        aspect_field="aspect" if spec.aspect_field else None, id_field="id", source=str(path), split_options={},
        task_kind=spec.task_kind.as_written())


def check_no_test_content(spec: TaskSpec, path: Path) -> None:
    """Fails if a weak file holds any test example's content (checked again where fitness reads it)."""
    hashes = test_hashes(spec)
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        row = json.loads(line)
        if content_hash(row["text"], row.get("aspect")) in hashes:
            raise WeakDataError(f"{path}:{n}: weak example '{row['id']}' has the content of a test example of '{spec.name}'")


SUMMARY_FIELDS = ("train", "wrong", "low_margin", "weak")


def summary_problem(summary, tasks: list[str]) -> str | None:
    """Returns what is wrong with the shape of weak/summary.yaml for these tasks (None when whole)."""
    if not isinstance(summary, dict):
        return f"a {type(summary).__name__}, expected a mapping of task -> counts"
    for task in tasks:
        entry = summary.get(task)
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), int) for k in SUMMARY_FIELDS):
            return f"task '{task}' has no counts {list(SUMMARY_FIELDS)}"
    return None


def read_summary(path: Path) -> dict:
    """Returns weak/summary.yaml's per-task entries that are whole mappings; a missing, unparsable or wrong-shaped
    file counts as empty (its tasks' weak data is mined again)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {t: e for t, e in data.items() if summary_problem({t: e}, [t]) is None}


WEAK_DEFAULTS = {"seed": 0}  # settings of the weak data's key added after runs existed, at their default


def mine_weak_data(search: MergeScorer, trainer: L.Trainer, progress: bool = False) -> list[TaskSpec]:
    """Writes each expert's weak data (its mispredicted training examples) and its loss on every training example
    (`<task>.example_loss.json`, the per-example difficulty of curriculum demonstrations) unless already there
    for the same expert weights; returns the weak-data specs in expert order. `progress`: one bar over the
    experts (run it with a trainer whose own bars are off)."""
    bar = None
    if progress and trainer.is_global_zero:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(search.expert_specs), desc="weak data", unit="expert")
    weak_dir = search.weak_dir
    summary_path = inside(weak_dir, "summary.yaml")
    summary = read_summary(summary_path)
    specs = []
    for t, (spec, path) in enumerate(zip(search.expert_specs, search.expert_dirs, strict=True)):
        out = inside(weak_dir, f"{spec.name}.jsonl")
        fingerprint = file_sha(path / "adapter_model.safetensors")
        settings = {"fingerprint": fingerprint, "max_weak_examples": search.hparams.max_weak_examples,
                    "min_weak_examples": search.hparams.min_weak_examples, "anchor_ratio": search.hparams.weak_anchor_ratio,
                    "max_train_examples": search.hparams.max_train_examples, "seed": search.hparams.seed}
        # the seed samples the rows (`select_weak`); at 0 it is not written, so summaries written before it still match
        key = added_settings(settings, **WEAK_DEFAULTS)
        loss_path = inside(weak_dir, f"{spec.name}.example_loss.json")
        whole = file_problem(out) is None and file_problem(loss_path) is None
        stored = {**WEAK_DEFAULTS, **summary.get(spec.name, {})}
        if not (whole and all(stored.get(k) == v for k, v in settings.items())):
            onehot = torch.zeros(search.model.n_experts)
            onehot[t] = 1.0
            search.set_coefficients(onehot)
            dm = search.datamodule([spec], predict_split="train")
            records = gather_records([r for batch in trainer.predict(search, datamodule=dm) for r in batch])
            rows, info = select_weak(spec, dm.examples[spec.name]["train"], records, search.hparams.min_weak_examples,
                                     search.hparams.seed, search.hparams.max_weak_examples, search.hparams.on_test_overlap,
                                     search.hparams.weak_anchor_ratio)
            summary[spec.name] = {**key, **info}
            if trainer.is_global_zero:
                write_jsonl_atomic(out, rows)
                losses = {r["id"]: round(gold_loss(r), 6) for r in sorted(records, key=lambda r: r["id"])}
                write_atomic(loss_path, json.dumps(losses).encode())
                write_atomic(summary_path, yaml.safe_dump(summary, sort_keys=True).encode())
            trainer.strategy.barrier()
            log.info("weak data of '%s': %d mispredicted + %d low-margin of %d training examples", spec.name,
                     info["wrong"], info["low_margin"], info["train"])
        check_no_test_content(spec, out)
        specs.append(weak_spec(spec, out))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return specs
