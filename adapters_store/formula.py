"""The one dense formula of task-delta.md, on plain tensors.

    W' = W ⊙ K  +  B · A  +  scatter(Ω, S)          (absent parts are the identity)
    head keep: the pruned heads' input columns of the attention output projection are zero

This is the *reference* form: one weight-sized result per call, autograd-safe (no in-place
edits of its inputs), so the trainer differentiates through it and the benchmark's per-task
copies and the format's parts (`Part.dense_effect`) materialise effective weights with it.
The serving engine never calls it on its hot path: its backends compute the same thing
without building weights (see `server/backends/`), and the tests hold them to this function.
"""

from __future__ import annotations

import torch


def effective_weight(
    weight: torch.Tensor,
    *,
    keep: torch.Tensor | None = None,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    sparse_index: torch.Tensor | None = None,
    sparse_value: torch.Tensor | None = None,
    input_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """`W ⊙ K + B·A + S` (then input columns zeroed where `input_keep` is 0).

    `keep` has W's shape (bool or 0/1 float; a straight-through estimate keeps its gradient);
    `lora_B` [out, r] already carries any scaling; `sparse_index` holds flat row-major indices
    into W; `input_keep` is [in] (0/1), the head-keep columns.
    """
    out = weight
    if keep is not None:
        out = out * keep.to(out.dtype)
    if lora_A is not None or lora_B is not None:
        if lora_A is None or lora_B is None:
            raise ValueError("lora_A and lora_B come together")
        out = out + (lora_B @ lora_A).to(out.dtype)
    if sparse_index is not None or sparse_value is not None:
        if sparse_index is None or sparse_value is None:
            raise ValueError("sparse_index and sparse_value come together")
        out = out.reshape(-1).index_add(0, sparse_index, sparse_value.to(out.dtype)).view(weight.shape)
    if input_keep is not None:
        out = out * input_keep.to(out.dtype)
    return out
