"""From one row's logits (a numpy array) to the JSON prediction of http-api.md.

Embedding: the vector itself, `{"embedding": [floats]}` (float32 values).
Sequence classification: softmax over the labels (float64, so scores keep full precision),
and the raw logits; regression: the raw value. Token classification: one label per *word*, read from its first
sub-token (or its last when the delta says `word_piece = last`), with character offsets
into the input, and entities merged from B-/I- runs (IOB2, IOB1 where a run may open with
I-, and BIOES's E-/S- closings).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from server.backbone import EncodedText

Prediction = dict[str, Any]


class UnsupportedInput(ValueError):
    """An input this task cannot answer (a pair for token classification)."""


class NonFiniteOutput(UnsupportedInput):
    """The task's logits overflowed for this input: answered as a clear error, never as non-JSON floats."""


class HeadInfo(Protocol):
    """What post-processing needs to know of a task (a `DeltaMeta` or a store `TaskInfo`)."""

    @property
    def task_type(self) -> str: ...
    @property
    def labels(self) -> Sequence[str]: ...
    @property
    def problem_type(self) -> str: ...
    @property
    def word_piece(self) -> str: ...


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def predict_row(logits: np.ndarray, head: HeadInfo, text: EncodedText, source: str | tuple[str, str]) -> Prediction:
    if not np.isfinite(logits).all():
        # Upload validation bounds every value, so this needs a delta that overflows on this very input.
        raise NonFiniteOutput("the task's output for this input is not finite (its delta overflows the forward "
                              "pass); the task needs a retrained delta")
    if head.task_type == "embedding":
        return {"embedding": logits.astype(np.float32).reshape(-1).tolist()}
    if head.task_type == "token-classification":
        if not isinstance(source, str):
            raise UnsupportedInput("token-classification tasks take single texts, not pairs")
        return token_prediction(logits, head, text, source)
    if head.problem_type == "regression":
        return {"value": float(logits.reshape(-1)[0])}
    return sequence_prediction(logits, head.labels)


def sequence_prediction(logits: np.ndarray, labels: Sequence[str]) -> Prediction:
    # The raw logits ride along: the Hugging Face shapes' `function_to_apply` (sigmoid, none) needs them.
    raw = logits.reshape(-1)
    probs = softmax(raw)
    best = int(probs.argmax())
    return {
        "label": labels[best],
        "score": float(probs[best]),
        "scores": {label: float(p) for label, p in zip(labels, probs, strict=True)},
        "logits": {label: float(z) for label, z in zip(labels, raw, strict=True)},
    }


def token_prediction(logits: np.ndarray, head: HeadInfo, text: EncodedText, source: str) -> Prediction:
    """logits: [num_tokens, C], aligned with `text.input_ids`."""
    probs = softmax(logits)
    tokens = []
    for first, last in word_spans(text):
        pick = last if head.word_piece == "last" else first
        best = int(probs[pick].argmax())
        start, end = text.offsets[first][0], text.offsets[last][1]
        tokens.append({
            "word": source[start:end],
            "start": start,
            "end": end,
            "label": head.labels[best],
            "score": float(probs[pick, best]),
        })
    return {"tokens": tokens, "entities": merge_entities(tokens, source)}


def word_spans(text: EncodedText) -> list[tuple[int, int]]:
    """(first, last) token index of every word, in order; special tokens belong to none."""
    spans: list[tuple[int, int]] = []
    current: int | None = None
    for index, word in enumerate(text.word_ids):
        if word is None:
            current = None
            continue
        if word == current:
            spans[-1] = (spans[-1][0], index)
        else:
            spans.append((index, index))
            current = word
    return spans


def split_label(label: str) -> tuple[str, str | None]:
    """'B-LOC' -> ('B', 'LOC'); 'O' -> ('O', None); a bare 'LOC' is read as inside an entity."""
    prefix, dash, kind = label.partition("-")
    if dash and prefix.upper() in ("B", "I", "E", "S", "L", "U") and kind:
        return {"L": "E", "U": "S"}.get(prefix.upper(), prefix.upper()), kind
    if label.upper() == "O":
        return "O", None
    return "I", label


def merge_entities(tokens: Sequence[Prediction], source: str) -> list[Prediction]:
    entities: list[Prediction] = []
    open_entity: dict[str, Any] | None = None

    def close() -> None:
        nonlocal open_entity
        if open_entity is not None:
            scores = open_entity.pop("scores")
            open_entity["text"] = source[open_entity["start"]:open_entity["end"]]
            open_entity["score"] = float(np.mean(scores))
            entities.append(open_entity)
            open_entity = None

    for token in tokens:
        prefix, kind = split_label(token["label"])
        if kind is None:
            close()
            continue
        # A new entity starts on B-/S-, on a change of type, or on an I- with nothing open (IOB1).
        if prefix in ("B", "S") or open_entity is None or open_entity["label"] != kind:
            close()
            open_entity = {"text": "", "label": kind, "start": token["start"], "end": token["end"], "scores": []}
        open_entity["end"] = token["end"]
        open_entity["scores"].append(token["score"])
        if prefix in ("E", "S"):
            close()
    close()
    return [{"text": e["text"], "label": e["label"], "start": e["start"], "end": e["end"], "score": e["score"]}
            for e in entities]
