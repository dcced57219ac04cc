"""Generates the embedded synthetic extraction tasks (group ABSA) deterministically: `uabsa_synthetic` (aspect,
sentiment) and `aste_synthetic` (aspect, opinion, sentiment) over restaurant and laptop reviews.

Run `python tools/extraction_suite.py` from the project root to rewrite `memmcl/tasks/embedded/{uabsa,aste}_synthetic/`
and `configs/tasks/{uabsa,aste}_synthetic.yaml`; a test checks that the committed files are what this script writes.
A sentence holds 0-3 opinions ("the pasta was terrible"), some negated ("the service was not great": negative, opinion
"not great"), between distractor sentences, so a model must find the spans, not guess them from a list.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

OPINIONS = {
    "positive": ["good", "great", "excellent", "wonderful", "fantastic", "lovely", "superb", "pleasant", "delightful",
                 "impressive", "solid", "nice"],
    "negative": ["bad", "terrible", "awful", "poor", "horrible", "dreadful", "disappointing", "mediocre", "weak",
                 "lousy", "sloppy", "annoying"],
    "neutral": ["okay", "average", "ordinary", "acceptable", "standard", "unremarkable", "fair", "passable"],
}
FLIP = {"positive": "negative", "negative": "positive", "neutral": "neutral"}
ASPECTS = ["food", "service", "staff", "ambience", "prices", "drinks", "dessert", "pasta", "pizza", "waiter", "music",
           "portions", "wine list", "decor", "coffee", "battery", "screen", "keyboard", "touchpad", "speakers",
           "design", "camera", "charger", "display", "hinge", "memory"]
FILLER = ["We went there last week.", "It was raining outside.", "I had read about it online.", "My sister came along.",
          "It was my first time.", "I paid with a card.", "We arrived around eight.", "I bought it for work.",
          "It arrived on Monday."]
SIZES = {"train": 300, "validation": 100, "test": 100}
TASKS = {
    "uabsa_synthetic": {"slots": ["aspect", "sentiment"], "spans": ["aspect"],
                        "instruction": "List every aspect term of the review with its sentiment, as "
                                       "'aspect | sentiment', pairs separated by ' ; ', or 'none' when there is none."},
    "aste_synthetic": {"slots": ["aspect", "opinion", "sentiment"], "spans": ["aspect", "opinion"],
                       "instruction": "List every aspect term of the review with the opinion words about it and its "
                                      "sentiment, as 'aspect | opinion | sentiment', triplets separated by ' ; ', or "
                                      "'none' when there is none."},
}


def sentence(rng: random.Random) -> tuple[str, list[tuple[str, str, str]]]:
    """Returns a review sentence and its (aspect, opinion, sentiment) triplets."""
    n = rng.choices([0, 1, 2, 3], weights=[2, 4, 3, 1])[0]
    triplets, clauses = [], []
    for aspect in rng.sample(ASPECTS, n):
        sentiment = rng.choice(list(OPINIONS))
        word = rng.choice(OPINIONS[sentiment])
        if sentiment != "neutral" and rng.random() < 0.25:
            opinion, sentiment = f"not {word}", FLIP[sentiment]
        else:
            opinion = word
        clauses.append(f"the {aspect} was {opinion}")
        triplets.append((aspect, opinion, sentiment))
    body = (", ".join(clauses[:-1]) + " and " + clauses[-1] if len(clauses) > 1 else clauses[0]) if clauses else \
        rng.choice(["nothing stood out", "we talked for hours", "it was a normal day"])
    text = body[0].upper() + body[1:] + " ."
    if rng.random() < 0.5:
        text = rng.choice(FILLER) + " " + text
    return text, triplets


def sentences(seed: int) -> dict[str, list[tuple[str, list]]]:
    """Returns each split's sentences, no text in two splits or twice in one (no leakage)."""
    rng, seen, out = random.Random(seed), set(), {}
    for split, n in SIZES.items():
        out[split] = []
        while len(out[split]) < n:
            text, triplets = sentence(rng)
            if text not in seen:
                seen.add(text)
                out[split].append((text, triplets))
    return out


def rows(task: str, split: str, drawn: dict[str, list[tuple[str, list]]]) -> list[dict]:
    return [{"id": f"{task}-{split}-{i}", "text": text,
             "tuples": [[a, s] if task.startswith("uabsa") else [a, o, s] for a, o, s in triplets]}
            for i, (text, triplets) in enumerate(drawn[split])]


def spec(task: str) -> dict:
    t = TASKS[task]
    return {"name": task, "group": "ABSA", "kind": "extraction", "instruction": t["instruction"], "slots": t["slots"],
            "spans": t["spans"], "labels": {s: s for s in ("negative", "neutral", "positive")}, "format": "jsonl",
            "fields": {"text": "text", "label": "tuples", "id": "id"},
            "splits": {s: f"embedded:{task}/{s}.jsonl" for s in SIZES}}


def write(root: Path) -> None:
    drawn = sentences(seed=29)  # both tasks read the same sentences: pairs or triplets
    for task in TASKS:
        folder = root / "memmcl" / "tasks" / "embedded" / task
        folder.mkdir(parents=True, exist_ok=True)
        for split in SIZES:
            lines = [json.dumps(r) for r in rows(task, split, drawn)]
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        (root / "configs" / "tasks" / f"{task}.yaml").write_text(
            "# Synthetic extraction task, generated by tools/extraction_suite.py.\n" + yaml.safe_dump(spec(task), sort_keys=False))


if __name__ == "__main__":
    write(Path(__file__).resolve().parents[1])
