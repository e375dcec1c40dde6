"""Engine backends: how the formula's linear-module parts and the task heads run on a device.

The engine (`server/engine.py`) owns what every backend shares: sorting rows into task
segments, padding, PASTA, the forward lock, the caller's order. A backend owns the rest:

- `install` replaces every `nn.Linear` of the backbone in place by its own linear class,
  which shares the very same weight and bias tensors (no copy);
- `plan` turns a batch's segments into per-module plans, built once per batch;
- `activate` hands each module its plan for one forward (None = a plain `nn.Linear`);
- `classify` runs the task heads (classifiers, and embeddings' pooling and projection).

Two backends compute exactly task-delta.md's formula, each tuned for its device:

- `cpu` (`backends/cpu.py`) — per task segment: BLAS GEMMs on views, a keep mask applied by
  zeroing the shared weight in place or by materialising `W ⊙ K` into a scratch buffer;
- `triton` (`backends/triton.py`) — grouped Triton kernels, one launch per module and part
  kind whatever the number of tasks, packed masks unpacked in registers.

Which one serves is decided here, once: `BACKEND_NAMES` is the one list of backends (the
settings, the parts registry and `create_backend` read it), `resolve_backend` turns `auto` into
one for the device, `serving_dtype` is the serving precision (float16 on CUDA), and
`server/backends/choice.py` starts the engine, checking the Triton backend on CUDA first.
Prepared parts are registered per backend in `server/parts/`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from server.pooling import row_mask

if TYPE_CHECKING:
    from server.backbone import Backbone
    from server.delta import PreparedDelta

Segment = tuple[int, int, "PreparedDelta"]  # rows [start, end) of the sorted batch, one task

# Every engine backend, by name; `auto` (settings, CLI) picks one of them with `resolve_backend`.
BACKEND_NAMES = ("cpu", "triton")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The engine backend for a device: `triton` (grouped kernels) on CUDA, `cpu` elsewhere.

    `triton` on a CPU device only runs under Triton's interpreter (TRITON_INTERPRET=1), which
    is how the kernels are tested without a GPU; anywhere else it is refused here, at start-up.
    """
    if backend in (None, "auto"):
        if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
            return "triton"
        return "cpu"
    if backend == "cpu":
        return "cpu"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ValueError("the triton backend needs the triton package: pip install 'deltaserve[gpu]'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the triton backend needs a CUDA device (or TRITON_INTERPRET=1 to test on CPU)")
        return "triton"
    raise ValueError(f"unknown engine backend {backend!r}: use auto or one of {', '.join(BACKEND_NAMES)}")


def serving_dtype(device: torch.device, dtype: torch.dtype | None = None) -> torch.dtype:
    """The backbone's precision when serving: `dtype` if given, else float16 on CUDA (the kernels
    accumulate in float32) and float32 elsewhere. Training keeps float32 weights (autocast)."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return dtype


class BackendLinear(nn.Linear):
    """Base of a backend's linear module: shares the base module's tensors, runs its plan."""

    def __init__(self, base: nn.Linear, name: str) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # shared, never copied
        self.bias = base.bias
        self.module_name = name
        self.plan: Any = None


class Backend:
    name: ClassVar[str]
    linear_class: ClassVar[type[BackendLinear]]

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self.linears: dict[str, BackendLinear] = {}

    def install(self) -> None:
        """Replace the backbone's linear modules in place by this backend's (idempotent)."""
        for name in self.backbone.linear_modules:
            self.linears[name] = self.backbone.replace_module(  # type: ignore[assignment]
                self.backbone.model, name,
                lambda base, name=name: base if type(base) is self.linear_class else self.make_linear(base, name))

    def make_linear(self, base: nn.Linear, name: str) -> BackendLinear:
        return self.linear_class(base, name)

    def plan(self, segments: Sequence[Segment], seq_len: int) -> dict[str, Any]:
        raise NotImplementedError

    @contextmanager
    def activate(self, plans: dict[str, Any]) -> Iterator[None]:
        for name, plan in plans.items():
            self.linears[name].plan = plan
        try:
            yield
        finally:
            for name in plans:
                self.linears[name].plan = None

    def classify(
        self, hidden: torch.Tensor, pooled: torch.Tensor | None, segments: Sequence[Segment], lengths: Sequence[int]
    ) -> list[torch.Tensor]:
        """Each sorted row's answer on the CPU: logits [C] (sequence), [tokens, C] (token
        classification), or a float32 vector [D] (embedding).

        Per segment, with one device-to-host copy per segment; a backend may group them.
        """
        mask = row_mask(lengths, hidden.shape[1], hidden.device)
        outputs: list[torch.Tensor] = []
        for start, end, delta in segments:
            head = delta.head
            if delta.meta.task_type == "token-classification":
                logits = head.classify_tokens(hidden[start:end]).float().cpu()
                outputs.extend(logits[i, : lengths[start + i]] for i in range(end - start))
            elif delta.meta.is_embedding:
                outputs.extend(head.embed(hidden[start:end], mask[start:end]).cpu().unbind(0))
            else:
                seg_pooled = pooled[start:end] if pooled is not None else None
                logits = head.classify_sequences(hidden[start:end], seg_pooled, mask[start:end])
                outputs.extend(logits.float().cpu().unbind(0))
        return outputs


def create_backend(name: str, backbone: Backbone) -> Backend:
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown engine backend {name!r}; backends are {', '.join(BACKEND_NAMES)}")
    if name == "cpu":
        from server.backends.cpu import CpuBackend

        return CpuBackend(backbone)
    from server.backends.triton import TritonBackend

    return TritonBackend(backbone)
