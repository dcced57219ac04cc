"""`memmcl data build`: the real-task data folder (the layout `configs/real/` reads) from the pinned public sources.

Rules, for every task (`memmcl.data.recipes` says where each task's rows come from):
- label names are the task spec's (`configs/real/<task>.yaml`); extraction tuples are word tuples in the spec's slot
  order, written as a Python-literal list (`[('waitress', 'positive')]`, `[]` for none);
- every train / validation row whose text, normalised (lower case, whitespace collapsed), occurs in the corpus's
  standard test split is dropped, and counted;
- validation is the corpus's standard dev split, or, where it has none, 300 training sentences held out (every row of
  a held-out sentence goes with it); at most 300 rows (`MAX_VALIDATION`), a seeded sample;
- train and validation rows are written in a seeded random order (`seed`), CSV, UTF-8, header `id,text,label_text`
  plus the task's own columns (`aspect`, `domain`);
- the build report (`build_report.json` in the folder) holds per task and split the rows read, dropped and written.
Every source file is verified against its pinned SHA-256 before it is read. The folder is written to a temporary
sibling and renamed into place, so an interrupted build leaves no partial data folder.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
from pathlib import Path

from memmcl.data.recipes import RECIPES, Recipe, Row
from memmcl.data.sources import DataBuildError, Source, load_sources, verify

MAX_VALIDATION = 300
REPORT = "build_report.json"


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def build_task(recipe: Recipe, root: Path, seed: int, sources: dict[str, Source] | None = None) -> tuple[dict, dict]:
    """Returns a task's {train, validation} rows and its counts, from the source folder `root` (files verified)."""
    source = (sources or load_sources())[recipe.repo]
    read = {role: recipe.read(source.local(root, path), role) for role, path in recipe.files.items()}
    test = {normalise(r["text"]) for r in read["test"]}
    counts: dict = {"source": {role: len(rows) for role, rows in read.items()}}
    kept = {}
    for role in ("train", "dev"):
        if role in read:
            kept[role] = [r for r in read[role] if normalise(r["text"]) not in test]
            counts[f"{role}_test_overlap_dropped"] = len(read[role]) - len(kept[role])
    rng = random.Random(f"{seed}:{recipe.task}")
    if "dev" in kept:
        train, validation = kept["train"], kept["dev"]
    else:  # hold out whole sentences: every row of a sentence stays on one side
        sentences = sorted({r["text"] for r in kept["train"]})
        held = set(rng.sample(sentences, min(MAX_VALIDATION, len(sentences) // 5)))
        train = [r for r in kept["train"] if r["text"] not in held]
        validation = [r for r in kept["train"] if r["text"] in held]
    rng.shuffle(train)
    rng.shuffle(validation)
    validation = validation[:MAX_VALIDATION]
    out = {"train": recipe.finish(train, "train"), "validation": recipe.finish(validation, "validation")}
    counts.update({split: len(rows) for split, rows in out.items()})
    return out, counts


def write_csv(path: Path, rows: list[Row], columns: list[str]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")


def build(source: str | os.PathLike, out: str | os.PathLike, tasks: list[str] | None = None, seed: int = 0,
          force: bool = False, sources: dict[str, Source] | None = None) -> dict:
    """Builds the data folder `out` from the source folder `source` (of the pinned `sources`, default
    `sources.yaml`); returns the build report."""
    root, out = Path(source), Path(out)
    sources = sources or load_sources()
    unknown = sorted(set(tasks or []) - set(RECIPES))
    if unknown:
        raise DataBuildError(f"memmcl data build: unknown task(s) {unknown}; expected some of {sorted(RECIPES)}")
    if out.exists() and not force:
        raise DataBuildError(f"{out}: already exists; expected a new folder (or --force to replace it)")
    if not root.is_dir():
        raise DataBuildError(f"--source {root}: no such folder; expected the sources as memmcl data fetch writes them")
    recipes = [RECIPES[t] for t in (tasks or sorted(RECIPES))]
    for recipe in recipes:  # every file verified before any work
        verify(root, sources[recipe.repo], sorted(set(recipe.files.values())))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    report = {"seed": seed, "sources": {r.repo: sources[r.repo].commit for r in recipes}, "tasks": {}}
    try:
        for recipe in recipes:
            splits, counts = build_task(recipe, root, seed, sources)
            (tmp / recipe.task).mkdir(parents=True)
            for split, rows in splits.items():
                write_csv(tmp / recipe.task / f"{split}.csv", rows, recipe.columns)
            report["tasks"][recipe.task] = counts
        (tmp / REPORT).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def check(folder: str | os.PathLike, tasks: list[str] | None = None) -> dict[str, dict[str, int]]:
    """Reads every task of a data folder through its `configs/real` spec (so every row is checked as a run reads
    it); returns {task: {split: rows}}."""
    from memmcl.tasks.readers import read_split
    from memmcl.tasks.spec import load_task_spec

    folder = Path(folder)
    if not folder.is_dir():
        raise DataBuildError(f"{folder}: no such data folder; expected one written by memmcl data build")
    out = {}
    for task in tasks or sorted(RECIPES):
        spec = load_task_spec(str(real_spec(task)), data_dir=folder)
        out[task] = {split: len(read_split(spec, split)) for split in ("train", "validation")}
    return out


def real_spec(task: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("memmcl.configs") / "real" / f"{task}.yaml"))
