"""The tenant-switching engine: one frozen backbone, any mix of tasks in one forward pass.

This module is where task-delta.md's formula lives. Every `nn.Linear` of the backbone is
replaced in place by a `MixedLinear` that shares the very same weight and bias tensors and, for
a batch whose rows belong to different tasks, computes per row

    y = x (W ⊙ K + B·A + S)ᵀ + b        (with K, B·A, S of that row's task; absent = identity)

Rows are sorted so that each task's rows are contiguous (a *segment*). Per module:

- rows of tasks with no part there are covered by the shared GEMM, once, for all of them;
- a task with a keep mask there is swapped out of the shared GEMM and multiplied by `W ⊙ K`:
  the shared weight zeroed in place and restored (few zeros), or `W ⊙ K (+ B·A + S)` built in
  a scratch buffer (dense masks); see `parts/keep_mask.py` for why;
- other tasks get in-place corrections on their rows: `B·A` by two small GEMMs, `S` by an
  index-add (see `parts/low_rank.py`, `parts/sparse.py`);
- pruned heads zero their context columns before the attention output projection.

PASTA vectors are added by a pre-hook on every layer; heads run per segment after the
backbone. With no plan installed (`plan is None`) a `MixedLinear` is a plain `nn.Linear`, which
is how the dense baseline runs on the same module objects.

One forward runs at a time, under the engine's lock: plans are module state, and a few-zero keep
mask briefly zeroes the shared weight in place (restored before the lock is released). Callers
serialise through one worker; nothing else may read the weights while a forward runs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from server.backbone import Backbone, EncodedText
from server.delta import ModuleParts, PreparedDelta
from server.parts.head_keep import PreparedHeadKeep
from server.parts.pasta import PastaBatch


@dataclass(frozen=True)
class Row:
    """One input of a mixed batch: a task and its tokenised text."""

    delta: PreparedDelta
    text: EncodedText


@dataclass
class ModulePlan:
    """What one linear module does for one batch; rows are ranges of the sorted batch."""

    num_rows: int
    zero_inputs: list[tuple[int, int, PreparedHeadKeep]] = field(default_factory=list)
    replaced: list[tuple[int, int, ModuleParts]] = field(default_factory=list)
    corrections: list[tuple[int, int, ModuleParts]] = field(default_factory=list)

    def shared_runs(self) -> list[tuple[int, int]]:
        """Maximal row ranges not swapped out of the shared GEMM."""
        runs, cursor = [], 0
        for start, end, _ in sorted(self.replaced, key=lambda item: item[0]):
            if start > cursor:
                runs.append((cursor, start))
            cursor = end
        if cursor < self.num_rows:
            runs.append((cursor, self.num_rows))
        return runs


class ScratchPool:
    """One reusable weight-sized buffer per shape: where `W ⊙ K` is materialised."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.dtype, like.device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty_like(like)
        return self._buffers[key]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def _linear_into(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    x2 = x.reshape(-1, x.shape[-1])
    out2 = out.view(-1, out.shape[-1])
    if bias is None:
        torch.mm(x2, weight.t(), out=out2)
    else:
        torch.addmm(bias, x2, weight.t(), out=out2)


def _add_corrections(x: torch.Tensor, y: torch.Tensor, parts: ModuleParts) -> None:
    """Low-rank and sparse parts as in-place corrections on one task's rows."""
    x_rows = x.reshape(-1, x.shape[-1])
    y_rows = y.view(-1, y.shape[-1])
    if parts.low_rank is not None:
        parts.low_rank.add_to_rows(x_rows, y_rows)
    if parts.sparse is not None:
        parts.sparse.add_to_rows(x_rows, y_rows)


class MixedLinear(nn.Linear):
    """An `nn.Linear` that applies each row's task parts: the formula, in one place."""

    def __init__(self, base: nn.Linear, name: str, scratch: ScratchPool) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # shared, never copied
        self.bias = base.bias
        self.module_name = name
        self.scratch = scratch
        self.plan: ModulePlan | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if plan is None:
            return F.linear(x, self.weight, self.bias)
        if x.shape[0] != plan.num_rows:
            raise RuntimeError(f"{self.module_name}: expected {plan.num_rows} rows on dim 0, got {tuple(x.shape)}")
        if plan.zero_inputs:
            x = x.clone()  # the attention context may be referenced elsewhere; never edit the caller's tensor
            for start, end, head_keep in plan.zero_inputs:
                head_keep.zero_rows(x[start:end])
        if plan.replaced:
            x = x.contiguous()
            y = x.new_empty((*x.shape[:-1], self.out_features))
            for start, end in plan.shared_runs():
                _linear_into(x[start:end], self.weight, self.bias, y[start:end])
            for start, end, parts in plan.replaced:
                keep = parts.keep
                assert keep is not None
                if keep.in_place:
                    with keep.zeroed(self.weight) as masked:
                        _linear_into(x[start:end], masked, self.bias, y[start:end])
                    _add_corrections(x[start:end], y[start:end], parts)
                else:
                    buffer = keep.materialise_into(self.weight, self.scratch.get(self.weight))
                    if parts.low_rank is not None:
                        parts.low_rank.add_to_weight(buffer)
                    if parts.sparse is not None:
                        parts.sparse.add_to_weight(buffer)
                    _linear_into(x[start:end], buffer, self.bias, y[start:end])
        else:
            y = F.linear(x, self.weight, self.bias)
        for start, end, parts in plan.corrections:
            _add_corrections(x[start:end], y[start:end], parts)
        return y


@dataclass
class Batch:
    """A padded, task-sorted batch ready for the backbone."""

    order: list[int]  # order[i] = index in the caller's list of the i-th sorted row
    segments: list[tuple[int, int, PreparedDelta]]
    inputs: dict[str, torch.Tensor]  # the model's keyword inputs
    lengths: list[int]

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]


class Engine:
    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self.scratch = ScratchPool()
        self._lock = threading.Lock()
        self._pasta: PastaBatch | None = None
        self.mixed: dict[str, MixedLinear] = {}
        model = backbone.model
        for name in backbone.linear_modules:
            base = model.get_submodule(name)
            mixed = base if isinstance(base, MixedLinear) else MixedLinear(base, name, self.scratch)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, mixed)
            self.mixed[name] = mixed
        for index, layer in enumerate(backbone.layers):
            layer.register_forward_pre_hook(self._pasta_hook(index), with_kwargs=True)

    # ------------------------------------------------------------------ public

    @torch.inference_mode()
    def forward(self, rows: Sequence[Row]) -> list[torch.Tensor]:
        """Logits per row, in the caller's order: [C] (sequence) or [tokens, C] (token classification)."""
        if not rows:
            return []
        batch = self._collate(rows)
        plans = self._plan(batch)
        pasta = PastaBatch.build(
            self.backbone.special_slots([rows[i].text for i in batch.order]),
            [(s, e, d.pasta) for s, e, d in batch.segments],
        )
        with self._lock:
            for name, plan in plans.items():
                self.mixed[name].plan = plan
            self._pasta = pasta
            try:
                hidden, pooled = self._run_backbone(batch)
            finally:
                for name in plans:
                    self.mixed[name].plan = None
                self._pasta = None
        sorted_outputs: list[torch.Tensor] = []
        for start, end, delta in batch.segments:
            # One device-to-host copy per segment, not per row.
            if delta.meta.task_type == "token-classification":
                logits = delta.head.classify_tokens(hidden[start:end]).float().cpu()
                sorted_outputs.extend(logits[i, : batch.lengths[start + i]] for i in range(end - start))
            else:
                seg_pooled = pooled[start:end] if pooled is not None else None
                logits = delta.head.classify_sequences(hidden[start:end], seg_pooled).float().cpu()
                sorted_outputs.extend(logits.unbind(0))
        outputs: list[torch.Tensor] = [torch.empty(0)] * len(rows)
        for sorted_index, original in enumerate(batch.order):
            outputs[original] = sorted_outputs[sorted_index]
        return outputs

    @torch.inference_mode()
    def forward_dense(self, texts: Sequence[EncodedText]) -> torch.Tensor:
        """The plain backbone on the same padded batch, no task parts: the dense baseline."""
        batch = self._pad(list(texts))
        with self._lock:
            hidden, _ = self._run_backbone(batch)
        return hidden

    # ------------------------------------------------------------------ internals

    def _collate(self, rows: Sequence[Row]) -> Batch:
        # Tasks in order of first appearance, those with keep masks last, so the shared GEMM
        # covers one long run of rows and the swapped-out segments sit at the end.
        first_seen: dict[int, int] = {}
        for index, row in enumerate(rows):
            first_seen.setdefault(id(row.delta), index)
        order = sorted(
            range(len(rows)),
            key=lambda i: (rows[i].delta.has_keep_mask, first_seen[id(rows[i].delta)], i),
        )
        batch = self._pad([rows[i].text for i in order])
        batch.order = order
        segments: list[tuple[int, int, PreparedDelta]] = []
        for position, original in enumerate(order):
            delta = rows[original].delta
            if segments and segments[-1][2] is delta:
                start, _, _ = segments[-1]
                segments[-1] = (start, position + 1, delta)
            else:
                segments.append((position, position + 1, delta))
        batch.segments = segments
        return batch

    def _pad(self, texts: list[EncodedText]) -> Batch:
        lengths = [len(t.input_ids) for t in texts]
        return Batch(order=list(range(len(texts))), segments=[], inputs=self.backbone.pad(texts), lengths=lengths)

    def _plan(self, batch: Batch) -> dict[str, ModulePlan]:
        num_rows = batch.input_ids.shape[0]
        plans: dict[str, ModulePlan] = {}
        for start, end, delta in batch.segments:
            for name, parts in delta.modules.items():
                plan = plans.get(name)
                if plan is None:
                    plan = plans[name] = ModulePlan(num_rows)
                if parts.head_keep is not None:
                    plan.zero_inputs.append((start, end, parts.head_keep))
                if parts.keep is not None:
                    plan.replaced.append((start, end, parts))
                elif parts.low_rank is not None or parts.sparse is not None:
                    plan.corrections.append((start, end, parts))
        return plans

    def _run_backbone(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.backbone.model(**batch.inputs)
        pooled = getattr(out, "pooler_output", None) if self.backbone.has_pooler else None
        return out.last_hidden_state, pooled

    def _pasta_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            pasta = self._pasta
            if pasta is None:
                return None
            if args:
                return (pasta.add_before_layer(layer, args[0]), *args[1:]), kwargs
            for key in ("hidden_states", "x"):
                if key in kwargs:
                    return args, {**kwargs, key: pasta.add_before_layer(layer, kwargs[key])}
            raise RuntimeError(f"layer {layer}: cannot find the hidden states among the layer's inputs")

        return hook
