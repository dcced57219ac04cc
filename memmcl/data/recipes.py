"""Where each real task's rows come from: its files by role (train, dev, test), each a (repository, path), and how
they are read.

A reader gets `local(repo, path) -> Path` and a role, and returns rows {"text", "label_text", own columns, "source_id"}:
the label named as the task spec names it, `source_id` the id the source gives (a line, record or tweet id), which
`Recipe.finish` turns into the written id. `test` is the corpus's standard test split (only its texts are used: rows
of train and dev with the same text are dropped); `dev` its standard dev split (validation), absent where the corpus has
none.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from memmcl.data.sources import DataBuildError

Row = dict[str, str]
Local = Callable[[str, str], Path]
SENTIMENT = {"POS": "positive", "NEG": "negative", "NEU": "neutral",
             "positive": "positive", "negative": "negative", "neutral": "neutral"}


@dataclass(frozen=True)
class Recipe:
    """A task: its files by role, a reader, its columns, its id scheme (`{prefix}{source_id}`, or
    `{task}-{split}-{position}` when `prefix` is None), and whether duplicate texts inside train are dropped."""

    task: str
    files: dict[str, list[tuple[str, str]]]
    read: Callable[[Local, str, list[tuple[str, str]]], list[Row]]
    columns: list[str]
    prefix: str | None = None
    dedupe_train: bool = False

    @property
    def repos(self) -> list[str]:
        return sorted({repo for files in self.files.values() for repo, _ in files})

    def finish(self, rows: list[Row], split: str) -> list[Row]:
        out = []
        for i, r in enumerate(rows):
            ident = f"{self.task}-{split}-{i}" if self.prefix is None else f"{self.prefix}{r['source_id']}"
            out.append({"id": ident, **{c: r[c] for c in self.columns if c != "id"}})
        return out


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _lines(path: Path) -> list[str]:
    return [line for line in _text(path).splitlines() if line.strip()]


# ---- generative ABSA: `sentence####[tuples]` ----------------------------------------------------------------------

def absa_lines(quad: bool):
    """Index spans become the sentence's words, sentiments their names; ABSA-QUAD quads (aspect, category, sentiment,
    opinion) become (category, aspect, opinion, sentiment)."""

    def read(local: Local, role: str, files: list[tuple[str, str]]) -> list[Row]:
        ((repo, path),) = files
        rows = []
        for n, line in enumerate(_lines(local(repo, path)), 1):
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


# ---- SST: `__label__K<TAB>sentence` ----------------------------------------------------------------------------------

SST5 = {"1": "very negative", "2": "negative", "3": "neutral", "4": "positive", "5": "very positive"}
SST2 = {"1": "negative", "2": "negative", "4": "positive", "5": "positive"}


def sst(names: dict[str, str]):
    def read(local: Local, role: str, files: list[tuple[str, str]]) -> list[Row]:
        ((repo, path),) = files
        rows = []
        for n, line in enumerate(_text(local(repo, path)).splitlines(), 1):
            label, _, text = line.partition("\t")
            key = label.removeprefix("__label__")
            if key not in SST5:
                raise DataBuildError(f"{path}:{n}: expected '__label__<1-5><TAB>sentence', got {line[:60]!r}")
            if (key in names or role == "test") and text.strip():  # every test sentence counts for the overlap
                rows.append({"text": text.strip(), "label_text": names.get(key, ""), "source_id": f"{role}-{n}"})
        return rows

    return read


# ---- TweetEval: `<split>_text.txt`, `<split>_labels.txt`, `mapping.txt` ------------------------------------------

TWEETEVAL_SPLIT = {"train": "train", "dev": "val", "test": "test"}


def tweeteval_files(task: str, domains: tuple[str, ...] = ()) -> dict[str, list[tuple[str, str]]]:
    repo, folders = "cardiffnlp/tweeteval", [f"datasets/{task}/{d}" for d in domains] or [f"datasets/{task}"]
    return {role: [(repo, f"{f}/{split}_{kind}.txt") for f in folders for kind in ("text", "labels")]
            + [(repo, f"datasets/{task}/mapping.txt")] for role, split in TWEETEVAL_SPLIT.items()}


def tweeteval(task: str, rename: dict[str, str] | None = None, domain_column: bool = False):
    """Reads TweetEval files (a stance folder per domain, the domain in `domain`); texts stripped, empty ones
    dropped; labels by mapping.txt, renamed by `rename`."""

    def read(local: Local, role: str, files: list[tuple[str, str]]) -> list[Row]:
        repo, mapping_path = files[-1]
        mapping = dict(line.split("\t") for line in _lines(local(repo, mapping_path)))
        rows = []
        for (_, text_path), (_, label_path) in zip(files[:-1:2], files[1:-1:2], strict=True):
            texts = _text(local(repo, text_path)).split("\n")
            labels = _text(local(repo, label_path)).split("\n")
            domain = text_path.split("/")[-2] if domain_column else None
            stem = f"stance-{domain}" if domain else task
            for n, (text, label) in enumerate(zip(texts, labels, strict=False), 1):
                if not text.strip():
                    continue
                if label.strip() not in mapping:
                    raise DataBuildError(f"{label_path}:{n}: label {label.strip()!r} is not in mapping.txt {sorted(mapping)}")
                name = mapping[label.strip()].strip()
                row = {"text": text.strip(), "label_text": (rename or {}).get(name, name),
                       "source_id": f"{stem}-{TWEETEVAL_SPLIT[role]}-{n}"}
                if domain:
                    row["domain"] = domain
                rows.append(row)
        return rows

    return read


# ---- SemEval-2017 Task 4A (twitter) ----------------------------------------------------------------------------------

SEMEVAL17 = "cbaziotis/datastories-semeval2017-task4"
SEMEVAL17_FILES = ["2013train", "2015train", "2016train", "2013dev", "2016dev", "2016devtest", "2013test", "2014test",
                   "2015test", "2016test", "2014sarcasm"]  # the order a tweet id's first occurrence is kept in


def tweet_text(text: str) -> str:
    """Normalises a tweet as TweetEval does: `\\uXXXX` escapes decoded, mentions `@user`, URLs after a space dropped."""
    text = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)
    text = re.sub(r"@\w+", "@user", text)
    return re.sub(r"(?<!\S)https?://\S+", "", text).strip()


def semeval17(local: Local, role: str, files: list[tuple[str, str]]) -> list[Row]:
    """Tab-separated `id, label, text` files; each tweet id once (its first file in `SEMEVAL17_FILES` order)."""
    rows, seen = [], set()
    for repo, path in files:
        for n, line in enumerate(_lines(local(repo, path)), 1):
            parts = line.split("\t")
            if len(parts) < 3 or parts[1].strip() not in ("negative", "neutral", "positive"):
                raise DataBuildError(f"{path}:{n}: expected 'id<TAB>negative|neutral|positive<TAB>text'")
            if parts[0] in seen or not tweet_text(parts[2]):
                continue
            seen.add(parts[0])
            rows.append({"text": tweet_text(parts[2]), "label_text": parts[1].strip(), "source_id": f"semeval17-{parts[0]}"})
    return rows


def twitter_dev(local: Local, role: str, files: list[tuple[str, str]]) -> list[Row]:
    rows = tweeteval("sentiment")(local, role, files)
    return [{**r, "text": tweet_text(r["text"]), "source_id": f"tweeteval-{r['source_id']}"}
            for r in rows if tweet_text(r["text"])]


# ---- SemEval-2014 Task 4 aspect terms (`.seg`: sentence with $T$, aspect, polarity) ----------------------------------

ASC_REPO = "gaozhengjie/ABSA-Data-Set"
POLARITY = {"-1": "negative", "0": "neutral", "1": "positive"}


def asc_seg(local: Local, role: str, files: list[tuple[str, str]]) -> list[Row]:
    ((repo, path),) = files
    lines = _text(local(repo, path)).splitlines()
    if len(lines) % 3:
        raise DataBuildError(f"{path}: {len(lines)} lines; expected records of 3 (sentence with $T$, aspect, polarity)")
    rows = []
    for k in range(len(lines) // 3):
        sentence, aspect, polarity = lines[3 * k : 3 * k + 3]
        aspect = " ".join(aspect.split())
        if polarity.strip() not in POLARITY or "$T$" not in sentence:
            raise DataBuildError(f"{path}:{3 * k + 1}: expected a sentence with $T$, an aspect and -1 / 0 / 1")
        rows.append({"text": " ".join(sentence.replace("$T$", aspect).split()), "aspect": aspect,
                     "label_text": POLARITY[polarity.strip()], "source_id": str(k + 1)})
    return rows


def _asc(task: str, prefix: str, corpus: str) -> Recipe:
    folder = "V1去除conflict"
    return Recipe(task, {"train": [(ASC_REPO, f"{folder}/{corpus}_Train.xml.seg")],
                         "test": [(ASC_REPO, f"{folder}/{corpus}_Test_Gold.xml.seg")]},
                  asc_seg, ["id", "text", "label_text", "aspect"], prefix=f"{prefix}-train-")


def _extraction(task: str, repo: str, folder: str, quad: bool = False) -> Recipe:
    return Recipe(task, {role: [(repo, f"{folder}/{role}.txt")] for role in ("train", "dev", "test")}, absa_lines(quad),
                  ["id", "text", "label_text"])


SST = "prrao87/fine-grained-sentiment"
SST_FILES = {role: [(SST, f"data/sst/sst_{role}.txt")] for role in ("train", "dev", "test")}
RECIPES: dict[str, Recipe] = {
    "sst2": Recipe("sst2", SST_FILES, sst(SST2), ["id", "text", "label_text"], prefix="sst-"),
    "sst5": Recipe("sst5", SST_FILES, sst(SST5), ["id", "text", "label_text"], prefix="sst-"),
    "twitter": Recipe("twitter", {
        "train": [(SEMEVAL17, f"dataset/Subtask_A/downloaded/twitter-{f}-A.tsv") for f in SEMEVAL17_FILES],
        "dev": tweeteval_files("sentiment")["dev"],
        "test": [(SEMEVAL17, "dataset/Subtask_A/gold/SemEval2017-task4-test.subtask-A.english.txt")]},
        lambda local, role, files: (twitter_dev if role == "dev" else semeval17)(local, role, files),
        ["id", "text", "label_text"], prefix="", dedupe_train=True),
    "asc_rest14": _asc("asc_rest14", "rest14", "Restaurants"),
    "asc_lap14": _asc("asc_lap14", "lap14", "Laptops"),
    "irony": Recipe("irony", tweeteval_files("irony"), tweeteval("irony"), ["id", "text", "label_text"], "tweeteval-"),
    "hate": Recipe("hate", tweeteval_files("hate"), tweeteval("hate", {"not-hate": "non-hate"}),
                   ["id", "text", "label_text"], "tweeteval-"),
    "offensive": Recipe("offensive", tweeteval_files("offensive"),
                        tweeteval("offensive", {"not-offensive": "non-offensive"}), ["id", "text", "label_text"],
                        "tweeteval-"),
    "emotion": Recipe("emotion", tweeteval_files("emotion"), tweeteval("emotion"), ["id", "text", "label_text"],
                      "tweeteval-"),
    "stance": Recipe("stance", tweeteval_files("stance", ("abortion", "atheism", "climate", "feminist", "hillary")),
                     tweeteval("stance", domain_column=True), ["id", "text", "label_text", "domain"], "tweeteval-"),
}
for _name in ("rest14", "laptop14", "rest15", "rest16"):
    for _kind in ("uabsa", "aste"):
        RECIPES[f"{_kind}_{_name}"] = _extraction(f"{_kind}_{_name}", "IsakZhang/Generative-ABSA", f"data/{_kind}/{_name}")
for _name in ("rest15", "rest16"):
    RECIPES[f"asqp_{_name}"] = _extraction(f"asqp_{_name}", "IsakZhang/ABSA-QUAD", f"data/{_name}", quad=True)
