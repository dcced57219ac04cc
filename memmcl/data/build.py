"""`memmcl data build`: the real-task data folder (the layout `configs/real/` reads) from the pinned public sources.

Rules, for every task (`memmcl.data.recipes` says where each task's rows come from):
- label names are the task spec's (`configs/real/<task>.yaml`); extraction tuples are word tuples in the spec's slot
  order, written as a Python-literal list (`[('waitress', 'positive')]`, `[]` for none);
- every train / validation row whose text, normalised (`normalise`: lower-cased letters and digits), occurs in the
  corpus's standard test split is dropped, and counted; so is every train row whose text occurs in the dev split;
- validation is the corpus's standard dev split, at most 300 rows (`MAX_VALIDATION`, a seeded sample), or, where it
  has none (SemEval-2014 aspect terms), whole training sentences held out up to 300 rows (every row of a sentence
  goes with it); twitter keeps one row per text (its sources repeat tweets across years);
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
import re
import shutil
from pathlib import Path

from memmcl.data.recipes import RECIPES, Recipe, Row
from memmcl.data.sources import DataBuildError, Source, load_sources, verify

MAX_VALIDATION = 300
REPORT = "build_report.json"


def normalise(text: str) -> str:
    """Returns the text compared for overlaps: its lower-cased letters and digits only (`No. .` = `No . .`); a text
    with none of them, lower-cased with whitespace collapsed."""
    key = re.sub(r"[\W_]+", "", text.lower())
    return key or " ".join(text.lower().split())


def hold_out(rows: list[Row], rng: random.Random) -> tuple[list[Row], list[Row]]:
    """Returns (train, validation): whole sentences (every row of one) held out, in a seeded order, as long as they
    fit `MAX_VALIDATION` rows, from a corpus without a dev split."""
    by_text: dict[str, list[Row]] = {}
    for r in rows:
        by_text.setdefault(r["text"], []).append(r)
    texts = sorted(by_text)
    rng.shuffle(texts)
    held, n = set(), 0
    for t in texts:
        if n + len(by_text[t]) <= MAX_VALIDATION:
            held.add(t)
            n += len(by_text[t])
        if n == MAX_VALIDATION:
            break
    return [r for r in rows if r["text"] not in held], [r for r in rows if r["text"] in held]


def build_task(recipe: Recipe, root: Path, seed: int, sources: dict[str, Source] | None = None) -> tuple[dict, dict]:
    """Returns a task's {train, validation} rows and its counts, from the source folder `root` (files verified)."""
    sources = sources or load_sources()

    def local(repo: str, path: str) -> Path:
        return sources[repo].local(root, path)

    read = {role: recipe.read(local, role, files) for role, files in recipe.files.items()}
    test = {normalise(r["text"]) for r in read["test"]}
    counts: dict = {"source": {role: len(rows) for role, rows in read.items()}}
    rng = random.Random(f"{seed}:{recipe.task}")
    train = [r for r in read["train"] if normalise(r["text"]) not in test]
    counts["train_test_overlap_dropped"] = len(read["train"]) - len(train)
    if "dev" in read:
        validation = [r for r in read["dev"] if normalise(r["text"]) not in test]
        counts["dev_test_overlap_dropped"] = len(read["dev"]) - len(validation)
        dev = {normalise(r["text"]) for r in read["dev"]}  # the whole dev split, also rows not sampled
        kept = [r for r in train if normalise(r["text"]) not in dev]
        counts["train_dev_overlap_dropped"], train = len(train) - len(kept), kept
        rng.shuffle(validation)
        validation = validation[:MAX_VALIDATION]
    else:
        train, validation = hold_out(train, rng)
    if recipe.dedupe_train:
        seen, kept = set(), []
        for r in train:
            if normalise(r["text"]) not in seen:
                seen.add(normalise(r["text"]))
                kept.append(r)
        counts["train_duplicates_dropped"], train = len(train) - len(kept), kept
    rng.shuffle(train)
    rng.shuffle(validation)
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
        for repo in recipe.repos:
            verify(root, sources[repo], sorted({p for files in recipe.files.values() for r, p in files if r == repo}))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    report = {"seed": seed, "sources": {repo: sources[repo].commit for r in recipes for repo in r.repos}, "tasks": {}}
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
