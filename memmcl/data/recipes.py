"""Where each real task's rows come from: its source repository, files (train / dev / test) and how a file is read.

A reader returns rows {"text", "label_text", ...own columns, "source_id"}: the label already named as the task spec
names it, the id the source gives (its line or sentence number), which `Recipe.finish` turns into the written id.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from memmcl.data.sources import DataBuildError

Row = dict[str, str]
SENTIMENT = {"POS": "positive", "NEG": "negative", "NEU": "neutral",
             "positive": "positive", "negative": "negative", "neutral": "neutral"}


@dataclass(frozen=True)
class Recipe:
    """A task: its source repository, its files by role (train, dev, test), a reader, its columns and id scheme
    (`id`: `{prefix}{source_id}`, or `{task}-{split}-{position}` when `prefix` is None)."""

    task: str
    repo: str
    files: dict[str, str]
    read: Callable[[Path, str], list[Row]]
    columns: list[str]
    prefix: str | None = None

    def finish(self, rows: list[Row], split: str) -> list[Row]:
        out = []
        for i, r in enumerate(rows):
            ident = f"{self.task}-{split}-{i}" if self.prefix is None else f"{self.prefix}{r['source_id']}"
            out.append({"id": ident, **{c: r[c] for c in self.columns if c != "id"}})
        return out


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def absa_lines(quad: bool) -> Callable[[Path, str], list[Row]]:
    """Reads `sentence####[tuples]` lines (generative-ABSA, ABSA-QUAD): index spans become the sentence's words,
    sentiments their names; ABSA-QUAD quads (aspect, category, sentiment, opinion) become (category, aspect, opinion,
    sentiment)."""

    def read(path: Path, role: str) -> list[Row]:
        rows = []
        for n, line in enumerate(_lines(path), 1):
            parts = line.split("####")
            text, words = parts[0].strip(), parts[0].split()
            try:
                raw = ast.literal_eval(parts[-1].strip())
            except (ValueError, SyntaxError):
                raise DataBuildError(f"{path}:{n}: expected 'sentence####[tuples]', got {line[:60]!r}") from None
            tuples = []
            for t in raw:
                if quad:
                    aspect, category, sentiment, opinion = t
                    tuples.append((category, aspect, opinion, SENTIMENT[sentiment]))
                else:
                    spans = [" ".join(words[i] for i in range(min(s), max(s) + 1)) if isinstance(s, list) else s
                             for s in t[:-1]]
                    tuples.append((*spans, SENTIMENT[t[-1]]))
            rows.append({"text": text, "label_text": repr(tuples), "source_id": str(n - 1)})
        return rows

    return read


def _extraction(task: str, repo: str, folder: str, quad: bool = False) -> Recipe:
    return Recipe(task, repo, {role: f"{folder}/{role}.txt" for role in ("train", "dev", "test")}, absa_lines(quad),
                  ["id", "text", "label_text"])


RECIPES: dict[str, Recipe] = {}
for _name, _corpus in (("rest14", "rest14"), ("laptop14", "laptop14"), ("rest15", "rest15"), ("rest16", "rest16")):
    for _kind in ("uabsa", "aste"):
        RECIPES[f"{_kind}_{_name}"] = _extraction(f"{_kind}_{_name}", "IsakZhang/Generative-ABSA", f"data/{_kind}/{_corpus}")
for _name in ("rest15", "rest16"):
    RECIPES[f"asqp_{_name}"] = _extraction(f"asqp_{_name}", "IsakZhang/ABSA-QUAD", f"data/{_name}", quad=True)
