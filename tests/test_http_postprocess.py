"""Post-processing on hand-made logits: softmax precision, words from sub-tokens, entity merging."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from server.postprocess import merge_entities, predict_row, sequence_prediction, softmax, word_spans

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def head(task_type="token-classification", labels=LABELS, problem_type="single_label", word_piece="first"):
    return SimpleNamespace(task_type=task_type, labels=labels, problem_type=problem_type, word_piece=word_piece)


def logits_for(text, word_labels, labels=LABELS, piece_labels=None):
    """Token logits giving each word's first sub-token `word_labels[w]` (others: `piece_labels` or O)."""
    out = np.zeros((len(text.input_ids), len(labels)), dtype=np.float32)
    for w, (first, last) in enumerate(word_spans(text)):
        for t in range(first, last + 1):
            label = word_labels[w] if t == first else (piece_labels or {}).get(w, "O")
            out[t, labels.index(label)] = 8.0
    return out


def test_sequence_scores_keep_full_precision():
    logits = np.array([0.1, 2.3, -1.0], dtype=np.float32)
    prediction = sequence_prediction(logits, ["a", "b", "c"])
    expected = np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum()
    assert prediction["label"] == "b" and prediction["score"] == expected[1]
    assert list(prediction["scores"].values()) == expected.tolist()
    assert softmax(np.array([1000.0, 0.0]))[0] == 1.0  # no overflow


def test_regression_returns_the_raw_value():
    assert predict_row(np.array([3.71], dtype=np.float32), head("sequence-classification", ["s"], "regression"),
                       None, "x") == {"value": pytest.approx(3.71)}


def test_words_offsets_and_entities(tiny_backbone):
    source = "Jean-Luc Picard flew to New York yesterday"
    text = tiny_backbone.encode([source])[0]
    words = [source[text.offsets[a][0]:text.offsets[b][1]] for a, b in word_spans(text)]
    assert words == ["Jean", "-", "Luc", "Picard", "flew", "to", "New", "York", "yesterday"]
    labels = ["B-PER", "I-PER", "I-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O"]
    prediction = predict_row(logits_for(text, labels), head(), text, source)
    assert [t["label"] for t in prediction["tokens"]] == labels
    assert all(source[t["start"]:t["end"]] == t["word"] for t in prediction["tokens"])
    assert [(e["text"], e["label"]) for e in prediction["entities"]] == [("Jean-Luc Picard", "PER"),
                                                                          ("New York", "LOC")]
    assert all(0.99 < e["score"] <= 1 for e in prediction["entities"])


def test_word_piece_last_reads_the_last_sub_token(tiny_backbone):
    source = "unbelievably Paris"
    text = tiny_backbone.encode([source])[0]
    spans = word_spans(text)
    assert spans[0][1] > spans[0][0]  # 'unbelievably' is split into several pieces
    logits = logits_for(text, ["O", "B-LOC"], piece_labels={0: "B-PER"})
    first = predict_row(logits, head(word_piece="first"), text, source)
    last = predict_row(logits, head(word_piece="last"), text, source)
    assert [t["label"] for t in first["tokens"]] == ["O", "B-LOC"]
    assert [t["label"] for t in last["tokens"]] == ["B-PER", "B-LOC"]
    assert last["tokens"][0]["word"] == "unbelievably"


def tokens(*pairs):
    out, cursor = [], 0
    for word, label in pairs:
        out.append({"word": word, "start": cursor, "end": cursor + len(word), "label": label, "score": 0.5})
        cursor += len(word) + 1
    return out, " ".join(word for word, _ in pairs)


@pytest.mark.parametrize("labels, expected", [
    # IOB2
    (["B-PER", "I-PER", "O", "B-LOC"], [("a b", "PER"), ("d", "LOC")]),
    # IOB1: a run opens with I-, B- only splits two adjacent entities of one type
    (["I-PER", "I-PER", "B-PER", "O"], [("a b", "PER"), ("c", "PER")]),
    # a change of type closes the run even without B-
    (["I-PER", "I-LOC", "I-LOC", "O"], [("a", "PER"), ("b c", "LOC")]),
    # BIOES / BILOU closings
    (["B-ORG", "E-ORG", "S-ORG", "U-LOC"], [("a b", "ORG"), ("c", "ORG"), ("d", "LOC")]),
    # bare labels without a prefix form runs; O ends them
    (["PER", "PER", "O", "LOC"], [("a b", "PER"), ("d", "LOC")]),
    (["O", "O", "O", "O"], []),
])
def test_entity_merging(labels, expected):
    toks, source = tokens(*zip("abcd", labels, strict=True))
    assert [(e["text"], e["label"]) for e in merge_entities(toks, source)] == expected
