"""Task difficulty for the meta-curriculum: metadata features → normalised across the task set → weighted score.

Every feature is oriented so that larger means harder. Each is z-scored across the tasks being ordered, so a
feature's units (tokens or characters, bits or nats) and its scale do not change the order; the score is the
weighted mean of the z-scores. Features whose weight is 0, or that no task has (expert features before experts
exist), are left out; a feature that some tasks have and others lack is an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# feature -> what it measures (larger = harder).
FEATURES: dict[str, str] = {
    "n_classes": "log2 of the number of classes",
    "label_entropy": "entropy of the training labels, bits (less to gain from the prior)",
    "imbalance": "log of (most frequent + 1) / (least frequent + 1) training class count (rare classes are hard)",
    "input_tokens": "mean input length in tokens",
    "lexical_diversity": "moving-average type/token ratio of the training texts",
    "expert_error": "1 - the task expert's validation accuracy",
    "weak_rate": "share of training examples the task expert gets wrong",
    "answer_values": "log2(1 + values to produce per example): 1 for a label, tuples × slots for extraction",
}
DEFAULT_WEIGHTS: dict[str, float] = {
    "n_classes": 1.0,
    "label_entropy": 0.5,
    "imbalance": 0.5,
    "input_tokens": 0.5,
    "lexical_diversity": 0.5,
    "expert_error": 2.0,
    "weak_rate": 1.0,
    "answer_values": 1.0,
}


class DifficultyError(ValueError):
    """Bad difficulty input; the message names the feature or task and what was expected."""


@dataclass(frozen=True)
class Difficulty:
    """Scores per task (larger = harder), the z-scores behind them, and the features used with their weights."""

    scores: dict[str, float]
    normalised: dict[str, dict[str, float]]
    weights: dict[str, float]

    def order(self) -> list[str]:
        """Returns the task names easy → hard (ties broken by name, so the order is deterministic)."""
        return sorted(self.scores, key=lambda t: (self.scores[t], t))

    def to_dict(self) -> dict:
        return {"order": self.order(), "scores": self.scores, "normalised": self.normalised, "weights": self.weights}


def task_features(metadata: Mapping, expert_accuracy: float | None = None, weak_rate: float | None = None) -> dict[str, float]:
    """Returns a task's difficulty features from its `TaskMetadata` (as a dict) and, if known, its expert's numbers."""
    sizes = metadata.get("class_counts")
    features = {
        "n_classes": math.log2(metadata["n_classes"]),
        "label_entropy": float(metadata["label_entropy"]),
        "input_tokens": float(metadata["input_tokens_mean"]),
        "lexical_diversity": float(metadata["type_token_ratio"]),
        "answer_values": math.log2(1 + float(metadata.get("answer_values_mean", 1.0))),
    }
    if sizes is not None:
        counts = list(sizes.values()) if isinstance(sizes, Mapping) else list(sizes)
        features["imbalance"] = math.log((max(counts) + 1) / (min(counts) + 1))
    if expert_accuracy is not None:
        features["expert_error"] = 1.0 - float(expert_accuracy)
    if weak_rate is not None:
        features["weak_rate"] = float(weak_rate)
    return features


def check_weights(weights: Mapping[str, float] | None, extra_features=()) -> dict[str, float]:
    """Returns the feature weights (`DEFAULT_WEIGHTS` for None), checked: known features, finite numbers >= 0."""
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    known = set(FEATURES) | set(extra_features)
    unknown = sorted(set(weights) - known)
    if unknown:
        raise DifficultyError(f"difficulty weights name unknown feature(s) {unknown}; known: {sorted(known)}")
    for f, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise DifficultyError(f"difficulty weight '{f}' = {w!r}: expected a finite number >= 0")
    return weights


def difficulty_scores(features: Mapping[str, Mapping[str, float]], weights: Mapping[str, float] | None = None) -> Difficulty:
    """Returns the `Difficulty` of tasks from their features ({task: {feature: value}}) and feature weights.

    Weights default to `DEFAULT_WEIGHTS`; a weight may name any feature the tasks carry.
    """
    if not features:
        raise DifficultyError("difficulty needs at least one task's features; got none")
    present = {f for values in features.values() for f in values}
    weights = check_weights(weights, present)
    used: dict[str, float] = {}
    for f, w in weights.items():
        have = [t for t, values in features.items() if f in values]
        if w == 0 or not have:
            continue
        if len(have) != len(features):
            missing = sorted(set(features) - set(have))
            raise DifficultyError(f"difficulty feature '{f}' is missing for task(s) {missing}; give it for every task or set its weight to 0")
        bad = [t for t in have if not math.isfinite(features[t][f])]
        if bad:
            raise DifficultyError(f"difficulty feature '{f}' is not finite for task(s) {sorted(bad)}")
        used[f] = float(w)
    if not used:
        raise DifficultyError(f"no difficulty feature has a weight > 0 and a value; weights: {weights}")
    normalised = {t: {} for t in features}
    for f in used:
        values = [features[t][f] for t in features]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        for t in features:
            normalised[t][f] = (features[t][f] - mean) / std if std > 1e-12 * max(1.0, abs(mean)) else 0.0
    total = sum(used.values())
    scores = {t: sum(w * normalised[t][f] for f, w in used.items()) / total for t in features}
    return Difficulty(scores=scores, normalised=normalised, weights=used)


def format_difficulty_table(difficulty: Difficulty, groups: Mapping[str, str] | None = None) -> str:
    """Returns a Markdown table of the tasks easy → hard with their score and z-scored features."""
    feats = list(difficulty.weights)
    head = ["rank", "task", *(["group"] if groups else []), "score", *feats]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, t in enumerate(difficulty.order(), 1):
        row = [str(i), t, *([groups.get(t, "")] if groups else []), f"{difficulty.scores[t]:+.2f}",
               *(f"{difficulty.normalised[t][f]:+.2f}" for f in feats)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def read_difficulty_order(path: str | Path, field: str = "difficulty_file") -> list[str]:
    """Returns the easy → hard task order of a `difficulty.json` written by `memmcl pipeline`; `field` names the
    setting that gave the path, for the error."""
    path = Path(path)
    if not path.exists():
        raise DifficultyError(f"{field}: {path} does not exist; expected a difficulty.json from memmcl pipeline")
    return json.loads(path.read_text())["order"]
