"""How each delta part is held on the device and applied to a mixed batch.

One module per part of task-delta.md's formula, mirroring `adapters_store.format` (which
knows how a part is stored and validated):

- `keep_mask`  — `W ⊙ K`: materialised per batch into a scratch buffer, rows swapped out of the shared GEMM
- `low_rank`   — `B · A`: a rank-r correction on the task's rows
- `sparse`     — `S` on Ω: an index-add correction on the task's rows
- `head_keep`  — zeroes pruned heads' context columns before the attention output projection
- `pasta`      — vectors added at special-token positions before each layer
- `task_head`  — the task's pooler and classifier

Every prepared part reports `nbytes`: what it keeps resident on the device.
"""
