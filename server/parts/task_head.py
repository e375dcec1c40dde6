"""The task's own head, after the backbone: task-delta.md's Head section, once for every backend.

- sequence classification: `z` from the first token (through the delta's pooler, else the
  backbone's pooler — already run with this task's parts for `pooler.dense` — else raw) or,
  with `pooling` = `mean`, from the float32 mean over the non-padding tokens (through the
  delta's pooler if it has one; the backbone's pooler is never used then); logits = classifier(z);
- embedding: `z` by the task's pooling (mean by default), through the optional projection,
  L2-normalised unless the delta says `normalize` = `false`; a float32 vector;
- token classification classifies every token.

Applied per task segment: heads differ in size and kind. The pooling itself is `server.pooling`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapters_store.format import DeltaMeta, TaskHead
from server.pooling import head_input, l2_normalize, pool


class PreparedTaskHead:
    def __init__(self, part: TaskHead, device: torch.device, dtype: torch.dtype, meta: DeltaMeta | None = None) -> None:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        self.classifier_weight = move(part.classifier_weight)
        self.classifier_bias = move(part.classifier_bias)
        self.pooler_weight = move(part.pooler_weight)
        self.pooler_bias = move(part.pooler_bias)
        self.projection_weight = move(part.projection_weight)
        self.projection_bias = move(part.projection_bias)
        self.is_embedding = meta is not None and meta.is_embedding
        self.pooling = (meta.pooling if meta is not None else None) or "cls"
        self.normalize = meta.normalize if meta is not None else True

    @property
    def nbytes(self) -> int:
        tensors = (self.classifier_weight, self.classifier_bias, self.pooler_weight, self.pooler_bias,
                   self.projection_weight, self.projection_bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def num_classes(self) -> int:
        return 0 if self.classifier_weight is None else self.classifier_weight.shape[0]

    def sequence_input(self, hidden: torch.Tensor, backbone_pooled: torch.Tensor | None,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The classifier's input z [n, d] of one task's rows (hidden [n, L, d], mask [n, L]): `head_input`."""
        return head_input(hidden, attention_mask, self.pooling,
                          self._own_pooler if self.pooler_weight is not None else None, backbone_pooled)

    def _own_pooler(self, h: torch.Tensor) -> torch.Tensor:
        assert self.pooler_weight is not None
        return F.linear(h.to(self.pooler_weight.dtype), self.pooler_weight, self.pooler_bias)

    def classify_sequences(self, hidden: torch.Tensor, backbone_pooled: torch.Tensor | None,
                           attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [n, L, d] last hidden states of one task's rows -> logits [n, C]."""
        z = self.sequence_input(hidden, backbone_pooled, attention_mask)
        return F.linear(z.to(self.classifier_weight.dtype), self.classifier_weight, self.classifier_bias)

    def classify_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, L, d] -> logits [n, L, C]."""
        return F.linear(hidden, self.classifier_weight, self.classifier_bias)

    def embed(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden [n, L, d], mask [n, L] -> float32 vectors [n, D] of one embedding task's rows."""
        e = pool(hidden, attention_mask, self.pooling)
        if self.projection_weight is not None:
            e = F.linear(e.to(self.projection_weight.dtype), self.projection_weight, self.projection_bias)
        return l2_normalize(e) if self.normalize else e.float()
