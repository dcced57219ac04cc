"""Curriculum in-context learning: k demonstrations from training data, put in the prompt easy → hard.

For a query of task t, the pool is t's training split (`scope: task`) or the training splits of every task of t's
group (`scope: group`). k examples are taken from it by `select`:
- `balanced`: drawn with a seed that depends on the query (or, with `fixed`, only on the task: one demonstration set
  for every query, the standard few-shot protocol, whose prompts then share their prefix), labels taken in turn so
  every label shows up when k allows;
- `similar`: the k pool examples whose words overlap the query's most (Jaccard similarity of lower-cased word sets,
  text and aspect; seeded ties), the nearest-neighbour demonstrations of KATE (Liu et al., 2022); their labels are
  whatever the neighbours' are.
They are then ordered:
- `curriculum`: by task difficulty (easy tasks first, for a group pool), then by per-example difficulty (the expert's
  loss on the gold label when known, else input length), easy first;
- `reverse`: the curriculum order reversed (hard → easy, the ablation that can show the order matters);
- `random`: a seeded shuffle of the same k examples (the ablation);
- `none`: no demonstrations.
Validation and test data never enter a pool.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Mapping
from typing import Literal

import numpy as np

from memmcl.tasks.prompts import Demonstration
from memmcl.tasks.spec import Example, TaskError, TaskSpec

DemoOrder = Literal["curriculum", "reverse", "random", "none"]
DemoScope = Literal["task", "group"]
DemoSelect = Literal["balanced", "similar"]
_WORD = re.compile(r"\w+")


def words(example: Example) -> frozenset[str]:
    """Returns the lower-cased words of an example's text and aspect (what `similar` selection compares)."""
    return _words(example.text, example.aspect)


@functools.lru_cache(maxsize=1 << 16)
def _words(text: str, aspect: str | None) -> frozenset[str]:
    return frozenset(_WORD.findall(f"{text} {aspect or ''}".lower()))


def similarity(a: frozenset[str], b: frozenset[str]) -> float:
    """Returns the Jaccard similarity of two word sets (0 when both are empty)."""
    return len(a & b) / len(a | b) if a or b else 0.0


class _WordIndex:
    """The (task, example) pairs of a pool in order, with an inverted index word -> positions, so a query's Jaccard
    similarity to every pair is a few vector operations instead of a set operation per pair."""

    def __init__(self, lists: list[tuple[str, list[Example]]]):
        self.lists = lists  # held, so the ids that key the cache cannot be reused while it lives
        self.pairs = [(t, e) for t, examples in lists for e in examples]
        self.at_text: dict[str, list[int]] = {}
        for i, (_, e) in enumerate(self.pairs):
            self.at_text.setdefault(e.text, []).append(i)
        sets = [words(e) for _, e in self.pairs]
        self.sizes = np.array([len(w) for w in sets], dtype=np.float64)
        positions: dict[str, list[int]] = {}
        for i, ws in enumerate(sets):
            for w in ws:
                positions.setdefault(w, []).append(i)
        self.positions = {w: np.array(p) for w, p in positions.items()}

    def similarities(self, query_words: frozenset[str]) -> np.ndarray:
        """Returns the Jaccard similarity of `query_words` to every pair (exactly `similarity`'s values)."""
        shared = np.zeros(len(self.pairs))
        for w in query_words:
            if w in self.positions:
                shared[self.positions[w]] += 1
        union = len(query_words) + self.sizes - shared
        return np.divide(shared, union, out=np.zeros_like(shared), where=union > 0)


_INDEXES: dict[tuple, _WordIndex] = {}


def _word_index(members: list[str], train: Mapping[str, list[Example]]) -> _WordIndex:
    """Returns the (cached) word index of the members' training lists; a few pools are kept, the oldest dropped."""
    key = tuple((t, id(train[t]), len(train[t])) for t in members)
    if key not in _INDEXES:
        while len(_INDEXES) >= 16:
            del _INDEXES[next(iter(_INDEXES))]
        _INDEXES[key] = _WordIndex([(t, train[t]) for t in members])
    return _INDEXES[key]


def example_difficulty(example: Example, losses: Mapping[str, float] | None) -> float:
    """Returns an example's difficulty: its recorded expert loss, else its input length in characters."""
    if losses is not None and example.id in losses:
        return float(losses[example.id])
    return float(len(example.text))


def select_demonstrations(
    query: Example,
    task: str,
    specs: Mapping[str, TaskSpec],
    train: Mapping[str, list[Example]],
    k: int,
    order: DemoOrder = "curriculum",
    scope: DemoScope = "task",
    task_order: list[str] | None = None,
    losses: Mapping[str, Mapping[str, float]] | None = None,
    seed: int = 0,
    fixed: bool = False,
    select: DemoSelect = "balanced",
) -> list[Demonstration]:
    """Returns k demonstrations for `query` of `task`, taken from `train` only by `select` and put in `order`.

    A training example with the query's own text is never drawn (with `fixed`, only that query's set differs)."""
    if order == "none" or k <= 0:
        return []
    if select not in ("balanced", "similar"):
        raise TaskError(f"demonstration selection '{select}': expected balanced or similar")
    if select == "similar" and fixed:
        raise TaskError("demonstrations: select 'similar' picks a set per query; it cannot be fixed per task")
    spec = specs[task]
    members = [t for t in specs if specs[t].group == spec.group and t in train] if scope == "group" else [task]
    if task not in train:
        raise TaskError(f"task '{task}': in-context demonstrations need its train split, which was not loaded")
    rng = random.Random(f"{seed}:{task}" if fixed else f"{seed}:{task}:{query.id}")
    if select == "similar":  # the k most similar pairs; ties go by a seeded shuffle of the pool
        index = _word_index(members, train)
        pool_at = np.delete(np.arange(len(index.pairs)), index.at_text.get(query.text, []))
        shuffle = list(range(len(pool_at)))
        rng.shuffle(shuffle)  # the permutation a shuffle of the pool itself would make
        shuffled = pool_at[shuffle]
        best = np.argsort(-index.similarities(words(query))[shuffled], kind="stable")[:k]
        return _ordered([index.pairs[i] for i in shuffled[best]], order, specs, task_order, losses, rng)
    pool = [(t, e) for t in members for e in train[t] if e.text != query.text]
    rng.shuffle(pool)
    by_label: dict[tuple[str, int], list[tuple[str, Example]]] = {}
    for t, e in pool:
        by_label.setdefault((t, e.label), []).append((t, e))
    queues = list(by_label.values())
    picked: list[tuple[str, Example]] = []
    while len(picked) < k and any(queues):
        for q in queues:
            if q and len(picked) < k:
                picked.append(q.pop())
    return _ordered(picked, order, specs, task_order, losses, rng)


def _ordered(picked: list[tuple[str, Example]], order: DemoOrder, specs: Mapping[str, TaskSpec],
             task_order: list[str] | None, losses: Mapping[str, Mapping[str, float]] | None,
             rng: random.Random) -> list[Demonstration]:
    """Returns the picked (task, example) pairs as demonstrations in `order`."""
    if order in ("curriculum", "reverse"):
        rank = {t: i for i, t in enumerate(task_order or [])}
        picked.sort(key=lambda te: (rank.get(te[0], len(rank)), example_difficulty(te[1], (losses or {}).get(te[0]))))
        if order == "reverse":
            picked.reverse()
    elif order == "random":
        rng.shuffle(picked)
    else:
        raise TaskError(f"demonstration order '{order}': expected one of curriculum, reverse, random, none")
    return [Demonstration(e.text, specs[t].answers[e.label], e.aspect) for t, e in picked]
