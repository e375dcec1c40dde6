"""The tenant-switching engine: one frozen backbone, any mix of tasks in one forward pass.

task-delta.md's formula is computed per row, each row with its own task's parts:

    y = x (W ⊙ K + B·A + S)ᵀ + b   on every linear module   (head keep zeroing pruned heads'
    context columns first; PASTA vectors added before each layer; the task's own head after)

The engine does what every device shares: rows sorted so each task's rows are contiguous (a
*segment*), padded once; PASTA added by a pre-hook on every layer for the whole batch; the
caller's order restored. The linear modules and the heads belong to a *backend*
(`server/backends/`): `cpu` runs per task segment on BLAS, `triton` runs grouped kernels on a
GPU — the same formula, each written once. With no plan active a backend's linear module is a
plain `nn.Linear`, which is how the dense baseline runs on the same module objects.

One forward runs at a time, under the engine's lock: plans are module state, and the CPU
backend's few-zero keep mask briefly zeroes the shared weight in place (restored before the lock
is released). Callers serialise through one worker; nothing else may read the weights while a
forward runs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from server.backbone import Backbone, EncodedText
from server.backends import Backend, Segment, create_backend
from server.delta import PreparedDelta
from server.parts.norms import NormBatch
from server.parts.pasta import PastaBatch


@dataclass(frozen=True)
class Row:
    """One input of a mixed batch: a task and its tokenised text."""

    delta: PreparedDelta
    text: EncodedText


@dataclass
class Batch:
    """A padded, task-sorted batch ready for the backbone."""

    order: list[int]  # order[i] = index in the caller's list of the i-th sorted row
    segments: list[Segment]
    inputs: dict[str, torch.Tensor]  # the model's keyword inputs
    lengths: list[int]

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]


@dataclass
class Planned:
    """A batch ready for `Engine.run`: padded, task-sorted, its module plans and PASTA built."""

    num_rows: int
    batch: Batch | None
    plans: dict[str, Any]
    pasta: PastaBatch | None
    norms: NormBatch | None = None


class Engine:
    def __init__(self, backbone: Backbone, backend: str | None = None) -> None:
        self.backbone = backbone
        self.backend: Backend = create_backend(backend or backbone.backend, backbone)
        self._lock = threading.Lock()
        self._pasta: PastaBatch | None = None
        self._norms: NormBatch | None = None
        self._hooks = backbone.add_layer_input_hooks(backbone.layers, self._add_pasta)
        for name in backbone.layer_norms:  # LayerNorm deltas and the embedding shift (server/parts/norms.py)
            module = backbone.model.get_submodule(name)
            self._hooks.append(module.register_forward_hook(self._after_norm_hook(name)))
            if name == backbone.embedding_norm:
                self._hooks.append(module.register_forward_pre_hook(self._shift_embeddings))

    def detach(self) -> None:
        """Remove this engine's hooks from the backbone (an engine given up for another one)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @property
    def mixed(self) -> dict[str, nn.Module]:
        """The backend's linear modules by name (they replaced the backbone's in place)."""
        return self.backend.linears  # type: ignore[return-value]

    # ------------------------------------------------------------------ public

    @torch.inference_mode()
    def forward(self, rows: Sequence[Row]) -> list[torch.Tensor]:
        """Each row's answer, in the caller's order: logits [C] (sequence) or [tokens, C] (token
        classification), or the float32 vector [D] of an embedding task."""
        return self.run(self.prepare(rows))

    def prepare(self, rows: Sequence[Row]) -> Planned:
        """Everything before the forward that needs no lock: collate, pad, plan, PASTA.

        The batcher runs this for the next batch while the current one is in `run`.
        """
        for row in rows:
            if row.delta.backend != self.backend.name:
                raise ValueError(f"task {row.delta.name!r} was prepared for the {row.delta.backend} backend, "
                                 f"this engine runs {self.backend.name}")
        if not rows:
            return Planned(0, None, {}, None)
        batch = self._collate(rows)
        plans = self.backend.plan(batch.segments, batch.input_ids.shape[1])
        pasta = PastaBatch.build([rows[i].text.special_tokens_mask for i in batch.order],
                                 [(s, e, d.pasta) for s, e, d in batch.segments], self.backbone.device)
        norms = NormBatch.build([(s, e, d.norms, d.embedding_shift) for s, e, d in batch.segments
                                 if d.norms or d.embedding_shift is not None], batch.inputs, self.backbone.hidden_size)
        return Planned(len(rows), batch, plans, pasta, norms)

    @torch.inference_mode()
    def run(self, planned: Planned) -> list[torch.Tensor]:
        """The forward of a prepared batch, under the engine's lock; answers in the caller's order."""
        batch = planned.batch
        if batch is None:
            return []
        hidden, pooled = self.run_backbone(planned)
        sorted_outputs = self.backend.classify(hidden, pooled, batch.segments, batch.lengths)
        outputs: list[torch.Tensor] = [torch.empty(0)] * planned.num_rows
        for sorted_index, original in enumerate(batch.order):
            outputs[original] = sorted_outputs[sorted_index]
        return outputs

    @torch.inference_mode()
    def run_backbone(self, planned: Planned) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The backbone's forward of a prepared batch with its plans and PASTA active, under the lock:
        `run` without the heads (what a benchmark's run-only side times against `run_dense`)."""
        assert planned.batch is not None
        with self._lock, self.backend.activate(planned.plans):
            self._pasta, self._norms = planned.pasta, planned.norms
            try:
                return self._run_backbone(planned.batch)
            finally:
                self._pasta = self._norms = None

    @torch.inference_mode()
    def forward_dense(self, texts: Sequence[EncodedText]) -> torch.Tensor:
        """The plain backbone on the same padded batch, no task parts: the dense baseline."""
        return self.run_dense(self.pad_dense(texts))

    def pad_dense(self, texts: Sequence[EncodedText]) -> Batch:
        """The dense baseline's padded batch (on the device), to time `run_dense` alone."""
        return self._pad(list(texts))

    @torch.inference_mode()
    def run_dense(self, batch: Batch) -> torch.Tensor:
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
        segments: list[Segment] = []
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

    def _run_backbone(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.backbone.model(**batch.inputs)
        pooled = getattr(out, "pooler_output", None) if self.backbone.has_pooler else None
        return out.last_hidden_state, pooled

    def _add_pasta(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """The layers' pre-hook (installed through `Backbone.add_layer_input_hooks`): PASTA of this batch."""
        pasta = self._pasta
        return None if pasta is None else pasta.add_before_layer(layer, hidden)

    def _after_norm_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._norms is not None:
                self._norms.after_norm(name, module, args[0], output)  # type: ignore[arg-type]

        return hook

    def _shift_embeddings(self, module: nn.Module, args: tuple) -> tuple | None:
        if self._norms is None or self._norms.shift is None:
            return None
        return (self._norms.before_embedding_norm(args[0]), *args[1:])
