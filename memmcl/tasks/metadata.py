"""Difficulty metadata of a task, computed from its splits: the features the meta-curriculum scores."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass

from memmcl.tasks.spec import Example, TaskSpec

_WORD = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True)
class TaskMetadata:
    """Per-task features: class count, split sizes, label entropy/imbalance, input length in tokens, lexical diversity;
    the size of an answer (extraction: the tuples of a sentence, the share without any; labels counted over tuples)."""

    name: str
    group: str
    n_classes: int
    split_sizes: dict
    label_entropy: float  # bits, of the training label distribution
    label_entropy_norm: float  # entropy / log2(n_classes), in [0, 1]
    imbalance: float  # most frequent / least frequent class count in train (inf if a class is absent)
    class_counts: dict  # training examples per label
    input_tokens_mean: float
    input_tokens_p95: float
    type_token_ratio: float  # moving-average TTR over windows of 50 words, so it does not depend on split size
    train_test_duplicates: int
    answer_values_mean: float = 1.0  # values to produce per example: 1 label, or tuples × slots
    tuples_mean: float = 0.0  # extraction: tuples per training sentence
    empty_share: float = 0.0  # extraction: share of training sentences without tuples

    def to_dict(self) -> dict:
        return asdict(self)


def label_entropy(labels: list[int], n_classes: int) -> tuple[float, float]:
    """Returns (entropy in bits, entropy normalised by log2(n_classes))."""
    counts = Counter(labels)
    total = sum(counts.values())
    h = -sum(c / total * math.log2(c / total) for c in counts.values() if c)
    return h, h / math.log2(n_classes)


def moving_type_token_ratio(texts: list[str], window: int = 50) -> float:
    """Returns the mean type/token ratio over sliding windows of `window` words of the concatenated texts."""
    words = [w for t in texts for w in _WORD.findall(t.lower())]
    if len(words) <= window:
        return len(set(words)) / max(len(words), 1)
    counts = Counter(words[:window])
    ratios = [len(counts) / window]
    for i in range(window, len(words)):
        counts[words[i]] += 1
        old = words[i - window]
        counts[old] -= 1
        if not counts[old]:
            del counts[old]
        ratios.append(len(counts) / window)
    return sum(ratios) / len(ratios)


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo))


def compute_metadata(spec: TaskSpec, splits: dict[str, list[Example]], tokenizer, duplicates: int = 0) -> TaskMetadata:
    """Returns the metadata of a task from its splits (features from train) and a tokenizer (input lengths)."""
    train = splits["train"]
    labels, extra = spec.task_kind.answer_stats(spec, train)  # extraction: the sentiment slot's, over tuples
    h, h_norm = label_entropy(labels, spec.n_classes)
    counts = Counter(labels)
    imbalance = max(counts.values()) / min(counts.values()) if len(counts) == spec.n_classes else math.inf
    lengths = [len(ids) for ids in tokenizer([e.text for e in train], add_special_tokens=False)["input_ids"]]
    return TaskMetadata(
        name=spec.name,
        group=spec.group,
        n_classes=spec.n_classes,
        split_sizes={k: len(v) for k, v in splits.items()},
        label_entropy=h,
        label_entropy_norm=h_norm,
        imbalance=imbalance,
        class_counts={label: counts.get(i, 0) for i, label in enumerate(spec.labels)},
        input_tokens_mean=sum(lengths) / len(lengths),
        input_tokens_p95=_percentile(lengths, 0.95),
        type_token_ratio=moving_type_token_ratio([e.text for e in train]),
        train_test_duplicates=duplicates,
        **extra,
    )
