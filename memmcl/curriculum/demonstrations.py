"""Curriculum in-context learning: k demonstrations from training data, put in the prompt easy → hard.

For a query of task t, the pool is t's training split (`scope: task`) or the training splits of every task of t's
group (`scope: group`). k examples are taken from it by `select`:
- `balanced`: drawn with a seed that depends on the query (or, with `fixed`, only on the task: one demonstration set
  for every query, the standard few-shot protocol, whose prompts then share their prefix), labels taken in turn so
  every label shows up when k allows;
- `similar`: the k pool examples whose words overlap the query's most (Jaccard similarity of lower-cased word sets,
  text and aspect), the nearest-neighbour demonstrations of KATE (Liu et al., 2022); their labels are whatever the
  neighbours' are. Exactly: leave out the pool examples with the query's own text, sort the rest by (-similarity,
  tie key, position) and take the first k, in that order. `position` is the example's place in the pool (the members'
  training lists in spec order, one after another); its tie key is output `position + 1` of a SplitMix64 generator
  whose state starts at the first 8 bytes (little-endian) of blake2b(f"{seed}:{task}:{query id}") — a seeded
  shuffle of the ties that depends on nothing else, so many queries are selected at once as one by one.
They are then ordered:
- `curriculum`: by task difficulty (easy tasks first, for a group pool), then by per-example difficulty (the expert's
  loss on the gold label when known, else input length), easy first;
- `reverse`: the curriculum order reversed (hard → easy, the ablation that can show the order matters);
- `random`: a seeded shuffle of the same k examples (the ablation);
- `none`: no demonstrations.
Validation and test data never enter a pool.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from memmcl.curriculum.neighbours import tie_state, word_index, words
from memmcl.tasks.prompts import Demonstration, answer_text
from memmcl.tasks.spec import Example, TaskError, TaskSpec

DemoOrder = Literal["curriculum", "reverse", "random", "none"]
DemoScope = Literal["task", "group"]
DemoSelect = Literal["balanced", "similar"]


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
    return select_demonstration_sets([query], task, specs, train, [k], order, scope, task_order, losses, seed, fixed,
                                     select)[0]


def select_demonstration_sets(
    queries: Sequence[Example],
    task: str,
    specs: Mapping[str, TaskSpec],
    train: Mapping[str, list[Example]],
    ks: Sequence[int],
    order: DemoOrder = "curriculum",
    scope: DemoScope = "task",
    task_order: list[str] | None = None,
    losses: Mapping[str, Mapping[str, float]] | None = None,
    seed: int = 0,
    fixed: bool = False,
    select: DemoSelect = "balanced",
) -> list[list[Demonstration]]:
    """Returns the demonstrations of each query of `task` (ks[i] for queries[i]), as `select_demonstrations` would one
    by one; `similar` selects for all of them at once (`memmcl.curriculum.neighbours`)."""
    sets: list[list[Demonstration]] = [[] for _ in queries]
    wanted = [i for i, k in enumerate(ks) if k > 0] if order != "none" else []
    if not wanted:
        return sets
    if select not in ("balanced", "similar"):
        raise TaskError(f"demonstration selection '{select}': expected balanced or similar")
    if select == "similar" and fixed:
        raise TaskError("demonstrations: select 'similar' picks a set per query; it cannot be fixed per task")
    spec = specs[task]
    members = [t for t in specs if specs[t].group == spec.group and t in train] if scope == "group" else [task]
    if task not in train:
        raise TaskError(f"task '{task}': in-context demonstrations need its train split, which was not loaded")
    if select == "balanced":
        for i in wanted:
            rng = random.Random(f"{seed}:{task}" if fixed else f"{seed}:{task}:{queries[i].id}")
            sets[i] = _ordered(_balanced(queries[i], members, train, ks[i], rng), order, specs, task_order, losses, rng)
        return sets
    index = word_index(members, train)
    nearest = index.nearest([words(queries[i]) for i in wanted],
                            np.array([tie_state(seed, task, queries[i]) for i in wanted], dtype=np.uint64),
                            [ks[i] for i in wanted], [index.at_text.get(queries[i].text, []) for i in wanted])
    for i, at in zip(wanted, nearest, strict=True):
        rng = random.Random(f"{seed}:{task}:{queries[i].id}") if order == "random" else None  # only it shuffles
        sets[i] = _ordered([index.pairs[p] for p in at], order, specs, task_order, losses, rng)
    return sets


def _balanced(query: Example, members: list[str], train: Mapping[str, list[Example]], k: int,
              rng: random.Random) -> list[tuple[str, Example]]:
    """Returns k (task, example) pairs of the members' training lists drawn by `rng`, labels taken in turn."""
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
    return picked


def _ordered(picked: list[tuple[str, Example]], order: DemoOrder, specs: Mapping[str, TaskSpec],
             task_order: list[str] | None, losses: Mapping[str, Mapping[str, float]] | None,
             rng: random.Random | None) -> list[Demonstration]:
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
    return [Demonstration(e.text, answer_text(specs[t], e), e.aspect) for t, e in picked]
