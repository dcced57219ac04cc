"""Nearest-neighbour demonstration selection (`select: similar`): the previous selector against today's, one run.

- `previous`: `select_demonstrations` as it was (its `similar` path copied below as the reference): per query, drop the
  pool examples with the query's text, shuffle the rest with `random.Random(f"{seed}:{task}:{query id}")` (ties went
  by that shuffle), compute every Jaccard similarity from an inverted word index, stable-argsort the pool, then order
  the k picks (`curriculum`) as demonstrations.
- `new_bulk`: `select_demonstration_sets`, every query of the pool at once (how the datamodule calls it): dense rows
  for frequent words, a top-k search over float32 similarities, exact ranking of the few candidates, ties by SplitMix64
  keys; `new_single`: `select_demonstrations`, one call per query.
Pools: sst5's and twitter's training splits when the data folder ($MEMMCL_DATA_DIR, else ../shared/realdata) holds
them, else the embedded sc_5class's. Per pool: ms per query over the same queries (interleaved rounds, medians; the
previous selector on at most `previous_queries` of them), the speedup, and how many picks the two selectors disagree on
(`differ_only_in_ties`: every disagreement swaps pairs of equal similarity); for twitter, the seconds for all its
validation queries and for every training example as a query (demonstration-aware training). k = 4.

Run: `MEMMCL_DATA_DIR=/path/to/realdata python benchmarks/demo_selection.py [rounds] [previous_queries]`; prints JSON.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from collections import Counter

import numpy as np

from memmcl.curriculum.demonstrations import _ordered, select_demonstration_sets, select_demonstrations
from memmcl.curriculum.neighbours import similarity, words
from memmcl.tasks.prompts import Demonstration
from memmcl.tasks.readers import read_task
from memmcl.tasks.spec import Example, TaskError, load_task_specs

K = 4


class PreviousIndex:
    """The previous selector's pool index: an inverted index word -> positions (copied as it was)."""

    def __init__(self, task: str, pool: list[Example]):
        self.task, self.pool = task, pool
        self.at_text: dict[str, list[int]] = {}
        for i, e in enumerate(pool):
            self.at_text.setdefault(e.text, []).append(i)
        sets = [words(e) for e in pool]
        self.sizes = np.array([len(w) for w in sets], dtype=np.float64)
        positions: dict[str, list[int]] = {}
        for i, ws in enumerate(sets):
            for w in ws:
                positions.setdefault(w, []).append(i)
        self.positions = {w: np.array(p) for w, p in positions.items()}

    def similarities(self, query_words: frozenset[str]) -> np.ndarray:
        shared = np.zeros(len(self.pool))
        for w in query_words:
            if w in self.positions:
                shared[self.positions[w]] += 1
        union = len(query_words) + self.sizes - shared
        return np.divide(shared, union, out=np.zeros_like(shared), where=union > 0)

    def select(self, query: Example, specs: dict, k: int, seed: int = 0) -> list[Demonstration]:
        """Returns the previous selector's k demonstrations for `query`, in curriculum order."""
        rng = random.Random(f"{seed}:{self.task}:{query.id}")
        pool_at = np.delete(np.arange(len(self.pool)), self.at_text.get(query.text, []))
        shuffle = list(range(len(pool_at)))
        rng.shuffle(shuffle)
        shuffled = pool_at[shuffle]
        best = np.argsort(-self.similarities(words(query))[shuffled], kind="stable")[:k]
        return _ordered([(self.task, self.pool[i]) for i in shuffled[best]], "curriculum", specs, None, None, rng)


def pools() -> dict[str, tuple]:
    """Returns {task: (specs, train, validation)} for sst5 and twitter, or the embedded sc_5class without real data."""
    try:
        specs = load_task_specs(["configs/real/sst5.yaml", "configs/real/twitter.yaml"])
        splits = {s.name: read_task(s, ("train", "validation"))[0] for s in specs}
    except (TaskError, OSError):
        specs = load_task_specs(["sc_5class"])
        splits = {s.name: read_task(s, ("train", "validation"))[0] for s in specs}
    return {s.name: ({s.name: s}, {s.name: splits[s.name]["train"]}, splits[s.name]["validation"]) for s in specs}


def compare(pool: list[Example], queries: list[Example], previous: list[list[Demonstration]],
            new: list[list[Demonstration]]) -> dict:
    """Returns how many picks differ between the selectors, and whether every difference swaps equally similar ones."""
    by_text = {e.text: e for e in pool}
    differing, queries_differing, only_ties = 0, 0, True
    for q, old, now in zip(queries, previous, new, strict=True):
        old_texts, new_texts = Counter(d.text for d in old), Counter(d.text for d in now)
        if old_texts != new_texts:
            queries_differing += 1
            differing += sum((new_texts - old_texts).values())
            sims = [sorted(similarity(words(q), words(by_text[t])) for t in texts.elements())
                    for texts in (old_texts, new_texts)]
            only_ties &= sims[0] == sims[1]
    return {"picks_differing": differing, "picks_compared": sum(map(len, previous)),
            "queries_differing": queries_differing, "differ_only_in_ties": only_ties}


def measure(task: str, specs: dict, train: dict, validation: list[Example], rounds: int, previous_queries: int) -> dict:
    """Returns one pool's timings, speedups and pick differences."""
    pool, subset = train[task], validation[:previous_queries]
    previous_index = PreviousIndex(task, pool)
    select_demonstration_sets(validation[:1], task, specs, train, [K], select="similar")  # builds the index
    runs = {"previous": lambda: [previous_index.select(q, specs, K) for q in subset],
            "new_bulk": lambda: select_demonstration_sets(validation, task, specs, train, [K] * len(validation),
                                                          select="similar"),
            "new_single": lambda: [select_demonstrations(q, task, specs, train, K, select="similar") for q in subset]}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        picks = {}
        for name, run in runs.items():
            start = time.perf_counter()
            picks[name] = run()
            times[name].append((time.perf_counter() - start) / len(picks[name]))
        if picks["new_single"] != picks["new_bulk"][: len(subset)]:
            raise AssertionError(f"{task}: one query at a time picked other demonstrations than all at once")
    result = {"pool": len(pool), "queries": len(validation), "previous_queries": len(subset),
              "ms_per_query": {m: round(1000 * statistics.median(t), 4) for m, t in times.items()}}
    for name in ("new_bulk", "new_single"):
        ratios = [p / t for p, t in zip(times["previous"], times[name], strict=True)]
        result[f"speedup_{name[4:]}"] = round(statistics.median(ratios), 1)
    result.update(compare(pool, subset, picks["previous"], picks["new_bulk"][: len(subset)]))
    if task == "twitter":
        result["validation_total_s"] = round(statistics.median(times["new_bulk"]) * len(validation), 3)
        start = time.perf_counter()
        select_demonstration_sets(pool, task, specs, train, [K] * len(pool), select="similar")
        result["all_train_queries"] = len(pool)
        result["all_train_queries_total_s"] = round(time.perf_counter() - start, 2)
    return result


def main(rounds: int = 3, previous_queries: int = 300) -> dict:
    return {"k": K, "order": "curriculum",
            **{task: measure(task, *pool, rounds, previous_queries) for task, pool in pools().items()}}


if __name__ == "__main__":
    print(json.dumps(main(*map(int, sys.argv[1:])), indent=1))
