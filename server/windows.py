"""Long texts in token classification: overlapping windows, run as rows of one request, merged per word.

A text longer than the task's `max_length` is cut, as the Hugging Face token-classification
pipeline cuts it with `stride`, into windows of at most `max_length` tokens that overlap by
`stride` tokens (the tokenizer's own `return_overflowing_tokens`, so special tokens, offsets and
word ids are the tokenizer's, and offsets stay relative to the whole text). The windows of a
request are the rows of one batcher job, so they run in the same mixed forward as everything else.

Each window is post-processed like any text (`postprocess.predict_row`); then every word takes
its label from the window where it has the most context: a window holding the whole word beats
one that cuts it, and among those the one where the word is farthest from a cut edge (the text's
own start and end are not cuts). Entities are merged again over the merged words. A text that
fits in one window gives exactly one window, equal to `Backbone.encode`'s, so short texts answer
as before.

Sequence classification does not window: a text longer than `max_length` is truncated (one
label for a text cannot be merged from pieces without changing what the head was trained on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from server.backbone import Backbone, EncodedText
from server.postprocess import Prediction, merge_entities, word_spans


class BadStride(ValueError):
    """A stride the windows cannot have (422)."""


def content_length(backbone: Backbone, max_length: int) -> int:
    """Tokens of text one window holds: `max_length` less the special tokens."""
    return max_length - backbone.tokenizer.num_special_tokens_to_add(pair=False)


def default_stride(backbone: Backbone, max_length: int) -> int:
    """Overlap of consecutive windows: a quarter of a window, so a word near a cut keeps an eighth of a
    window of context on its short side in the window chosen for it."""
    return max(content_length(backbone, max_length) // 4, 0)


def count_windows(backbone: Backbone, texts: Sequence[str], max_length: int, stride: int | None = None) -> list[int]:
    """How many windows `encode_windows` makes of each text, from token counts alone (no window is built).

    The limit on windows is checked on this first: building 4,220 windows only to refuse them cost
    2.2 s and 113 MB. Windows of `content` tokens overlapping by `stride` advance `content - stride`
    tokens each, so `n` tokens take 1 window, or 1 + ceil((n - content) / (content - stride)).
    Runs on the tokenizer's thread.
    """
    content = content_length(backbone, max_length)
    if content < 1:
        return [1] * len(texts)
    stride = _checked_stride(backbone, max_length, stride)
    lengths = [len(ids) for ids in backbone.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    return [1 if n <= content else 1 + math.ceil((n - content) / (content - stride)) for n in lengths]


def _checked_stride(backbone: Backbone, max_length: int, stride: int | None) -> int:
    content = content_length(backbone, max_length)
    if stride is None:
        return default_stride(backbone, max_length)
    if not 0 <= stride < content:
        raise BadStride(f"stride must be between 0 and {content - 1} tokens for a max_length of {max_length}")
    return stride


def encode_windows(backbone: Backbone, texts: Sequence[str], max_length: int,
                   stride: int | None = None) -> list[list[EncodedText]]:
    """Each text's windows (one for a text that fits). Runs on the tokenizer's thread."""
    if content_length(backbone, max_length) < 1:  # no room for text beside the special tokens: plain truncation
        return [[e] for e in backbone.encode(texts, max_length)]
    stride = _checked_stride(backbone, max_length, stride)
    windows = []
    for text in texts:
        # The same call as Backbone.encode's (tests/test_windows.py checks that one window equals it), plus stride.
        enc = backbone.tokenizer(text, truncation=True, max_length=max_length, stride=stride,
                                 return_overflowing_tokens=True, return_offsets_mapping=True,
                                 return_special_tokens_mask=True)
        types = enc.get("token_type_ids") if backbone.uses_token_types else None
        windows.append([
            EncodedText(
                input_ids=list(enc["input_ids"][i]),
                token_type_ids=list(types[i]) if types is not None else None,
                offsets=[tuple(o) for o in enc["offset_mapping"][i]],
                word_ids=list(enc.word_ids(i)),
                sequence_ids=list(enc.sequence_ids(i)),
                special_tokens_mask=list(enc["special_tokens_mask"][i]),
            )
            for i in range(len(enc["input_ids"]))
        ])
    return windows


def aligned(windows: Sequence[EncodedText], predictions: Sequence[Prediction]) -> bool:
    """Whether each prediction was made from its window (a version with another max_length re-tokenises)."""
    if len(windows) != len(predictions):
        return False
    for window, prediction in zip(windows, predictions, strict=True):
        starts = [window.offsets[first][0] for first, _ in word_spans(window)]
        if starts != [t["start"] for t in prediction["tokens"]]:
            return False
    return True


def merge_windows(windows: Sequence[EncodedText], predictions: Sequence[Prediction], source: str) -> Prediction:
    """One text's prediction from its windows' predictions (see the module docstring)."""
    if len(windows) == 1:
        return predictions[0]
    # Per global word id: (preference, the word's token prediction) of the best window so far.
    best: dict[int, tuple[tuple[int, int, int, int], dict]] = {}
    true_span: dict[int, tuple[int, int]] = {}  # the word's whole character span, over every window
    candidates = []
    last = len(windows) - 1
    for w, (window, prediction) in enumerate(zip(windows, predictions, strict=True)):
        content = [i for i, word in enumerate(window.word_ids) if word is not None]
        lo, hi = content[0], content[-1]
        for (first, end), token in zip(word_spans(window), prediction["tokens"], strict=True):
            word = window.word_ids[first]
            left = first - lo if w > 0 else len(window.word_ids)  # the text's start is no cut
            right = hi - end if w < last else len(window.word_ids)
            candidates.append((word, end - first + 1, min(left, right), token))
            start, stop = true_span.get(word, (token["start"], token["end"]))
            true_span[word] = (min(start, token["start"]), max(stop, token["end"]))
    for word, pieces, context, token in candidates:
        whole = (token["start"], token["end"]) == true_span[word]
        key = (int(whole), int(token["start"] == true_span[word][0]), pieces, context)
        if word not in best or key > best[word][0]:
            best[word] = (key, token)
    tokens = [best[word][1] for word in sorted(best)]
    return {"tokens": tokens, "entities": merge_entities(tokens, source)}
