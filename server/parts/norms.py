"""LayerNorm deltas and the embedding shift, on a mixed batch: the engine's, for every backend.

A full fine-tune moves every LayerNorm and the position and token-type embeddings; on a MiniLM
fine-tuned for SST-2, putting them back changed 3 % of the labels although they are 0.1 % of
the bytes. Neither lives on a linear module, so like PASTA they are applied by the engine with
hooks, for the whole batch, in plain tensor ops that run on any device (the CPU and the Triton
backend share them):

- a LayerNorm delta: after the module ran, the task's rows get `δγ ⊙ x̂ + δβ`, x̂ the rows'
  normalised input recomputed without affine (one `layer_norm` per segment that has one);
- the embedding shift: before the embeddings' LayerNorm, the task's rows get `position[p]` at
  position p and `token_type[t]` at tokens of type t — a tensor [rows, L, d] built once per batch
  in `NormBatch.build`, off the lock.

Rows of tasks without these parts cost nothing; a batch where no task has them installs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adapters_store.format import EmbeddingShift, NormDelta


class PreparedNorm:
    """δγ, δβ of one LayerNorm on the device (zeros for an absent one), in the backbone's dtype."""

    def __init__(self, part: NormDelta, width: int, device: torch.device, dtype: torch.dtype) -> None:
        def vector(tensor: torch.Tensor | None) -> torch.Tensor:
            return (torch.zeros(width) if tensor is None else tensor).to(device=device, dtype=dtype)

        self.weight, self.bias = vector(part.weight), vector(part.bias)

    @property
    def nbytes(self) -> int:
        return (self.weight.numel() + self.bias.numel()) * self.weight.element_size()


class PreparedShift:
    """The embedding shift on the device: positions [P, d] and token types [T, d] (None: absent)."""

    def __init__(self, part: EmbeddingShift, device: torch.device, dtype: torch.dtype) -> None:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device=device, dtype=dtype)

        self.position, self.token_type = move(part.position), move(part.token_type)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.position, self.token_type) if t is not None)

    def rows(self, token_types: torch.Tensor | None, length: int, width: int) -> torch.Tensor:
        """[n, length, d] additions for n rows whose token types are `token_types` [n, length] (None: all 0)."""
        n = token_types.shape[0] if token_types is not None else 1
        ref = self.position if self.position is not None else self.token_type
        assert ref is not None
        out = torch.zeros((n, length, width), device=ref.device, dtype=ref.dtype)
        if self.position is not None:
            count = min(length, self.position.shape[0])
            out[:, :count] += self.position[:count]
        if self.token_type is not None:
            out += self.token_type[token_types] if token_types is not None else self.token_type[0]
        return out


@dataclass
class NormBatch:
    """This batch's LayerNorm deltas (module -> [(start, end, part)]) and embedding shift, by row."""

    norms: dict[str, list[tuple[int, int, PreparedNorm]]]
    shift: torch.Tensor | None  # [N, L, d], zeros for rows of tasks without one

    @classmethod
    def build(cls, segments: Sequence[tuple[int, int, dict[str, PreparedNorm], PreparedShift | None]],
              inputs: dict[str, torch.Tensor], width: int) -> NormBatch | None:
        norms: dict[str, list[tuple[int, int, PreparedNorm]]] = {}
        shift = None
        ids = inputs["input_ids"]
        types = inputs.get("token_type_ids")
        for start, end, parts, embedding in segments:
            for module, part in parts.items():
                norms.setdefault(module, []).append((start, end, part))
            if embedding is not None:
                if shift is None:
                    ref = embedding.position if embedding.position is not None else embedding.token_type
                    assert ref is not None
                    shift = torch.zeros((ids.shape[0], ids.shape[1], width), device=ref.device, dtype=ref.dtype)
                seg_types = types[start:end].to(shift.device) if types is not None else None
                shift[start:end] = embedding.rows(seg_types, ids.shape[1], width).expand(end - start, -1, -1)
        if not norms and shift is None:
            return None
        return cls(norms, shift)

    def after_norm(self, module: str, norm: torch.nn.LayerNorm, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add each task's `δγ ⊙ x̂ + δβ` to its rows of the LayerNorm's output y (in place)."""
        for start, end, part in self.norms.get(module, ()):
            normalised = F.layer_norm(x[start:end], norm.normalized_shape, eps=norm.eps)
            y[start:end] += normalised * part.weight + part.bias

    def before_embedding_norm(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.shift is None else x + self.shift
