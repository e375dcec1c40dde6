"""The task's own head: optional pooler, then the classifier.

Sequence classification reads the first token (through the delta's pooler, else the
backbone's pooler — already run with this task's parts for `pooler.dense` — else raw);
token classification classifies every token. Applied per task segment: heads differ in size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapters_store.format import TaskHead


class PreparedTaskHead:
    def __init__(self, part: TaskHead, device: torch.device, dtype: torch.dtype) -> None:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        self.classifier_weight = move(part.classifier_weight)
        self.classifier_bias = move(part.classifier_bias)
        self.pooler_weight = move(part.pooler_weight)
        self.pooler_bias = move(part.pooler_bias)

    @property
    def nbytes(self) -> int:
        tensors = (self.classifier_weight, self.classifier_bias, self.pooler_weight, self.pooler_bias)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def classify_sequences(self, hidden: torch.Tensor, backbone_pooled: torch.Tensor | None) -> torch.Tensor:
        """hidden [n, L, d] last hidden states of one task's rows -> logits [n, C]."""
        first = hidden[:, 0]
        if self.pooler_weight is not None:
            z = torch.tanh(F.linear(first, self.pooler_weight, self.pooler_bias))
        elif backbone_pooled is not None:
            z = backbone_pooled
        else:
            z = first
        return F.linear(z, self.classifier_weight, self.classifier_bias)

    def classify_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, L, d] -> logits [n, L, C]."""
        return F.linear(hidden, self.classifier_weight, self.classifier_bias)
