"""Nearest-neighbour demonstration selection (`select: similar`): the indexed selector against the definition.

The definition shuffles the query's pool with its seed and sorts it by Jaccard similarity in Python, a set operation
per pool example; the selector computes every similarity at once from an inverted word index. Both run side by side
on the same queries (interleaved rounds, medians) and must pick the same demonstrations. Pools: a task's training
split and its group's (`scope: group`), from the embedded SC tasks and, where `../shared/realdata` (or
$MEMMCL_DATA_DIR) exists, sst2 and twitter. Prints one JSON object. Run: `python benchmarks/demo_selection.py`.
"""

from __future__ import annotations

import json
import random
import statistics
import time

from memmcl.curriculum.demonstrations import select_demonstrations, similarity, words
from memmcl.tasks.readers import read_task
from memmcl.tasks.spec import TaskError, load_task_specs


def by_definition(query, task, specs, train, k, scope, seed=0):
    members = [t for t in specs if specs[t].group == specs[task].group] if scope == "group" else [task]
    pool = [(t, e) for t in members for e in train[t] if e.text != query.text]
    random.Random(f"{seed}:{task}:{query.id}").shuffle(pool)
    return [e.text for _, e in sorted(pool, key=lambda te: -similarity(words(query), words(te[1])))[:k]]


def indexed(query, task, specs, train, k, scope):
    return [d.text for d in select_demonstrations(query, task, specs, train, k, "random", scope, select="similar")]


def main(rounds: int = 3, queries_per_task: int = 20, k: int = 4) -> dict:
    names = ["sc_binary", "sc_3class", "sc_5class"]
    try:
        specs = {s.name: s for s in load_task_specs([*names, "configs/real/sst2.yaml", "configs/real/twitter.yaml"])}
        for s in list(specs.values())[3:]:
            read_task(s, ("train",))
    except (TaskError, OSError):  # no real data here: the embedded pools only
        specs = {s.name: s for s in load_task_specs(names)}
    splits = {n: read_task(s, ("train", "validation"))[0] for n, s in specs.items()}
    train = {n: sp["train"] for n, sp in splits.items()}
    out = {"pool_sizes": {n: len(v) for n, v in train.items()}, "k": k, "queries": {}, "ms_per_query": {}, "speedup": {}}
    for scope in ("task", "group"):
        queries = [(n, q) for n in specs for q in splits[n]["validation"][:queries_per_task]]
        for n, q in queries:  # warm: the index is built once per pool, the definition has nothing to build
            indexed(q, n, specs, train, k, scope)
        times = {"definition": [], "indexed": []}
        for _ in range(rounds):
            for name, fn in (("definition", by_definition), ("indexed", indexed)):
                start = time.perf_counter()
                picks = [fn(q, n, specs, train, k, scope) for n, q in queries]
                times[name].append((time.perf_counter() - start) / len(queries))
                if name == "definition":
                    reference = picks
                elif [sorted(p) for p in picks] != [sorted(p) for p in reference]:
                    raise AssertionError(f"scope {scope}: the indexed selector picked other demonstrations")
        ratios = [d / i for d, i in zip(times["definition"], times["indexed"], strict=True)]
        out["queries"][scope] = len(queries)
        out["ms_per_query"][scope] = {m: round(1000 * statistics.median(t), 3) for m, t in times.items()}
        out["speedup"][scope] = round(statistics.median(ratios), 2)
    out["identical"] = True
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
