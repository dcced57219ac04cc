"""Nearest pool examples by word overlap (Jaccard similarity of lower-cased word sets), for many queries at once.

`WordIndex.nearest` picks exactly what sorting the pool by (-`similarity`, tie key, position) picks, the rule of
`select: similar` (see `memmcl.curriculum.demonstrations`), with a few array operations per chunk of queries:
- shared words: a 0/1 row over the pool for each word in at least 1/64 of it (adding a row costs less than scattering
  that many positions), the positions of every other word scattered;
- the k nearest: float32 values that order pairs as their similarities do give a lower bound on the k-th largest
  (the k-th largest of their maxima over at most 256 groups of positions), so only the few pairs above it are ranked,
  by float64 similarities (`similarity`'s values) and tie keys.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping

import numpy as np

from memmcl.tasks.spec import Example

_WORD = re.compile(r"\w+")
_DENSE = 64  # a word in at least 1/_DENSE of the pool gets a 0/1 row
_GROUPS = 256  # groups of pool positions in the search for the k nearest
_CHUNK = 1 << 18  # similarities (queries x pool) computed at once: small enough to stay in cache
_GAMMA, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def words(example: Example) -> frozenset[str]:
    """Returns the lower-cased words of an example's text and aspect (what `similar` selection compares)."""
    return _words(example.text, example.aspect)


@functools.lru_cache(maxsize=1 << 16)
def _words(text: str, aspect: str | None) -> frozenset[str]:
    return frozenset(_WORD.findall(f"{text} {aspect or ''}".lower()))


def similarity(a: frozenset[str], b: frozenset[str]) -> float:
    """Returns the Jaccard similarity of two word sets (0 when both are empty)."""
    return len(a & b) / len(a | b) if a or b else 0.0


def tie_state(seed: int, task: str, query: Example) -> int:
    """Returns the SplitMix64 state a query's tie keys start from: blake2b(f"{seed}:{task}:{query id}"), 8 bytes."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{task}:{query.id}".encode(), digest_size=8).digest(), "little")


def _tie_keys(state: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Returns the tie keys of pool positions, output position + 1 of SplitMix64 from `state` (uint64, elementwise)."""
    z = state + (position.astype(np.uint64) + np.uint64(1)) * _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Returns the concatenated ranges starts[i] .. starts[i] + lengths[i] - 1."""
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())


class WordIndex:
    """The (task, example) pairs of a pool in order and where each word stands: a 0/1 row over the pool for each word
    in at least 1/64 of it, a list of positions for every other word."""

    def __init__(self, lists: list[tuple[str, list[Example]]]):
        self.lists = lists  # held, so the ids that key the cache cannot be reused while it lives
        self.pairs = [(t, e) for t, examples in lists for e in examples]
        self.at_text: dict[str, list[int]] = {}
        for i, (_, e) in enumerate(self.pairs):
            self.at_text.setdefault(e.text, []).append(i)
        sets = [words(e) for _, e in self.pairs]
        vocabulary: dict[str, int] = {}
        word = np.array([vocabulary.setdefault(w, len(vocabulary)) for ws in sets for w in ws], dtype=np.int64)
        sizes = np.array([len(ws) for ws in sets], dtype=np.int64)
        self.sizes = np.maximum(sizes, 1)  # an empty pair counts one word: it still shares none, and no union is 0
        at = np.repeat(np.arange(len(sets)), sizes)
        frequent = np.bincount(word, minlength=len(vocabulary)) * _DENSE >= len(sets)
        rank = np.where(frequent, np.cumsum(frequent), np.cumsum(~frequent)) - 1  # a row, or a rare word's number
        self.code = {w: int(rank[i]) if frequent[i] else ~int(rank[i]) for w, i in vocabulary.items()}  # rare: ~number
        self.rows = np.zeros((int(frequent.sum()), len(sets)), dtype=np.uint8)
        dense = frequent[word]
        self.rows[rank[word[dense]], at[dense]] = 1
        rare = rank[word[~dense]]  # rare word r stands at at_rare[starts[r]:starts[r + 1]]
        self.starts = np.concatenate(([0], np.cumsum(np.bincount(rare, minlength=int((~frequent).sum())))))
        self.at_rare = at[~dense][np.argsort(rare, kind="stable")]

    def nearest(self, sets: list[frozenset[str]], states: np.ndarray, ks: list[int],
                exclude: list[list[int]]) -> list[list[int]]:
        """Returns, for each query word set, the positions of its ks[i] nearest pairs in the order of the rule (tie keys
        from states[i]), none of them in exclude[i]; queries go in chunks of about `_CHUNK` similarities."""
        codes = [[c for c in map(self.code.get, ws) if c is not None] for ws in sets]
        rows, rare = [[c for c in cs if c >= 0] for cs in codes], [[~c for c in cs if c < 0] for cs in codes]
        by_rows = sorted(range(len(sets)), key=lambda i: -len(rows[i]))  # so a chunk's j-th rows are a prefix of it
        found: dict[int, list[int]] = {}
        step = max(1, _CHUNK // max(1, len(self.pairs)))
        for chunk in (by_rows[c: c + step] for c in range(0, len(sets), step)):
            shared = self._shared([rows[i] for i in chunk], [rare[i] for i in chunk], [sets[i] for i in chunk])
            picked = self._nearest(shared, np.array([len(sets[i]) for i in chunk]), states[chunk],
                                   [ks[i] for i in chunk], [exclude[i] for i in chunk])
            found.update(zip(chunk, picked, strict=True))
        return [found[i] for i in range(len(sets))]

    def _shared(self, rows: list[list[int]], rare: list[list[int]], sets: list[frozenset[str]]) -> np.ndarray:
        """Returns how many words each query set (its frequent words' `rows`, longest first, and `rare` words) shares
        with each pair."""
        shared = np.zeros((len(sets), len(self.pairs)), dtype=np.min_scalar_type(max(map(len, sets))))
        for j in range(len(rows[0])):
            column = [r[j] for r in rows if len(r) > j]
            shared[: len(column)] += self.rows[column]
        query = np.repeat(np.arange(len(sets)), [len(r) for r in rare])
        word = np.array([w for r in rare for w in r], dtype=np.int64)
        lengths = self.starts[word + 1] - self.starts[word]
        at = self.at_rare[_ranges(self.starts[word], lengths)]
        np.add.at(shared.reshape(-1), np.repeat(query * len(self.pairs), lengths) + at, shared.dtype.type(1))
        return shared

    def _nearest(self, shared: np.ndarray, query_sizes: np.ndarray, states: np.ndarray, ks: list[int],
                 exclude: list[list[int]]) -> list[list[int]]:
        """Returns `nearest`'s answer for one chunk of queries, given how many words they share with each pair."""
        (n_queries, n), groups, k = shared.shape, min(len(self.pairs), _GROUPS), max(ks)
        size = -(-n // max(groups, 1))
        # s / (a + b) orders pairs as their similarity s / (a + b - s) does, and float32 rounding keeps that order, so
        # the k nearest pairs (ties included) stand at or above the rounded k-th largest; the k-th largest group
        # maximum is at most that (k groups each hold one as large). Group g holds positions g, g + groups,
        # g + 2 groups, ...: its maximum is one vector operation per row.
        rough = np.empty((n_queries, size * groups), dtype=np.float32)
        rough[:, n:] = -1.0
        size_sums = np.add(self.sizes.astype(np.float32), query_sizes[:, None].astype(np.float32), out=rough[:, :n])
        np.divide(shared.astype(np.float32), size_sums, out=size_sums)
        own_text = np.array([i for x in exclude for i in x], dtype=np.int64)
        rough[np.repeat(np.arange(n_queries), [len(x) for x in exclude]), own_text] = -1.0
        rough = rough.reshape(n_queries, size, groups)
        group_max = rough.max(axis=1, initial=-1.0)  # -1: an empty pool has empty groups
        floor = np.zeros(n_queries, dtype=np.float32)
        if groups >= k:
            np.maximum(np.partition(group_max, -k, axis=1)[:, -k], 0.0, out=floor)
        query, group = np.nonzero(group_max >= floor[:, None])
        keep = rough[query, :, group] >= floor[query, None]
        query, at = np.repeat(query, size)[keep.ravel()], (group[:, None] + np.arange(size) * groups)[keep]
        common = shared[query, at]
        sims = common / (query_sizes[query] + self.sizes[at] - common)
        order = np.lexsort((at, _tie_keys(states[query], at), -sims, query))
        query, at = query[order], at[order]
        first = np.searchsorted(query, np.arange(n_queries + 1))
        return [at[first[i]: min(first[i] + ks[i], first[i + 1])].tolist() for i in range(n_queries)]


_INDEXES: dict[tuple, WordIndex] = {}


def word_index(members: list[str], train: Mapping[str, list[Example]]) -> WordIndex:
    """Returns the (cached) word index of the members' training lists; a few pools are kept, the oldest dropped."""
    key = tuple((t, id(train[t]), len(train[t])) for t in members)
    if key not in _INDEXES:
        while len(_INDEXES) >= 16:
            del _INDEXES[next(iter(_INDEXES))]
        _INDEXES[key] = WordIndex([(t, train[t]) for t in members])
    return _INDEXES[key]
