"""Training data: read TSV/CSV/JSONL/CoNLL files, tokenise, and batch by length.

Columns are named (or given by 0-based index). TSV is read with quoting off, because GLUE's
MRPC has unbalanced `"` inside sentences; a UTF-8 byte-order mark is dropped. Batches are
padded per batch and bucketed by length, which on CPU is most of the speed.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from server.backbone import Backbone, pad_batch

IGNORE = -100
TEXT_COLUMNS = ("text", "sentence", "sentence1", "#1 String", "tokens", "words", "question")
PAIR_COLUMNS = ("text_pair", "sentence2", "#2 String")
LABEL_COLUMNS = ("label", "labels", "Quality", "ner_tags", "tags", "tag")


@dataclass(frozen=True)
class Example:
    """One labelled input: a text (or words, for token classification) and its label(s)."""

    text: str | tuple[str, ...]
    pair: str | None
    label: str | tuple[str, ...]


def read_examples(
    path: str | Path,
    task_type: str,
    text_column: str | None = None,
    pair_column: str | None = None,
    label_column: str | None = None,
) -> list[Example]:
    path = Path(path)
    if path.suffix.lower() not in TABLE_SUFFIXES and task_type == "token-classification":
        return read_conll(path)
    header, records = read_table(path)
    return _from_records(records, header, task_type, text_column, pair_column, label_column, path)


TABLE_SUFFIXES = (".jsonl", ".json", ".tsv", ".csv")


def read_table(path: str | Path) -> tuple[list[str], list[dict]]:
    """(column names, one dict per row) of a .tsv, .csv or .jsonl file (rows of the wrong width skipped)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows: list[dict] = [json.loads(line) for line in path.read_text(encoding="utf-8-sig").splitlines()
                            if line.strip()]
        return (list(rows[0]) if rows else []), rows
    if suffix in (".tsv", ".csv"):
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if suffix == ".tsv":
                reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.reader(handle)
            header, *body = [row for row in reader if row]
        return header, [dict(zip(header, row, strict=False)) for row in body if len(row) == len(header)]
    raise ValueError(f"{path}: unknown file type {suffix!r} (use .tsv, .csv, .jsonl, or CoNLL for token tasks)")


def read_conll(path: str | Path) -> list[Example]:
    """CoNLL: `word ... tag` per line, a blank line between sentences, `-DOCSTART-` skipped."""
    examples: list[Example] = []
    words: list[str] = []
    tags: list[str] = []
    for line in Path(path).read_text(encoding="utf-8-sig").splitlines():
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                examples.append(Example(tuple(words), None, tuple(tags)))
            words, tags = [], []
            continue
        words.append(fields[0])
        tags.append(fields[-1])
    if words:
        examples.append(Example(tuple(words), None, tuple(tags)))
    return examples


def pick_column(header: Sequence[str], given: str | None, defaults: Sequence[str], what: str, path: Path,
          required: bool = True) -> str | None:
    if given is not None:
        if given in header:
            return given
        if given.lstrip("-").isdigit() and -len(header) <= int(given) < len(header):
            return header[int(given)]
        raise ValueError(f"{path}: no {what} column {given!r}; columns are {list(header)}")
    for name in defaults:
        if name in header:
            return name
    if required:
        raise ValueError(f"{path}: cannot guess the {what} column; pass --{what}-column (columns: {list(header)})")
    return None


def _from_records(rows: list[dict], header: Sequence[str], task_type: str, text_column: str | None,
                  pair_column: str | None, label_column: str | None, path: Path) -> list[Example]:
    text_key = pick_column(header, text_column, TEXT_COLUMNS, "text", path)
    pair_key = pick_column(header, pair_column, PAIR_COLUMNS, "text-pair", path, required=False)
    label_key = pick_column(header, label_column, LABEL_COLUMNS, "label", path)
    examples = []
    for row in rows:
        if task_type == "token-classification":
            words, tags = row[text_key], row[label_key]
            examples.append(Example(tuple(str(w) for w in words), None, tuple(str(t) for t in tags)))
        else:
            pair = str(row[pair_key]) if pair_key else None
            examples.append(Example(str(row[text_key]), pair, str(row[label_key])))
    return examples


def label_set(examples: Sequence[Example]) -> list[str]:
    """All labels, sorted (numerically when every label is an integer) so ids are stable."""
    names: set[str] = set()
    for ex in examples:
        names.update(ex.label if isinstance(ex.label, tuple) else (ex.label,))
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


@dataclass
class Encoded:
    """A tokenised example; for token tasks also which token carries each word's label."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    label: int | list[int]  # class id, or per-token ids with IGNORE
    word_tokens: list[int] | None = None  # token index of each word (-1: truncated away)
    word_labels: list[int] | None = None  # gold class id of each word
    special_tokens_mask: list[int] | None = None  # tokenizer-inserted tokens (PASTA's slots)


def encode(examples: Sequence[Example], backbone: Backbone, labels: Sequence[str], task_type: str,
           max_length: int, word_piece: str = "first") -> list[Encoded]:
    label_id = {name: i for i, name in enumerate(labels)}
    tokenizer = backbone.tokenizer
    if task_type == "token-classification":
        enc = tokenizer([list(ex.text) for ex in examples], is_split_into_words=True, truncation=True,
                        max_length=max_length, return_special_tokens_mask=True)
    elif any(ex.pair is not None for ex in examples):
        enc = tokenizer([ex.text for ex in examples], [ex.pair or "" for ex in examples],
                        truncation="longest_first", max_length=max_length, return_special_tokens_mask=True)
    else:
        enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length,
                        return_special_tokens_mask=True)
    types = enc.get("token_type_ids") if backbone.uses_token_types else None
    out = []
    for i, ex in enumerate(examples):
        ids = list(enc["input_ids"][i])
        token_types = list(types[i]) if types is not None else None
        special = list(enc["special_tokens_mask"][i])
        if task_type != "token-classification":
            out.append(Encoded(ids, token_types, label_id[str(ex.label)], special_tokens_mask=special))
            continue
        word_labels = [label_id[t] for t in ex.label]
        word_tokens = [-1] * len(ex.text)
        for position, word in enumerate(enc.word_ids(i)):
            if word is not None and (word_piece == "last" or word_tokens[word] == -1):
                word_tokens[word] = position
        token_labels = [IGNORE] * len(ids)
        for word, position in enumerate(word_tokens):
            if position >= 0:
                token_labels[position] = word_labels[word]
        out.append(Encoded(ids, token_types, token_labels, word_tokens, word_labels, special))
    return out


def batches(data: Sequence[Encoded], batch_size: int, pad_id: int, *, shuffle: bool,
            rng: random.Random | None = None) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(indices, tensors) per batch; similar lengths together, order shuffled when training."""
    order = list(range(len(data)))
    if shuffle:
        assert rng is not None
        rng.shuffle(order)
        # Sort within large random chunks: little padding, but still random batches.
        chunk = batch_size * 50
        order = [i for s in range(0, len(order), chunk)
                 for i in sorted(order[s:s + chunk], key=lambda j: len(data[j].input_ids))]
        groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        rng.shuffle(groups)
    else:
        order.sort(key=lambda j: len(data[j].input_ids))
        groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for group in groups:
        yield group, collate([data[i] for i in group], pad_id)


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    batch = pad_batch(items, pad_id)
    length = batch["input_ids"].shape[1]
    if items[0].special_tokens_mask is not None:
        special = torch.zeros((len(items), length), dtype=torch.bool)
        for row, e in enumerate(items):
            marks = e.special_tokens_mask or []
            special[row, : len(marks)] = torch.tensor(marks, dtype=torch.bool)
        batch["special_tokens_mask"] = special
    if isinstance(items[0].label, list):
        labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
        for row, e in enumerate(items):
            labels[row, : len(e.label)] = torch.tensor(e.label)  # type: ignore[arg-type]
        batch["labels"] = labels
    else:
        batch["labels"] = torch.tensor([e.label for e in items], dtype=torch.long)
    return batch


def example_key(example: Example) -> tuple:
    """What makes two examples the same input (their texts, not their labels)."""
    return (example.text, example.pair)


def split_validation(pool: Sequence[Example], *, fraction: float, limit: int | None, seed: int,
                     exclude: Sequence[Example] = ()) -> tuple[list[Example], list[Example]]:
    """(train, validation) carved from `pool` by a seeded draw of distinct inputs.

    Validation takes whole groups of identical inputs (a sentence repeated in the training file
    never sits on both sides) and never an input that is also in `exclude` (the evaluation file),
    so choosing the epoch on it cannot peek at the evaluation data. Its size is
    round(fraction · len(pool)), at most `limit`, at least 1 when the pool has 2 inputs or more.
    """
    groups: dict[tuple, list[int]] = {}
    for index, example in enumerate(pool):
        groups.setdefault(example_key(example), []).append(index)
    banned = {example_key(e) for e in exclude}
    keys = [k for k in groups if k not in banned]
    random.Random(seed).shuffle(keys)
    want = round(fraction * len(pool))
    if limit is not None:
        want = min(want, limit)
    if len(groups) >= 2:
        want = max(want, 1)
    chosen: set[tuple] = set()
    taken = 0
    for key in keys:
        if taken >= want or len(chosen) + 1 >= len(groups):
            break
        chosen.add(key)
        taken += len(groups[key])
    train = [e for e in pool if example_key(e) not in chosen]
    val = [e for e in pool if example_key(e) in chosen]
    return train, val
