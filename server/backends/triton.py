"""The Triton backend: grouped kernels, one launch per module whatever the number of tasks.

Built for a GPU, where the CPU backend's per-segment loop would be launch-bound (16 tasks ×
37 modules × several ops is thousands of launches per batch) and would rebuild a full weight
per masked task.

**Per task, once** (`TaskTables`): a resident task gets a *slot* in device tables the first
time a batch uses it after it was loaded, and gives it back when it is evicted (when the cache
drops its last reference). Its column holds, for every linear module, what each of its parts'
Triton classes puts there (`table_fields` / `table_entries`: pointers to the packed mask, to A and
B, to the sorted sparse support, ranks and entry counts; 0 = none), its head keep per layer,
and host copies of the counts (which modules need which kernel).

**Per batch** (`plan`): host work in O(segments + row tiles), not O(tasks × modules): the row
tiles and each segment's slot go to the device in ONE copy, non-blocking from pinned memory
(it does not wait for the forward in flight); two gathers then give every module's per-segment
tables at once (`tables[:, :, slot of each segment]`), and one gather every layer's head keep
per row. Which modules need a masked GEMM, a low-rank or a sparse part, and the largest rank,
come from the host copies in one vectorised step over the batch's slots.

**Per module** (`TritonLinear`): the keep masks (read packed, unpacked in registers), the
low-rank expand and the sparse part run in ONE `masked_linear` launch, plus one `lora_shrink`
launch when a task has a low-rank part there; a module where no task has a keep mask runs the
plain cuBLAS GEMM instead and adds its low-rank / sparse parts in one grouped launch each; head
keep is one per-row multiply of the attention context. PASTA is the engine's, for the whole
batch; the task heads are grouped: every classifier of the batch in one GEMM and one gather
(tasks with their own pooler or mean pooling get their classifier input per segment; embedding
tasks are pooled and projected per segment).

The kernels (`triton_ops.py`) accumulate in fp32 whatever the backbone's dtype; docs/gpu.md
states the engine's tolerance against the fp32 reference.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from server.backends import Backend, BackendLinear, Segment
from server.backends import triton_ops as ops
from server.backends.uploads import aligned_length, upload_int_tables
from server.parts import BACKENDS, HEAD_KEEP, prepared_class
from server.pooling import l2_normalize, pool, row_mask

# Fields of the per-task device tables: every Triton part class declares its own (`table_fields`).
_PART_KINDS = ("keep", "low_rank", "sparse")


def _table_fields() -> dict[str, torch.dtype]:
    assert "triton" in BACKENDS
    fields: dict[str, torch.dtype] = {}
    for kind in _PART_KINDS:
        fields.update(prepared_class("triton", kind).table_fields)
    return fields


class TaskTables:
    """Slots of the resident tasks in device tables, filled once per task, gathered once per batch.

    `pointers[f, m, slot]` (int64) and `counts[f, m, slot]` (int32) hold field f of module m for
    the task in `slot`; `head_keep[layer, slot]` its 0/1 keep per head (ones without head keep).
    Host mirrors of the counts and of which modules each slot masks decide the kernels per batch.
Bias deltas live apart, in `bias[m]` ([slots, out] in the backbone's dtype, made when a first
task brings one for module m; a slot's row is zeros when its task has none there).
    Capacity doubles when full (the old tables stay alive for a plan that still uses them).
    """

    def __init__(self, module_names: Sequence[str], attention_outputs: Sequence[str], num_heads: int,
                 device: torch.device, dtype: torch.dtype, capacity: int = 16) -> None:
        fields = _table_fields()
        self.pointer_fields = [name for name, kind in fields.items() if kind == torch.int64]
        self.count_fields = [name for name, kind in fields.items() if kind == torch.int32]
        self.modules = {name: index for index, name in enumerate(module_names)}
        self.layers = {name: layer for layer, name in enumerate(attention_outputs)}
        self.num_heads = num_heads
        self.device, self.dtype = device, dtype
        self.capacity = 0
        num_modules = len(self.modules)
        self.pointers = torch.zeros((len(self.pointer_fields), num_modules, 0), dtype=torch.int64, device=device)
        self.counts = torch.zeros((len(self.count_fields), num_modules, 0), dtype=torch.int32, device=device)
        self.head_keep = torch.ones((len(self.layers), 0, num_heads), dtype=dtype, device=device)
        self.host_counts = np.zeros((0, len(self.count_fields), num_modules), dtype=np.int64)
        self.host_masked = np.zeros((0, num_modules), dtype=bool)
        self.host_head_keep = np.zeros((0, len(self.layers)), dtype=bool)
        self.bias: dict[int, torch.Tensor] = {}  # module -> [capacity, out]
        self.host_bias = np.zeros((0, num_modules), dtype=bool)
        self._slots: dict[int, int] = {}  # id(prepared delta) -> slot
        self._free: list[int] = []
        # Re-entrant: a delta collected while the lock is held (an allocation runs the GC) frees its slot.
        self._lock = threading.RLock()
        self._grow(capacity)

    def __len__(self) -> int:
        return len(self._slots)

    def slot(self, delta: Any) -> int:
        """The task's slot, assigned and filled the first time it is asked for."""
        key = id(delta)
        with self._lock:
            found = self._slots.get(key)
            if found is not None:
                return found
            if not self._free:
                self._grow(self.capacity * 2)
            slot = self._free.pop()
            self._fill(slot, delta)
            self._slots[key] = slot
        # Evicted = no longer referenced (the cache dropped it and no batch holds it): free the slot.
        weakref.finalize(delta, self._release, key)
        return slot

    def _release(self, key: int) -> None:
        with self._lock:
            slot = self._slots.pop(key, None)
            if slot is not None:
                self._free.append(slot)

    def _grow(self, capacity: int) -> None:
        capacity = max(16, -(-capacity // 16) * 16)
        extra = capacity - self.capacity

        def widen(table: torch.Tensor, dim: int, fill: float) -> torch.Tensor:
            shape = list(table.shape)
            shape[dim] = extra
            return torch.cat([table, torch.full(shape, fill, dtype=table.dtype, device=table.device)], dim=dim)

        self.pointers = widen(self.pointers, 2, 0)
        self.counts = widen(self.counts, 2, 0)
        self.head_keep = widen(self.head_keep, 1, 1)
        self.host_counts = np.concatenate([self.host_counts, np.zeros((extra, *self.host_counts.shape[1:]), np.int64)])
        self.host_masked = np.concatenate([self.host_masked, np.zeros((extra, self.host_masked.shape[1]), bool)])
        self.host_head_keep = np.concatenate(
            [self.host_head_keep, np.zeros((extra, self.host_head_keep.shape[1]), bool)])
        self.bias = {module: widen(table, 0, 0) for module, table in self.bias.items()}
        self.host_bias = np.concatenate([self.host_bias, np.zeros((extra, self.host_bias.shape[1]), bool)])
        self._free.extend(range(capacity - 1, self.capacity - 1, -1))
        self.capacity = capacity

    def _fill(self, slot: int, delta: Any) -> None:
        """Write the task's column: one host-to-device copy per table."""
        pointers = np.zeros((len(self.pointer_fields), len(self.modules)), dtype=np.int64)
        counts = np.zeros((len(self.count_fields), len(self.modules)), dtype=np.int64)
        masked = np.zeros(len(self.modules), dtype=bool)
        head_keep = torch.ones((len(self.layers), self.num_heads), dtype=self.dtype)
        has_head_keep = np.zeros(len(self.layers), dtype=bool)
        biased = np.zeros(len(self.modules), dtype=bool)
        for table in self.bias.values():
            table[slot] = 0  # the slot may have held another task's bias
        for name, parts in delta.modules.items():
            module = self.modules[name]
            if (bias := parts.get("bias")) is not None:
                if module not in self.bias:
                    self.bias[module] = torch.zeros((self.capacity, bias.delta.numel()), dtype=self.dtype,
                                                    device=self.device)
                self.bias[module][slot] = bias.delta
                biased[module] = True
            for kind in _PART_KINDS:
                part = parts.get(kind)
                if part is None:
                    continue
                for field, value in part.table_entries().items():
                    if field in self.pointer_fields:
                        pointers[self.pointer_fields.index(field), module] = value
                    else:
                        counts[self.count_fields.index(field), module] = value
            masked[module] = parts.replacing is not None
            if (keep := parts.get(HEAD_KEEP)) is not None:
                layer = self.layers[name]
                head_keep[layer] = keep.keep.cpu()
                has_head_keep[layer] = True
        self.pointers[:, :, slot] = torch.from_numpy(pointers).to(self.device)
        self.counts[:, :, slot] = torch.from_numpy(counts.astype(np.int32)).to(self.device)
        self.head_keep[:, slot] = head_keep.to(self.device)
        self.host_counts[slot] = counts
        self.host_masked[slot] = masked
        self.host_head_keep[slot] = has_head_keep
        self.host_bias[slot] = biased


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
    bias_rows: torch.Tensor | None = None  # [N, out]: each sequence row's task's bias delta (zeros: none)


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
        if plan.bias_rows is not None:  # one add for every row: its sequence's task's δb
            y.view(plan.bias_rows.shape[0], -1, self.out_features).add_(plan.bias_rows.unsqueeze(1))
        return y.view(*x.shape[:-1], self.out_features)


class TritonBackend(Backend):
    name = "triton"
    linear_class = TritonLinear

    def __init__(self, backbone: Any) -> None:
        super().__init__(backbone)
        self.install()
        self.tables = TaskTables(list(backbone.linear_modules), backbone.attention_output_modules,
                                 backbone.num_heads, backbone.device, backbone.dtype)

    def plan(self, segments: Sequence[Segment], seq_len: int) -> dict[str, TritonModulePlan]:
        if not segments:
            return {}
        tables = self.tables
        device = self.backbone.device
        slots = [tables.slot(delta) for _, _, delta in segments]
        starts = [start for start, _, _ in segments]
        ends = [end for _, end, _ in segments]
        num_segments = len(segments)
        # The batch's one upload: both row-tile plans, each segment's slot, each sequence row's slot.
        dtype = self.backbone.dtype
        token_host = ops.SegmentPlan.host_tables([s * seq_len for s in starts], [e * seq_len for e in ends],
                                                 dtype=dtype)
        sequence_host = ops.SegmentPlan.host_tables(starts, ends, dtype=dtype)
        padded_slots = slots + [slots[0]] * (aligned_length(num_segments, torch.int32) - num_segments)
        row_slots = [slot for slot, start, end in zip(slots, starts, ends, strict=True) for _ in range(start, end)]
        uploaded = upload_int_tables([*token_host.tables, *sequence_host.tables, padded_slots, row_slots],
                                     torch.int32, device, pin=True)
        token_plan = token_host.on_device(uploaded[0:4])
        sequence_plan = sequence_host.on_device(uploaded[4:8])
        segment_slots, row_slot = uploaded[8], uploaded[9]

        # Which modules need what, from the host mirrors: one vectorised step over the batch's slots.
        counts = tables.host_counts[slots]  # [S, fields, modules]
        max_counts = counts.max(axis=0)  # [fields, modules]
        masked = tables.host_masked[slots].any(axis=0)
        head_keep_layers = tables.host_head_keep[slots].any(axis=0)
        rank_field = tables.count_fields.index("ranks")
        nnz_field = tables.count_fields.index("nnz")
        biased = tables.host_bias[slots].any(axis=0)
        touched = masked | (max_counts > 0).any(axis=0) | biased
        if not touched.any() and not head_keep_layers.any():
            return {}

        # Every module's per-segment tables in two gathers; views [f, m, :S] start 16-byte aligned.
        pointers = tables.pointers.index_select(2, segment_slots)  # [fields, modules, S_pad]
        table_counts = tables.counts.index_select(2, segment_slots)
        field = {name: i for i, name in enumerate(tables.pointer_fields)}
        head_rows = None
        if head_keep_layers.any():  # [layers, N, 1, d]: each sequence row's task's head keep, per layer
            head_rows = tables.head_keep.index_select(1, row_slot).repeat_interleave(
                self.backbone.head_dim, dim=2).unsqueeze(2)

        plans: dict[str, TritonModulePlan] = {}
        names = list(tables.modules)
        for module in np.flatnonzero(touched).tolist():
            plan = TritonModulePlan(token_plan, sequence_plan)
            if masked[module]:
                plan.mask_ptrs = pointers[field["mask_ptrs"], module, :num_segments]
            if max_counts[rank_field, module]:
                plan.lora_a = pointers[field["lora_a"], module, :num_segments]
                plan.lora_b = pointers[field["lora_b"], module, :num_segments]
                plan.ranks = table_counts[rank_field, module, :num_segments]
                plan.max_rank = int(max_counts[rank_field, module])
            if max_counts[nnz_field, module]:
                plan.sparse = ops.SparseArgs(pointers[field["index_ptrs"], module, :num_segments],
                                             pointers[field["value_ptrs"], module, :num_segments],
                                             table_counts[nnz_field, module, :num_segments])
            if biased[module]:
                plan.bias_rows = tables.bias[module].index_select(0, row_slot)
            plans[names[module]] = plan
        if head_rows is not None:
            for name, layer in tables.layers.items():
                if head_keep_layers[layer]:
                    plans.setdefault(name, TritonModulePlan(token_plan, sequence_plan)).head_keep = head_rows[layer]
        return plans

    def classify(
        self, hidden: torch.Tensor, pooled: torch.Tensor | None, segments: Sequence[Segment], lengths: Sequence[int]
    ) -> list[torch.Tensor]:
        """Every head of the batch in a fixed number of launches, whatever the number of tasks.

        The same definitions as the per-segment heads (`server/parts/task_head.py`), grouped:
        each kind of pooling once over the rows that use it (`_pooled`), every task pooler or
        projection in one batched GEMM (`_per_task_linear`), every classifier in one GEMM and one
        gather (`_grouped_heads`), and one device-to-host copy per head kind.
        """
        outputs: list[torch.Tensor] = [torch.empty(0)] * (segments[-1][1] if segments else 0)
        sequence = [seg for seg in segments if seg[2].meta.task_type == "sequence-classification"]
        token = [seg for seg in segments if seg[2].meta.task_type == "token-classification"]
        embedding = [seg for seg in segments if seg[2].meta.is_embedding]
        mask = row_mask(lengths, hidden.shape[1], hidden.device)
        if sequence:
            rows = _rows_of(sequence, hidden.device)
            z = _pooled(hidden, mask, rows, sequence)
            if pooled is not None:  # `cls` tasks without their own pooler read the backbone's pooler output
                backbone = _row_flags(sequence, lambda d: d.head.pooling == "cls" and d.head.pooler_weight is None)
                if backbone is not None:
                    z = torch.where(backbone.to(z.device)[:, None], pooled[rows].to(z.dtype), z)
            z = _per_task_linear(z, sequence, "pooler", torch.tanh)
            logits = _grouped_heads(z.to(hidden.dtype), sequence).float().cpu()
            for offset, (position, count) in enumerate(_positions(sequence)):
                outputs[position] = logits[offset, :count]
        if token:
            rows = _rows_of(token, hidden.device)
            logits = _grouped_heads(hidden[rows], token).float().cpu()
            for offset, (position, count) in enumerate(_positions(token)):
                outputs[position] = logits[offset, : lengths[position], :count]
        if embedding:
            rows = _rows_of(embedding, hidden.device)
            vectors = _per_task_linear(_pooled(hidden, mask, rows, embedding), embedding, "projection", None)
            normalize = _row_flags(embedding, lambda d: d.head.normalize)
            vectors = vectors.float()
            if normalize is not None:
                vectors = torch.where(normalize.to(vectors.device)[:, None], l2_normalize(vectors), vectors)
            vectors = vectors.cpu()
            cursor = 0
            for start, end, delta in embedding:  # widths differ per task (projection): each row its own
                weight = delta.head.projection_weight
                width = hidden.shape[-1] if weight is None else weight.shape[0]
                outputs[start:end] = vectors[cursor:cursor + end - start, :width].unbind(0)
                cursor += end - start
        return outputs


def _row_flags(segments: Sequence[Segment], test) -> torch.Tensor | None:
    """A bool per row of these segments (their order) telling `test(delta)`; None when no row has it."""
    flags = [bool(test(delta)) for start, end, delta in segments for _ in range(start, end)]
    return torch.tensor(flags) if any(flags) else None


def _pooled(hidden: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
    """[n, d] pooled states of these rows, each by its task's pooling: the first token's state, and
    where any task pools by the mean, the float32 mean computed once for the rows that do."""
    z = hidden[rows, 0].float()
    mean = _row_flags(segments, lambda d: d.head.pooling == "mean")
    if mean is not None:
        z = torch.where(mean.to(z.device)[:, None], pool(hidden[rows], mask[rows], "mean"), z)
    return z


def _per_task_linear(z: torch.Tensor, segments: Sequence[Segment], which: str, activation) -> torch.Tensor:
    """Rows of tasks with their own `which` linear (the pooler, or an embedding's projection) through
    it, every such task in ONE batched GEMM: weights stacked [m, widest, in], rows gathered into
    [m, tallest, in] (padding rows compute and are dropped). Other rows pass unchanged. Float32
    [n, max(in, widest)], each row zero-padded past its own width."""
    owners = [(index, getattr(delta.head, f"{which}_weight"), getattr(delta.head, f"{which}_bias"))
              for index, (_, _, delta) in enumerate(segments) if getattr(delta.head, f"{which}_weight") is not None]
    if not owners:
        return z.float()
    firsts, cursor = [], 0
    for start, end, _ in segments:
        firsts.append(cursor)
        cursor += end - start
    counts = [segments[i][1] - segments[i][0] for i, _, _ in owners]
    tallest, widest = max(counts), max(weight.shape[0] for _, weight, _ in owners)
    dtype, device = owners[0][1].dtype, z.device
    if all(weight.shape[0] == widest and bias is not None for _, weight, bias in owners):  # the usual case
        weights = torch.stack([weight for _, weight, _ in owners])
        biases = torch.stack([bias for _, _, bias in owners]).unsqueeze(1)
    else:  # outputs of different widths: zero-padded side by side (zeros past a task's width stay 0)
        weights = torch.zeros((len(owners), widest, z.shape[1]), dtype=dtype, device=device)
        biases = torch.zeros((len(owners), 1, widest), dtype=dtype, device=device)
        for slot, (_, weight, bias) in enumerate(owners):
            weights[slot, : weight.shape[0]] = weight
            if bias is not None:
                biases[slot, 0, : weight.shape[0]] = bias
    gather = torch.tensor([[firsts[i] + min(r, count - 1) for r in range(tallest)]
                           for (i, _, _), count in zip(owners, counts, strict=True)], dtype=torch.int64).to(device)
    real = torch.tensor([[r < count for r in range(tallest)] for count in counts]).to(device)
    out = torch.baddbmm(biases, z[gather].to(dtype), weights.transpose(1, 2))  # [m, tallest, widest]
    if activation is not None:
        out = activation(out)
    width = max(z.shape[1], widest)
    result = F.pad(z.float(), (0, width - z.shape[1]))
    result[gather[real]] = F.pad(out[real].float(), (0, width - widest))
    return result


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
