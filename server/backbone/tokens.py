"""The backbone's tokenisation room: texts to token ids, padding, and special-token slots.

`Tokenising` is the part of `Backbone` that reads texts: `encode` (linear in the input, pairs cut
before truncation), `pad` (right-padded batches on the device), `special_slots` (PASTA's slots).
The module-level helpers are shared with the trainer and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

TextInput = str | tuple[str, str]

# Tokens kept beyond the truncation limit when a pair's side is cut before pair truncation.
CUT_MARGIN = 16


class InvalidText(ValueError):
    """A text the tokenizer cannot take (not valid Unicode); the HTTP layer answers 422."""


def check_text(text: str, where: str = "inputs") -> None:
    """Raise `InvalidText` for a lone surrogate (JSON's "\\ud800" or raw bytes ED A0 80 decode to one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidText(f"{where} is not valid Unicode: a lone surrogate {text[err.start]!r} at "
                          f"character {err.start}") from None


@dataclass(frozen=True)
class EncodedText:
    """One tokenised input: what the engine needs and what post-processing needs."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    offsets: list[tuple[int, int]]  # character span of each token in its own text
    word_ids: list[int | None]  # index of the word a token belongs to (None for special tokens)
    sequence_ids: list[int | None]  # 0 or 1: which text of a pair a token comes from
    # 1 where the tokenizer inserted the token ([CLS], each [SEP]); never for text, even "[MASK]"
    special_tokens_mask: list[int] | None = None


class Tokenised(Protocol):
    input_ids: Sequence[int]
    token_type_ids: Sequence[int] | None


class Marked(Protocol):
    input_ids: Sequence[int]
    special_tokens_mask: Sequence[int] | None


def pad_batch(texts: Sequence[Tokenised], pad_id: int) -> dict[str, torch.Tensor]:
    """The model's keyword inputs for a right-padded batch, on the CPU.

    `token_type_ids` is there when the texts carry them (`Backbone.encode` gives them exactly
    when the model uses them). The engine, the trainer and the benchmarks' baselines all pad here.
    """
    width = max(len(t.input_ids) for t in texts)
    input_ids = torch.full((len(texts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(texts), width), dtype=torch.long)
    with_types = texts[0].token_type_ids is not None
    token_types = torch.zeros((len(texts), width), dtype=torch.long) if with_types else None
    for i, text in enumerate(texts):
        n = len(text.input_ids)
        input_ids[i, :n] = torch.tensor(text.input_ids)
        attention_mask[i, :n] = 1
        if token_types is not None and text.token_type_ids is not None:
            token_types[i, :n] = torch.tensor(text.token_type_ids)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_types is not None:
        inputs["token_type_ids"] = token_types
    return inputs



class Tokenising:
    """Tokenisation methods of `Backbone` (they read its tokenizer, limits and device)."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int
    max_positions: int
    uses_token_types: bool
    pad_id: int
    device: torch.device

    def encode(self, inputs: Sequence[TextInput], max_length: int | None = None) -> list[EncodedText]:
        """Tokenise single texts or pairs, truncated to `max_length` tokens.

        Cost is linear in the input: a pair is first cut, side by side, to what truncation
        could keep (`_cut_to_tokens`), because the fast tokenizer's `longest_first` pair
        truncation builds every combination of the two sides' overflow windows, quadratic
        in their lengths (two 50,000-word sides took 24 GB). Raises `InvalidText` for a text
        that is not valid Unicode (a lone surrogate).
        """
        limit = min(max_length or self.max_length, self.max_positions)
        encoded = []
        for item in inputs:
            for text in (item,) if isinstance(item, str) else item:
                check_text(text)
            if isinstance(item, str):
                enc = self.tokenizer(item, truncation=True, max_length=limit, return_offsets_mapping=True,
                                     return_special_tokens_mask=True)
            else:
                first, second = self._cut_pair(item[0], item[1], limit)
                enc = self.tokenizer(first, second, truncation="longest_first", max_length=limit,
                                     return_offsets_mapping=True, return_special_tokens_mask=True)
            types = enc.get("token_type_ids") if self.uses_token_types else None
            encoded.append(
                EncodedText(
                    input_ids=list(enc["input_ids"]),
                    token_type_ids=list(types) if types is not None else None,
                    offsets=[tuple(o) for o in enc["offset_mapping"]],
                    word_ids=list(enc.word_ids()),
                    sequence_ids=list(enc.sequence_ids()),
                    special_tokens_mask=list(enc["special_tokens_mask"]),
                )
            )
        return encoded

    def _cut_pair(self, first: str, second: str, limit: int) -> tuple[str, str]:
        """Both sides cut after the tokens that `longest_first` truncation to `limit` could keep.

        Only suffixes go, so offsets stay offsets into the original texts. Each side keeps
        `limit + CUT_MARGIN` tokens (the margin keeps the kept tokens the same when a cut
        word is re-tokenised), and the longer side one more, because `longest_first` gives
        the odd token to whichever side is longer.
        """
        keep = limit + CUT_MARGIN
        sides = [self._token_ends(text, keep + 1) for text in (first, second)]
        (n1, _), (n2, _) = sides
        wanted = [min(n1, keep), min(n2, keep)]
        if wanted[0] == wanted[1] and n1 != n2:
            wanted[0 if n1 > n2 else 1] += 1
        out = []
        for text, (count, ends), k in zip((first, second), sides, wanted, strict=True):
            out.append(text if count <= k else text[: ends[k - 1]])
        return out[0], out[1]

    def token_count(self, text: str) -> int:
        """Tokens `text` takes untruncated, with the special tokens the tokenizer adds around it."""
        check_text(text)
        return self._token_ends(text, 0)[0] + self.tokenizer.num_special_tokens_to_add(pair=False)

    def _token_ends(self, text: str, upto: int) -> tuple[int, list[int]]:
        """How many tokens `text` has (no special tokens), and the end offsets of the first `upto`.

        Linear in the text: one tokenisation, no truncation (whose overflow windows are what
        makes pairs quadratic). Only `upto` of a long text's tokens become Python values.
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow tokenizer
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return len(enc["input_ids"]), [end for _, end in enc["offset_mapping"][:upto]]
        if backend.truncation is not None:
            # The wrapper leaves its last truncation set on the backend; it sets it again on its next call.
            backend.no_truncation()
        encoding = backend.encode(text, add_special_tokens=False)
        count = len(encoding)
        encoding.truncate(upto)
        return count, [end for _, end in encoding.offsets]

    def pad(self, texts: Sequence[Tokenised]) -> dict[str, torch.Tensor]:
        """`pad_batch` on this backbone's padding id, moved to its device (non-blocking from pinned memory
        on CUDA, so that preparing the next batch does not wait for the forward in flight)."""
        from server.backends.uploads import to_device

        return {k: to_device(v, self.device) for k, v in pad_batch(texts, self.pad_id).items()}

    def special_slots(self, texts: Sequence[Marked]) -> torch.Tensor:
        """For texts padded into one batch, the PASTA slot of each special token (-1 elsewhere), on the device.

        The one place where slots are computed (engine, trainer, baselines): task-delta.md's
        special tokens are the ones the tokenizer inserted (its `special_tokens_mask`), never a
        `[UNK]` or a typed `[MASK]` coming from the text.
        """
        width = max(len(t.input_ids) for t in texts)
        mask = torch.zeros((len(texts), width), dtype=torch.bool)
        for i, text in enumerate(texts):
            if text.special_tokens_mask is None:
                raise ValueError("PASTA slots need the tokenizer's special_tokens_mask for every text")
            mask[i, : len(text.special_tokens_mask)] = torch.tensor(text.special_tokens_mask, dtype=torch.bool)
        return self.slots_from_mask(mask.to(self.device))

    @staticmethod
    def slots_from_mask(special: torch.Tensor) -> torch.Tensor:
        """[N, L] special-token mask -> slot numbers counted from 0 left to right per row, -1 elsewhere."""
        special = special.to(torch.bool)
        slots = torch.cumsum(special.to(torch.int64), dim=1) - 1
        return torch.where(special, slots, torch.full_like(slots, -1))
