"""Pooling: from the last hidden states to one vector per sequence, as task-delta.md's Head says.

`cls` reads the first token's state; `mean` averages the states of every position that is not
padding (special tokens and both texts of a pair included: the attention mask's ones), in
float32 — what sentence-transformers' mean pooling computes. The serving heads
(`server/parts/task_head.py`, both backends) and the trainer pool here, so a delta is served
exactly as it was trained.

A sentence-transformers folder records how its model was trained to be read
(`modules.json`, `1_Pooling/config.json`, a `Normalize` module): `sentence_transformers_config`
reads that, so the trainer can default to the backbone's own pooling (mean for all-MiniLM-L6-v2,
whose pooler was never trained).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

POOLING_MODES = ("cls", "mean")


def row_mask(lengths: Sequence[int], width: int, device: torch.device | str) -> torch.Tensor:
    """[n, width] bool attention mask of right-padded rows of these token counts."""
    counts = torch.tensor(list(lengths), dtype=torch.int64, device=device)
    return torch.arange(width, device=device).unsqueeze(0) < counts.unsqueeze(1)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden [n, L, d], mask [n, L] (1 = a real token) -> [n, d] float32: the mean over real tokens."""
    mask = attention_mask.to(device=hidden.device, dtype=torch.float32).unsqueeze(-1)
    # clamp: a row of padding only (never served) gives zeros, not NaN, as sentence-transformers' does
    return (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """[n, L, d] -> [n, d]: the first token's state (`cls`, in hidden's dtype) or the float32 mean (`mean`)."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        if attention_mask is None:
            raise ValueError("mean pooling needs the attention mask (which positions are padding)")
        return mean_pool(hidden, attention_mask)
    raise ValueError(f"unknown pooling {mode!r}; use one of {POOLING_MODES}")


def head_input(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str,
               task_pooler: Callable[[torch.Tensor], torch.Tensor] | None = None,
               backbone_pooled: torch.Tensor | None = None) -> torch.Tensor:
    """The classifier's input z of task-delta.md for sequence classification: the one definition,
    used by both serving backends' heads (`server/parts/task_head.py`) and by the trainer.

    `cls`: tanh(task pooler(h_first)) if the task has one, else the backbone's pooler output where
    the backbone has a pooler (pass it as `backbone_pooled`), else h_first. `mean` (needs the
    attention mask): h is the float32 mean over the non-padding tokens, then tanh(task pooler(h))
    if the task has one, else h; the backbone's pooler is never used.
    """
    h = pool(hidden, attention_mask, pooling)
    if task_pooler is not None:
        return torch.tanh(task_pooler(h))
    if pooling == "cls" and backbone_pooled is not None:
        return backbone_pooled
    return h


def l2_normalize(vectors: torch.Tensor) -> torch.Tensor:
    """Each row divided by its Euclidean norm, in float32 (sentence-transformers' `Normalize`)."""
    return F.normalize(vectors.float(), p=2.0, dim=-1)


@dataclass(frozen=True)
class SentenceTransformersConfig:
    """What a sentence-transformers folder says about how its model turns states into one vector."""

    pooling: str | None  # cls or mean; None for a pooling task-delta.md cannot express (max, ...)
    pooling_mode: str  # the folder's own word for it: cls, mean, max, mean_sqrt_len_tokens, ...
    normalize: bool  # the pipeline ends in a Normalize module
    max_seq_length: int | None


_MODE_FLAGS = (("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
               ("pooling_mode_max_tokens", "max"), ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
               ("pooling_mode_weightedmean_tokens", "weightedmean"), ("pooling_mode_lasttoken", "lasttoken"))


def sentence_transformers_config(folder: str | Path) -> SentenceTransformersConfig | None:
    """The pooling a sentence-transformers model folder was trained with, or None if it is not one.

    Reads `modules.json` for the Pooling module's folder (default `1_Pooling`) and whether a
    `Normalize` module follows, that folder's `config.json` for the mode, and
    `sentence_bert_config.json` for `max_seq_length`. A folder without a pooling config is a plain
    Hugging Face model: None.
    """
    root = Path(folder)
    if not root.is_dir():
        return None
    modules = _read_json(root / "modules.json")
    pooling_dir, normalize = "1_Pooling", False
    if isinstance(modules, list):
        for module in modules:
            kind = str(module.get("type", "")) if isinstance(module, dict) else ""
            if kind.endswith(".Pooling"):
                pooling_dir = str(module.get("path") or pooling_dir)
            normalize = normalize or kind.endswith(".Normalize")
    config = _read_json(root / pooling_dir / "config.json")
    if not isinstance(config, dict):
        return None
    mode = config.get("pooling_mode")  # some versions write the mode as one word
    if not isinstance(mode, str):
        chosen = [word for flag, word in _MODE_FLAGS if config.get(flag)]
        mode = "+".join(chosen) if chosen else "none"
    mode = {"cls_token": "cls", "mean_tokens": "mean"}.get(mode, mode)
    bert_config = _read_json(root / "sentence_bert_config.json")
    max_seq = bert_config.get("max_seq_length") if isinstance(bert_config, dict) else None
    return SentenceTransformersConfig(
        pooling=mode if mode in POOLING_MODES else None,
        pooling_mode=mode,
        normalize=normalize,
        max_seq_length=int(max_seq) if isinstance(max_seq, int) else None,
    )


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
