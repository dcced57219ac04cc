import hashlib
import random

import numpy as np
import pytest

from memmcl.curriculum import neighbours
from memmcl.curriculum.demonstrations import select_demonstration_sets, select_demonstrations
from memmcl.curriculum.neighbours import similarity, word_index, words
from memmcl.tasks.readers import read_task
from memmcl.tasks.spec import Example, load_task_spec

MASK = (1 << 64) - 1


def splitmix64(state: int, n: int) -> int:
    """Output n (1-based) of SplitMix64 started at `state`."""
    z = (state + n * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def similar_by_definition(query, task, specs, train, k, scope, seed=0):
    """The similar selection as defined: without the query's own text, the pool sorted by (-Jaccard similarity, tie
    key, position), the first k; a tie key is output position + 1 of SplitMix64 from blake2b(seed:task:query id)."""
    members = [t for t in specs if specs[t].group == specs[task].group] if scope == "group" else [task]
    pool = [e for t in members for e in train[t]]
    state = int.from_bytes(hashlib.blake2b(f"{seed}:{task}:{query.id}".encode(), digest_size=8).digest(), "little")
    ranked = sorted((-similarity(words(query), words(e)), splitmix64(state, i + 1), i)
                    for i, e in enumerate(pool) if e.text != query.text)
    return [pool[i].text for *_, i in ranked[:k]]


def tie_heavy_pool(n: int, seed: int) -> list[Example]:
    """A seeded pool of short texts over six common and 300 rare words: many equal similarities, empty texts and
    repeated texts."""
    rng = random.Random(seed)
    common, rare = ["good", "bad", "film", "plot", "the", "a"], [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.sample(common, rng.randint(0, 3)) + rng.sample(rare, rng.randint(0, 2))) for _ in range(n)]
    return [Example(f"p{i}", text, rng.randint(0, 1)) for i, text in enumerate(texts)]


def test_splitmix64_is_the_published_generator():
    assert splitmix64(0, 1) == 0xE220A8397B1DCDAF  # the first output from state 0 (Vigna's reference code)


@pytest.mark.parametrize("scope", ["task", "group"])
def test_similar_selection_is_the_definition_on_the_embedded_tasks(scope):
    specs = {n: load_task_spec(n) for n in ["sc_binary", "sc_3class", "sc_5class", "hate"]}
    splits = {n: read_task(s)[0] for n, s in specs.items()}
    train = {n: sp["train"] for n, sp in splits.items()}
    ties = 0
    for n in specs:
        members = [t for t in specs if specs[t].group == specs[n].group] if scope == "group" else [n]
        index = word_index(members, train)
        queries = splits[n]["test"][:15] + train[n][:5]  # training queries: their own text is left out
        states = np.array([neighbours.tie_state(0, n, q) for q in queries], dtype=np.uint64)
        nearest = index.nearest([words(q) for q in queries], states, [4] * len(queries),
                                [index.at_text.get(q.text, []) for q in queries])
        demos = select_demonstration_sets(queries, n, specs, train, [4] * len(queries), "random", scope,
                                          select="similar")
        for query, at, chosen in zip(queries, nearest, demos, strict=True):
            want = similar_by_definition(query, n, specs, train, 4, scope)
            assert [index.pairs[i][1].text for i in at] == want  # the same pairs in the same order
            assert sorted(d.text for d in chosen) == sorted(want)
            sims = sorted((similarity(words(query), words(e)) for t in members for e in train[t]), reverse=True)
            ties += sims[3] == sims[4]
    assert ties > 0  # the comparison covered queries whose 4th and 5th nearest examples tie


@pytest.mark.parametrize("chunk", [1, 7, 1 << 18])
def test_similar_selection_is_the_definition_on_a_pool_of_ties_whatever_the_chunk(monkeypatch, chunk):
    monkeypatch.setattr(neighbours, "_CHUNK", chunk * 2000)  # `chunk` queries at a time
    pool = tie_heavy_pool(2000, seed=3)
    specs, train = {"sc_binary": load_task_spec("sc_binary")}, {"sc_binary": pool}
    queries = tie_heavy_pool(40, seed=4) + pool[:40:2]  # half of them from the pool, with their own text
    ks = [1 + i % 7 for i in range(len(queries))]
    for seed in (0, 1):
        demos = select_demonstration_sets(queries, "sc_binary", specs, train, ks, "random", seed=seed,
                                          select="similar")
        for query, k, chosen in zip(queries, ks, demos, strict=True):
            want = similar_by_definition(query, "sc_binary", specs, train, k, "task", seed)
            assert sorted(d.text for d in chosen) == sorted(want) and len(chosen) == k
            assert all(d.text != query.text for d in chosen)


def test_similar_selection_is_deterministic_and_the_same_one_by_one_as_in_bulk(monkeypatch):
    pool = tie_heavy_pool(1500, seed=5)
    specs, train = {"sc_binary": load_task_spec("sc_binary")}, {"sc_binary": pool}
    queries = pool[:30] + tie_heavy_pool(30, seed=6)

    def bulk():
        return select_demonstration_sets(queries, "sc_binary", specs, train, [5] * len(queries), "curriculum",
                                         select="similar")

    first = bulk()
    neighbours._INDEXES.clear()  # a rebuilt index picks the same
    assert bulk() == first
    assert [select_demonstrations(q, "sc_binary", specs, train, 5, "curriculum", select="similar")
            for q in queries] == first
    monkeypatch.setattr(neighbours, "_CHUNK", 1500 * 4)  # four queries at a time
    assert bulk() == first
    assert all(d.text != q.text for q, chosen in zip(queries, first, strict=True) for d in chosen)
    reseeded = select_demonstration_sets(queries, "sc_binary", specs, train, [5] * len(queries), "curriculum",
                                         seed=1, select="similar")
    assert reseeded != first  # ties go by the seed


def test_datamodule_selects_similar_demonstrations_for_all_prompts_at_once(tiny_dir):
    from memmcl.datamodule import MultiTaskDataModule

    dm = MultiTaskDataModule(["sc_3class"], backbone=str(tiny_dir), max_length=384, demonstrations=3,
                             demo_select="similar")
    dm.setup()
    spec, examples = dm.specs[0], dm.examples["sc_3class"]
    test = {e.id: e for e in examples["test"]}
    for item in dm.items["test"][:10]:
        demos = select_demonstrations(test[item["id"]], "sc_3class", {spec.name: spec}, {spec.name: examples["train"]},
                                      3, select="similar")
        text = dm.tokenizer.decode(item["prompt"])
        where = [text.index(d.text[:20]) for d in demos]
        assert item["demos"] == 3 and where == sorted(where)  # the selector's demonstrations, in its order
