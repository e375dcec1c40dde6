"""Evaluation metrics: accuracy, binary F1, MCC, and entity-level micro F1 (conlleval rules)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def accuracy(gold: Sequence[int], pred: Sequence[int]) -> float:
    return sum(g == p for g, p in zip(gold, pred, strict=True)) / max(len(gold), 1)


def binary_f1(gold: Sequence[int], pred: Sequence[int], positive: int = 1) -> float:
    tp = sum(g == positive and p == positive for g, p in zip(gold, pred, strict=True))
    fp = sum(g != positive and p == positive for g, p in zip(gold, pred, strict=True))
    fn = sum(g == positive and p != positive for g, p in zip(gold, pred, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def mcc(gold: Sequence[int], pred: Sequence[int], num_classes: int) -> float:
    """Matthews correlation (multiclass form of Gorodkin 2004; the usual one for two classes)."""
    confusion = [[0] * num_classes for _ in range(num_classes)]
    for g, p in zip(gold, pred, strict=True):
        confusion[g][p] += 1
    n = len(gold)
    correct = sum(confusion[k][k] for k in range(num_classes))
    true_counts = [sum(confusion[k]) for k in range(num_classes)]
    pred_counts = [sum(confusion[j][k] for j in range(num_classes)) for k in range(num_classes)]
    numerator = correct * n - sum(t * p for t, p in zip(true_counts, pred_counts, strict=True))
    denominator = math.sqrt((n * n - sum(p * p for p in pred_counts)) * (n * n - sum(t * t for t in true_counts)))
    return numerator / denominator if denominator else 0.0


def entities(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """(start, end, type) chunks of a BIO/IOB1 tag sequence, as conlleval reads them.

    An entity starts at `B-X`, or at `I-X` after anything but `B-X`/`I-X` of the same type.
    """
    chunks: set[tuple[int, int, str]] = set()
    start, kind = -1, ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind and start >= 0
        if start >= 0 and not continues:
            chunks.add((start, i, kind))
            start, kind = -1, ""
        if prefix == "B" or (prefix == "I" and not continues):
            start, kind = i, label
    return chunks


def entity_f1(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 over sentences."""
    tp = n_gold = n_pred = 0
    for g, p in zip(gold, pred, strict=True):
        ge, pe = entities(g), entities(p)
        tp += len(ge & pe)
        n_gold += len(ge)
        n_pred += len(pe)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
