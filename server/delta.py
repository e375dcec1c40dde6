"""A task delta made ready for the engine: validated, on the device, in its serving form.

`prepare_delta` is the one function from a delta's bytes to a ready `PreparedDelta`
(validation included); it is what the device cache calls on a miss and what the cold-load
benchmark times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from adapters_store.format import DeltaMeta, TaskDelta, TaskHead, parse_delta
from server.backbone import Backbone
from server.parts import HEAD_KEEP, ModuleParts, PrepareContext, prepare_part
from server.parts.norms import PreparedNorm, PreparedShift
from server.parts.pasta import PreparedPasta
from server.parts.task_head import PreparedTaskHead

__all__ = ["BACKBONE_TASK", "BACKBONE_TASK_UNNORMALISED", "ModuleParts", "PreparedDelta", "builtin_tasks",
           "prepare", "prepare_delta"]

# The bare backbone's keys among the batcher's tasks: no stored task can have them (names start
# with a letter or digit), so a task named like the backbone never shadows it, nor it the task.
BACKBONE_TASK = ":backbone"
BACKBONE_TASK_UNNORMALISED = ":backbone:unnormalised"  # TEI's `normalize: false`


@dataclass(eq=False)
class PreparedDelta:
    """Only the serving form is kept: the parsed file's tensors are dropped once prepared."""

    name: str
    version: int
    meta: DeltaMeta
    head: PreparedTaskHead
    modules: dict[str, ModuleParts] = field(default_factory=dict)
    pasta: PreparedPasta | None = None
    norms: dict[str, PreparedNorm] = field(default_factory=dict)  # LayerNorm module -> δγ, δβ
    embedding_shift: PreparedShift | None = None
    load_seconds: float = 0.0
    backend: str = "cpu"
    # The parsed delta, kept only when asked (`keep_source`): the benchmark's baselines build dense weights
    # from it (`TaskDelta.dense_weight`); the server never keeps it.
    source: TaskDelta | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)

    @property
    def has_keep_mask(self) -> bool:
        return any(parts.replacing is not None for parts in self.modules.values())

    @property
    def nbytes(self) -> int:
        """Bytes this task keeps resident on the device."""
        total = self.head.nbytes + (self.pasta.nbytes if self.pasta else 0)
        total += sum(norm.nbytes for norm in self.norms.values())
        total += self.embedding_shift.nbytes if self.embedding_shift else 0
        return total + sum(parts.nbytes for parts in self.modules.values())


def prepare(delta: TaskDelta, backbone: Backbone, name: str, version: int, backend: str | None = None,
            *, keep_source: bool = False) -> PreparedDelta:
    """Move an already validated delta to the backbone's device in `backend`'s serving form.

    Driven by the parts registry alone: every module part is prepared by the class registered
    for its kind and this backend; head keeps (keyed by layer in the file) join the parts of
    their layer's attention output projection, where they act.
    """
    started = time.perf_counter()
    backend = backend or backbone.backend
    context = PrepareContext(backbone.device, backbone.dtype, backbone.head_dim)
    modules: dict[str, ModuleParts] = {}
    for layer, head_keep in delta.head_keep.items():
        if head_keep.dropped_heads:
            module = backbone.attention_output_modules[layer]
            modules[module] = ModuleParts({HEAD_KEEP: prepare_part(backend, HEAD_KEEP, head_keep, context)})
    for module, found in delta.module_parts.items():
        parts = modules.setdefault(module, ModuleParts())
        for kind, part in found.items():
            parts[kind] = prepare_part(backend, kind, part, context)
    prepared = PreparedDelta(
        name=name,
        version=version,
        meta=delta.meta,
        head=PreparedTaskHead(delta.head, backbone.device, backbone.dtype, delta.meta),
        modules=modules,
        pasta=PreparedPasta(delta.pasta, backbone.device, backbone.dtype) if delta.pasta is not None else None,
        norms={module: PreparedNorm(norm, backbone.layer_norms[module], backbone.device, backbone.dtype)
               for module, norm in delta.norms.items()},
        embedding_shift=(PreparedShift(delta.embedding_shift, backbone.device, backbone.dtype)
                         if delta.embedding_shift is not None else None),
        backend=backend,
        source=delta if keep_source else None,
    )
    prepared.load_seconds = time.perf_counter() - started
    return prepared


def prepare_delta(
    data: bytes, backbone: Backbone, name: str, version: int = 1, backend: str | None = None,
    *, keep_source: bool = False,
) -> PreparedDelta:
    """Bytes of a delta file -> validated, device-ready delta. Raises InvalidDelta/BackboneMismatch."""
    started = time.perf_counter()
    prepared = prepare(parse_delta(data, backbone.spec()), backbone, name, version, backend, keep_source=keep_source)
    prepared.load_seconds = time.perf_counter() - started
    return prepared


def backbone_embedding(backbone: Backbone, backend: str | None = None, normalize: bool = True) -> PreparedDelta:
    """The bare backbone as an embedding model (task-delta.md, Head): no parts, mean-pooled, normalised.

    For a sentence-transformers model such as all-MiniLM-L6-v2 this is its own
    `encode(..., normalize_embeddings=True)`. It runs in the mixed batch like any task.
    """
    meta = DeltaMeta(method="backbone", task_type="embedding", labels=(), backbone_fingerprint=backbone.fingerprint,
                     description=f"the bare backbone {backbone.name}", pooling="mean", normalize=normalize)
    return PreparedDelta(name=backbone.name, version=0, meta=meta,
                         head=PreparedTaskHead(TaskHead(None, None), backbone.device, backbone.dtype, meta),
                         backend=backend or backbone.backend)


def builtin_tasks(backbone: Backbone, backend: str | None = None) -> dict[str, PreparedDelta]:
    """The tasks the batcher knows without the store: the bare backbone, normalised or not."""
    return {BACKBONE_TASK: backbone_embedding(backbone, backend),
            BACKBONE_TASK_UNNORMALISED: backbone_embedding(backbone, backend, normalize=False)}
