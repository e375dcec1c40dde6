"""The Triton backend: grouped kernels, one launch per module whatever the number of tasks.

Built for a GPU, where the CPU backend's per-segment loop would be launch-bound (16 tasks ×
37 modules × several ops is thousands of launches per batch) and would rebuild a full weight
per masked task. Here, per batch:

- one *plan* is built on the host and copied to the device once (`_Arena`): the segments
  (token rows and sequence rows, cut into row tiles that never straddle two tasks, see
  `triton_ops.SegmentPlan`) and, per module, pointer tables to each task's prepared parts;
- per linear module, the keep masks (read packed, unpacked in registers), the low-rank
  expand and the sparse part run in ONE `masked_linear` launch, plus one `lora_shrink` launch
  when a task has a low-rank part there; a module where no task has a keep mask runs the plain
  cuBLAS GEMM instead and adds its low-rank / sparse parts in one grouped launch each (cuBLAS
  is the better GEMM when no bit needs unpacking; the issue asks for whichever measures faster,
  and `bench/gpu_kernels.py` measures both on a GPU);
- head keep is one per-row multiply of the attention context by its task's head mask;
- PASTA is the engine's, for the whole batch; the task heads are grouped: every classifier of
  the batch in one GEMM and one gather (tasks with their own pooler or mean pooling get their
  classifier input per segment; embedding tasks are pooled and projected per segment).

The kernels (`triton_ops.py`) accumulate in fp32 whatever the backbone's dtype; the engine's
tolerance against the fp32 reference is stated in docs/gpu.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from server.backends import Backend, BackendLinear, Segment
from server.backends import triton_ops as ops
from server.parts import HEAD_KEEP, ModuleParts
from server.pooling import row_mask


class _Arena:
    """Collects the batch plan's integer tables on the host; one copy per dtype to the device."""

    def __init__(self) -> None:
        self._values: dict[torch.dtype, list[int]] = {torch.int64: [], torch.int32: []}
        self._slices: list[tuple[torch.dtype, int, int]] = []
        self._device_tables: dict[torch.dtype, torch.Tensor] = {}

    def add(self, values: Sequence[int], dtype: torch.dtype) -> int:
        store = self._values[dtype]
        self._slices.append((dtype, len(store), len(values)))
        store.extend(values)
        return len(self._slices) - 1

    def upload(self, device: torch.device) -> None:
        self._device_tables = {
            dtype: torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
            for dtype, values in self._values.items() if values
        }

    def __getitem__(self, handle: int) -> torch.Tensor:
        dtype, start, length = self._slices[handle]
        return self._device_tables[dtype][start:start + length]


@dataclass
class TritonModulePlan:
    """One module's share of the batch plan (device tensors), for token rows and sequence rows."""

    segments: ops.SegmentPlan
    sequence_segments: ops.SegmentPlan
    head_keep: torch.Tensor | None = None  # [N, 1, in]: the row's task's head mask, expanded to columns
    mask_ptrs: torch.Tensor | None = None  # int64 [S]; None when no task of the batch masks this module
    lora_a: torch.Tensor | None = None  # int64 [S]
    lora_b: torch.Tensor | None = None  # int64 [S]
    ranks: torch.Tensor | None = None  # int32 [S]
    max_rank: int = 0
    sparse: ops.SparseArgs | None = None


class TritonLinear(BackendLinear):
    """An `nn.Linear` running each row's task parts in grouped kernels: the formula, once for GPUs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan: TritonModulePlan | None = self.plan
        if plan is None:
            return F.linear(x, self.weight, self.bias)
        if plan.head_keep is not None:
            x = x * plan.head_keep
        rows = x.reshape(-1, x.shape[-1])
        segments = plan.segments if rows.shape[0] == plan.segments.num_rows else plan.sequence_segments
        if rows.shape[0] != segments.num_rows:
            raise RuntimeError(f"{self.module_name}: the plan covers {plan.segments.num_rows} token rows or "
                               f"{plan.sequence_segments.num_rows} sequences, got {tuple(x.shape)}")
        lora = None
        if plan.max_rank:
            assert plan.lora_a is not None and plan.lora_b is not None and plan.ranks is not None
            t = ops.lora_shrink(rows, segments, plan.lora_a, plan.ranks, plan.max_rank)
            lora = ops.LoraExpandArgs(t, plan.lora_b, plan.ranks)
        if plan.mask_ptrs is not None:
            y = ops.masked_linear(rows, self.weight, self.bias, segments, plan.mask_ptrs, lora=lora, sparse=plan.sparse)
        else:
            y = F.linear(rows, self.weight, self.bias)
            if lora is not None:
                ops.lora_expand(lora.t, segments, lora.b_ptrs, lora.ranks, y)
            if plan.sparse is not None:
                ops.sparse_add(rows, y, plan.sparse, segments)
        return y.view(*x.shape[:-1], self.out_features)


class TritonBackend(Backend):
    name = "triton"
    linear_class = TritonLinear

    def __init__(self, backbone: Any) -> None:
        super().__init__(backbone)
        self.install()

    def plan(self, segments: Sequence[Segment], seq_len: int) -> dict[str, TritonModulePlan]:
        device = self.backbone.device
        starts = [start for start, _, _ in segments]
        ends = [end for _, end, _ in segments]
        token_plan = ops.SegmentPlan.build([s * seq_len for s in starts], [e * seq_len for e in ends], device)
        sequence_plan = ops.SegmentPlan.build(starts, ends, device)
        arena = _Arena()
        # module -> [(segment index, its parts there)], modules in backbone order
        touched: dict[str, list[tuple[int, ModuleParts]]] = {}
        for index, (_, _, delta) in enumerate(segments):
            for name, parts in delta.modules.items():
                touched.setdefault(name, []).append((index, parts))
        pending: dict[str, dict[str, Any]] = {}
        for name, entries in touched.items():
            pending[name] = self._plan_module(entries, len(segments), arena)
        arena.upload(device)
        plans: dict[str, TritonModulePlan] = {}
        for name, fields in pending.items():
            plan = TritonModulePlan(token_plan, sequence_plan)
            for key in ("mask_ptrs", "lora_a", "lora_b", "ranks"):
                if key in fields:
                    setattr(plan, key, arena[fields[key]])
            plan.max_rank = fields.get("max_rank", 0)
            if "sparse" in fields:
                index_ptrs, value_ptrs, nnz = (arena[h] for h in fields["sparse"])
                plan.sparse = ops.SparseArgs(index_ptrs, value_ptrs, nnz)
            if "head_keep" in fields:
                plan.head_keep = self._head_keep_rows(fields["head_keep"], segments)
            plans[name] = plan
        return plans

    def _plan_module(self, entries: list[tuple[int, ModuleParts]], num_segments: int, arena: _Arena) -> dict:
        """Pointer tables of one module's parts, by segment (0 / rank 0 / nnz 0 = none)."""
        fields: dict[str, Any] = {}
        masks = [0] * num_segments
        a_ptrs, b_ptrs, ranks = [0] * num_segments, [0] * num_segments, [0] * num_segments
        index_ptrs, value_ptrs, nnz = [0] * num_segments, [0] * num_segments, [0] * num_segments
        head_keeps: list[tuple[int, Any]] = []
        for index, parts in entries:
            if (keep := parts.keep) is not None:
                masks[index] = keep.packed.data_ptr()
            if (low_rank := parts.low_rank) is not None:
                a_ptrs[index], b_ptrs[index], ranks[index] = low_rank.A.data_ptr(), low_rank.B.data_ptr(), low_rank.rank
            if (sparse := parts.sparse) is not None:
                index_ptrs[index], value_ptrs[index] = sparse.index.data_ptr(), sparse.values.data_ptr()
                nnz[index] = sparse.index.numel()
            if (head_keep := parts.get(HEAD_KEEP)) is not None:
                head_keeps.append((index, head_keep))
        if any(masks):
            fields["mask_ptrs"] = arena.add(masks, torch.int64)
        if any(ranks):
            fields["lora_a"] = arena.add(a_ptrs, torch.int64)
            fields["lora_b"] = arena.add(b_ptrs, torch.int64)
            fields["ranks"] = arena.add(ranks, torch.int32)
            fields["max_rank"] = max(ranks)
        if any(nnz):
            fields["sparse"] = (arena.add(index_ptrs, torch.int64), arena.add(value_ptrs, torch.int64),
                                arena.add(nnz, torch.int32))
        if head_keeps:
            fields["head_keep"] = head_keeps
        return fields

    def _head_keep_rows(self, head_keeps: list[tuple[int, Any]], segments: Sequence[Segment]) -> torch.Tensor:
        """[N, 1, d]: per sequence row, its task's keep of each head repeated over the head's columns."""
        backbone = self.backbone
        table = torch.stack([torch.ones_like(head_keeps[0][1].keep), *(part.keep for _, part in head_keeps)])
        entry = [0] * (segments[-1][1] if segments else 0)
        for position, (index, _) in enumerate(head_keeps, start=1):
            start, end, _ = segments[index]
            entry[start:end] = [position] * (end - start)
        rows = table[torch.tensor(entry, device=table.device)]  # [N, heads]
        return rows.repeat_interleave(backbone.head_dim, dim=1).unsqueeze(1)

    def classify(
        self, hidden: torch.Tensor, pooled: torch.Tensor | None, segments: Sequence[Segment], lengths: Sequence[int]
    ) -> list[torch.Tensor]:
        """Every classifier of the batch at once: one GEMM against all classifiers, one gather.

        Rows whose task pools differently from the backbone (its own pooler, or mean pooling)
        get their z per segment first; embedding rows are pooled and projected per segment.
        """
        outputs: list[torch.Tensor] = [torch.empty(0)] * (segments[-1][1] if segments else 0)
        sequence = [seg for seg in segments if seg[2].meta.task_type == "sequence-classification"]
        token = [seg for seg in segments if seg[2].meta.task_type == "token-classification"]
        embedding = [seg for seg in segments if seg[2].meta.is_embedding]
        mask = row_mask(lengths, hidden.shape[1], hidden.device)
        if sequence:
            rows = _rows_of(sequence, hidden.device)
            z = pooled[rows] if pooled is not None else hidden[rows, 0]
            cursor = 0
            for start, end, delta in sequence:  # a task's own pooler or mean pooling replaces the backbone's
                count, head = end - start, delta.head
                if head.pooler_weight is not None or head.pooling != "cls":
                    z[cursor:cursor + count] = head.sequence_input(hidden[start:end], None, mask[start:end])
                cursor += count
            logits = _grouped_heads(z, sequence).float().cpu()
            for offset, (position, count) in enumerate(_positions(sequence)):
                outputs[position] = logits[offset, :count]
        if token:
            rows = _rows_of(token, hidden.device)
            logits = _grouped_heads(hidden[rows], token).float().cpu()
            for offset, (position, count) in enumerate(_positions(token)):
                outputs[position] = logits[offset, : lengths[position], :count]
        for start, end, delta in embedding:
            outputs[start:end] = delta.head.embed(hidden[start:end], mask[start:end]).cpu().unbind(0)
        return outputs


def _rows_of(segments: Sequence[Segment], device: torch.device) -> torch.Tensor:
    rows = [row for start, end, _ in segments for row in range(start, end)]
    return torch.tensor(rows, dtype=torch.int64).to(device)


def _positions(segments: Sequence[Segment]) -> list[tuple[int, int]]:
    """(sorted row, its task's class count) for each row of these segments, in order."""
    return [(row, delta.head.classifier_weight.shape[0]) for start, end, delta in segments for row in range(start, end)]


def _grouped_heads(z: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
    """z [n, (L,) d] of these segments' rows -> logits [n, (L,) C_max], each row by its own task's classifier.

    All classifiers are concatenated ([ΣC, d], a few KB) and applied in one GEMM; a gather then
    keeps each row's own columns. ΣC is small (2 classes × 256 tasks = 512 columns), so the
    wasted columns cost less than one launch per task.
    """
    heads = [delta.head for _, _, delta in segments]
    weight = torch.cat([h.classifier_weight for h in heads])
    bias = torch.cat([h.classifier_bias for h in heads])
    counts = [h.classifier_weight.shape[0] for h in heads]
    widest = max(counts)
    offsets, first = [], 0
    for (start, end, _), count in zip(segments, counts, strict=True):
        offsets.extend([first] * (end - start))
        first += count
    columns = torch.tensor(offsets, dtype=torch.int64).unsqueeze(1) + torch.arange(widest)
    columns = columns.clamp_(max=weight.shape[0] - 1).to(z.device)  # past a row's own C: ignored on the host
    logits = F.linear(z, weight, bias)
    if z.dim() == 3:
        columns = columns.unsqueeze(1).expand(-1, z.shape[1], -1)
    return logits.gather(-1, columns)
