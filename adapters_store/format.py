"""The task-delta file (`task-delta/1`): parse, validate, write, and count bytes.

One safetensors file per task (see docs/delta-format.md). `parse_delta` is the
only way in: it checks every rule of the spec against a `BackboneSpec` and either returns
a fully typed `TaskDelta` or raises `InvalidDelta` naming the offending key, so nothing
half-valid ever reaches the store or the engine.

Each delta part is a small dataclass that knows its keys, how to validate them, its byte
size and its dense effect on a weight (through `adapters_store.formula`, the one dense
formula). Parts that live on a linear module (keep mask, low rank, sparse) are registered
once with `register_module_part`: the key suffixes the parser accepts, the grouping of a
delta by module and the byte counts all derive from that registry, so a new part is one
class here plus its prepared classes in `server/parts/` (one per backend) and its trainable class
in `training/parts.py`. How a part is
*applied* to a mixed batch lives there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters_store.formula import effective_weight
from adapters_store.packing import packed_length, pad_bits_are_zero, unpack_bits

FORMAT = "task-delta/1"
METHODS = ("mask", "pasta", "dsee", "lora", "full-head", "imported")
TASK_TYPES = ("sequence-classification", "token-classification", "embedding")
PROBLEM_TYPES = ("single_label", "regression")
WORD_PIECES = ("first", "last")
POOLINGS = ("cls", "mean")
# The pooling a task type reads when its metadata names none (task-delta.md, Head).
DEFAULT_POOLING = {"sequence-classification": "cls", "embedding": "mean"}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The safetensors dtypes a delta's tensors may have: float (above), uint8 (masks) and int64 (indices).
# Checked in the header before any tensor is built: the reader knows no torch type for some dtypes
# the file format names (F8_E8M0, F4, F6_*), and loading those was a KeyError (a 500).
FILE_DTYPES = ("F32", "F16", "BF16", "U8", "I64")
# Largest magnitude of any float value: what float16 (a GPU serving dtype) holds. No trained delta
# comes near it, and a value past it overflows the forward pass (a 3e38 head made every answer inf).
MAX_ABS_VALUE = 65504.0

TaskType = Literal["sequence-classification", "token-classification", "embedding"]


class InvalidDelta(ValueError):
    """The file breaks a rule of task-delta.md; `key` names what is wrong."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{shown_key(key)}: {problem}")


def shown_key(key: str, limit: int = 200) -> str:
    """A key as a message can carry it: lone surrogates escaped (a JSON answer must encode it as UTF-8)
    and a key of thousands of characters cut to its start and its length."""
    if not is_utf8_text(key):
        key = key.encode("utf-8", "backslashreplace").decode("utf-8")
    return key if len(key) <= limit else f"{key[:limit]}... ({len(key)} characters)"


def is_utf8_text(text: str) -> bool:
    """Whether `text` can be written as UTF-8: no lone surrogate (JSON's `\\ud800` escape decodes to one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(key: str, text: str) -> str:
    """`text` if it can be written as UTF-8, else InvalidDelta naming `key`.

    Every string of a delta is shown again later (labels in each prediction, the description in
    the task list), as UTF-8 JSON; a lone surrogate cannot be, and once stored it made every
    listing a 500.
    """
    if not is_utf8_text(text):
        at = next(i for i, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF)
        raise InvalidDelta(key, f"holds a lone UTF-16 surrogate (U+{ord(text[at]):04X} at character {at}), "
                                f"which is not text; strings must be valid Unicode")
    return text


class BackboneMismatch(InvalidDelta):
    """The delta was made for another backbone (HTTP 409, not 422)."""


@dataclass(frozen=True)
class BackboneSpec:
    """What validation needs to know of the backbone, with no torch module in sight."""

    fingerprint: str
    num_layers: int
    hidden_size: int
    num_heads: int
    linear_modules: Mapping[str, tuple[int, int]]
    has_pooler: bool
    max_length: int = 512
    # LayerNorm module -> its width, and the one that normalises the embeddings' sum (norm deltas).
    layer_norms: Mapping[str, int] = field(default_factory=dict)
    embedding_norm: str | None = None
    type_vocab_size: int = 0  # token types the embeddings know (0: none)


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class DeltaMeta:
    method: str
    task_type: TaskType
    labels: tuple[str, ...]
    backbone_fingerprint: str
    problem_type: str = "single_label"
    max_length: int | None = None
    word_piece: str = "first"
    description: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)
    # None: the task type's default (DEFAULT_POOLING); resolved on construction, so readers see cls or mean.
    pooling: str | None = None
    normalize: bool = True  # embedding only: L2-normalise the vector

    def __post_init__(self) -> None:
        if self.pooling is None and self.task_type in DEFAULT_POOLING:
            object.__setattr__(self, "pooling", DEFAULT_POOLING[self.task_type])

    @property
    def is_regression(self) -> bool:
        return self.problem_type == "regression"

    @property
    def is_embedding(self) -> bool:
        return self.task_type == "embedding"

    @property
    def mean_pooling(self) -> bool:
        """The sequence's vector is the mean over its non-padding tokens, not the first token's state."""
        return self.pooling == "mean"

    def to_metadata(self) -> dict[str, str]:
        out = dict(self.extra)
        out.update(
            format=FORMAT,
            method=self.method,
            task_type=self.task_type,
            labels=json.dumps(list(self.labels)),
            backbone_fingerprint=self.backbone_fingerprint,
            problem_type=self.problem_type,
            word_piece=self.word_piece,
        )
        if self.max_length is not None:
            out["max_length"] = str(self.max_length)
        if self.description:
            out["description"] = self.description
        if self.task_type in DEFAULT_POOLING and self.pooling != DEFAULT_POOLING[self.task_type]:
            out["pooling"] = str(self.pooling)
        if self.is_embedding and not self.normalize:
            out["normalize"] = "false"
        return out

    @classmethod
    def parse(cls, metadata: Mapping[str, str] | None, spec: BackboneSpec) -> DeltaMeta:
        md = dict(metadata or {})

        def required(key: str) -> str:
            if key not in md:
                raise InvalidDelta(key, "required metadata field is missing")
            return md[key]

        if required("format") != FORMAT:
            raise InvalidDelta("format", f"must be {FORMAT!r}, got {md['format']!r}")
        method = required("method")
        if method not in METHODS:
            raise InvalidDelta("method", f"must be one of {', '.join(METHODS)}; got {method!r}")
        task_type = required("task_type")
        if task_type not in TASK_TYPES:
            raise InvalidDelta("task_type", f"must be one of {', '.join(TASK_TYPES)}; got {task_type!r}")
        try:
            labels = json.loads(required("labels"))
        except json.JSONDecodeError as err:
            raise InvalidDelta("labels", f"is not valid JSON ({err.msg})") from None
        except RecursionError:
            raise InvalidDelta("labels", "is JSON nested too deeply") from None
        if task_type == "embedding":
            if labels != []:
                raise InvalidDelta("labels", "must be [] for embedding (an embedding task has no classes)")
        elif not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise InvalidDelta("labels", "must be a non-empty JSON array of strings")
        for i, label in enumerate(labels):
            check_text(f"labels[{i}]", label)
        if len(set(labels)) != len(labels):
            raise InvalidDelta("labels", "label names must be distinct")
        problem_type = md.get("problem_type", "single_label")
        if problem_type not in PROBLEM_TYPES:
            raise InvalidDelta("problem_type", f"must be one of {', '.join(PROBLEM_TYPES)}")
        if problem_type == "regression" and (len(labels) != 1 or task_type != "sequence-classification"):
            raise InvalidDelta("problem_type", "regression needs one label and sequence-classification")
        fingerprint = required("backbone_fingerprint")
        if fingerprint != spec.fingerprint:
            raise BackboneMismatch(
                "backbone_fingerprint",
                f"delta was made for backbone {fingerprint!r}; this server runs {spec.fingerprint!r}",
            )
        max_length = None
        if "max_length" in md:
            try:
                max_length = int(md["max_length"])
            except ValueError:
                raise InvalidDelta("max_length", "must be an integer") from None
            if not 2 <= max_length <= spec.max_length:
                raise InvalidDelta("max_length", f"must be between 2 and {spec.max_length}")
        word_piece = md.get("word_piece", "first")
        if word_piece not in WORD_PIECES:
            raise InvalidDelta("word_piece", "must be 'first' or 'last'")
        pooling = md.get("pooling")
        if pooling is not None:
            if task_type not in DEFAULT_POOLING:
                raise InvalidDelta("pooling", f"applies to sequence-classification and embedding, not {task_type}")
            if pooling not in POOLINGS:
                raise InvalidDelta("pooling", f"must be 'cls' or 'mean'; got {pooling!r}")
        normalize = md.get("normalize", "true")
        if "normalize" in md and task_type != "embedding":
            raise InvalidDelta("normalize", f"applies to embedding only, not {task_type}")
        if normalize not in ("true", "false"):
            raise InvalidDelta("normalize", f"must be 'true' or 'false'; got {normalize!r}")
        known = {"format", "method", "task_type", "labels", "problem_type", "backbone_fingerprint",
                 "max_length", "word_piece", "description", "pooling", "normalize"}
        return cls(
            method=method,
            task_type=task_type,  # type: ignore[arg-type]
            labels=tuple(labels),
            backbone_fingerprint=fingerprint,
            problem_type=problem_type,
            max_length=max_length,
            word_piece=word_piece,
            description=md.get("description", ""),
            extra={k: v for k, v in md.items() if k not in known},
            pooling=pooling,
            normalize=normalize == "true",
        )


# --------------------------------------------------------------------------- parts


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _present(keyed: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """The file's tensors of a part whose pieces are each optional (an absent one is zero, not stored)."""
    return {key: tensor for key, tensor in keyed.items() if tensor is not None}


def _check_float(key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise InvalidDelta(key, f"dtype must be float32, float16 or bfloat16, got {tensor.dtype}")
    _check_shape(key, tensor, shape)
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidDelta(key, "contains NaN or infinity")
    if tensor.numel() and float(tensor.abs().max()) > MAX_ABS_VALUE:
        raise InvalidDelta(key, f"has a value of magnitude {float(tensor.abs().max()):.3g}; values must lie within "
                           f"±{MAX_ABS_VALUE:g} (what float16 holds) or the forward pass overflows")


def _check_shape(key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise InvalidDelta(key, f"shape must be {list(shape)}, got {list(tensor.shape)}")


def _check_dtype(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    if tensor.dtype != dtype:
        raise InvalidDelta(key, f"dtype must be {str(dtype).removeprefix('torch.')}, got {tensor.dtype}")


class ModulePart:
    """A part of the formula that lives on one `nn.Linear` of the backbone.

    Subclasses set `kind` (the registry key, also the prepared classes' key) and `suffixes`
    (the tensor keys `<module>.<suffix>` they own), and implement `parse` (validate the
    tensors found under those suffixes), `tensors`, `nbytes` and `dense_effect` (this part's
    term of `W ⊙ K + B·A + S`, applied to a weight; parts compose in registration order).
    """

    kind: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]
    module: str

    @classmethod
    def parse(cls, module: str, shape: tuple[int, int], found: Mapping[str, torch.Tensor]) -> ModulePart:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def dense_effect(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


MODULE_PARTS: dict[str, type[ModulePart]] = {}
"""kind -> format class, in formula order (the keep mask first: it multiplies, the rest add)."""
_PART_OF_SUFFIX: dict[str, type[ModulePart]] = {}


def register_module_part(cls: type[ModulePart]) -> type[ModulePart]:
    """Register a module part class (decorator). Its suffixes become valid tensor keys."""
    if cls.kind in MODULE_PARTS:
        raise ValueError(f"module part kind {cls.kind!r} is registered twice")
    for suffix in cls.suffixes:
        if suffix in _PART_OF_SUFFIX:
            raise ValueError(f"suffix {suffix!r} already belongs to {_PART_OF_SUFFIX[suffix].__name__}")
        _PART_OF_SUFFIX[suffix] = cls
    MODULE_PARTS[cls.kind] = cls
    return cls


def module_part_of_suffix(suffix: str) -> type[ModulePart] | None:
    """The registered part owning tensor keys `<module>.<suffix>`, or None."""
    return _PART_OF_SUFFIX.get(suffix)


def _both_or_neither(module: str, found: Mapping[str, torch.Tensor], first: str, second: str) -> None:
    if (first in found) != (second in found):
        missing = second if first in found else first
        raise InvalidDelta(f"{module}.{missing}", f"{first} and {second} come together; this one is missing")


@register_module_part
@dataclass(frozen=True)
class KeepMask(ModulePart):
    """`K_m`: bit-packed binary keep mask over a weight of shape `[out, in]`."""

    kind: ClassVar[str] = "keep"
    suffixes: ClassVar[tuple[str, ...]] = ("keep",)

    module: str
    shape: tuple[int, int]
    packed: torch.Tensor  # uint8 [ceil(out*in/8)]

    @classmethod
    def parse(cls, module: str, shape: tuple[int, int], found: Mapping[str, torch.Tensor]) -> KeepMask:
        key, packed = f"{module}.keep", found["keep"]
        _check_dtype(key, packed, torch.uint8)
        _check_shape(key, packed, (packed_length(shape[0] * shape[1]),))
        if not pad_bits_are_zero(packed, shape[0] * shape[1]):
            raise InvalidDelta(key, "pad bits after the last weight must be 0")
        return cls(module, shape, packed)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{self.module}.keep": self.packed}

    @property
    def nbytes(self) -> int:
        return _nbytes(self.packed)

    def dense_effect(self, weight: torch.Tensor) -> torch.Tensor:
        return effective_weight(weight, keep=unpack_bits(self.packed, self.shape).to(weight.device))


@register_module_part
@dataclass(frozen=True)
class LowRank(ModulePart):
    """`B_m · A_m` with any scaling already folded into B."""

    kind: ClassVar[str] = "low_rank"
    suffixes: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")

    module: str
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]

    @classmethod
    def parse(cls, module: str, shape: tuple[int, int], found: Mapping[str, torch.Tensor]) -> LowRank:
        _both_or_neither(module, found, "lora_A", "lora_B")
        A, B = found["lora_A"], found["lora_B"]
        out_features, in_features = shape
        if A.dim() != 2 or A.shape[0] < 1:
            raise InvalidDelta(f"{module}.lora_A", f"shape must be [r, {in_features}] with r >= 1, got {list(A.shape)}")
        rank = A.shape[0]
        if rank > min(out_features, in_features):
            # B·A has rank min(out, in) at most: a larger r only costs bytes and compute (a rank-20,000
            # LoRA was 58 MiB of nothing).
            raise InvalidDelta(f"{module}.lora_A", f"rank {rank} is over min(out, in) = "
                                                   f"{min(out_features, in_features)} of the module")
        _check_float(f"{module}.lora_A", A, (rank, in_features))
        _check_float(f"{module}.lora_B", B, (out_features, rank))
        # Each value within the bound is not enough: the engine adds B·A to the weight, and rank-many
        # products at the bound overflow it, so every predict would fail. The product itself is bounded.
        product = float((B.float() @ A.float()).abs().max())
        if not product <= MAX_ABS_VALUE:
            raise InvalidDelta(f"{module}.lora_B", f"B·A has a value of magnitude {product:.3g}; the weight "
                                                   f"update must lie within ±{MAX_ABS_VALUE:g} as every value does")
        return cls(module, A, B)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{self.module}.lora_A": self.A, f"{self.module}.lora_B": self.B}

    @property
    def nbytes(self) -> int:
        return _nbytes(self.A, self.B)

    def dense_effect(self, weight: torch.Tensor) -> torch.Tensor:
        device = weight.device
        return effective_weight(weight, lora_A=self.A.to(device), lora_B=self.B.to(device))


@register_module_part
@dataclass(frozen=True)
class SparseUpdate(ModulePart):
    """`S_m` on a fixed support: distinct flat row-major indices into `[out, in]`."""

    kind: ClassVar[str] = "sparse"
    suffixes: ClassVar[tuple[str, ...]] = ("sparse_index", "sparse_value")

    module: str
    shape: tuple[int, int]
    index: torch.Tensor  # int64 [k]
    value: torch.Tensor  # float [k]

    @classmethod
    def parse(cls, module: str, shape: tuple[int, int], found: Mapping[str, torch.Tensor]) -> SparseUpdate:
        _both_or_neither(module, found, "sparse_index", "sparse_value")
        index, value = found["sparse_index"], found["sparse_value"]
        ikey, vkey = f"{module}.sparse_index", f"{module}.sparse_value"
        _check_dtype(ikey, index, torch.int64)
        if index.dim() != 1:
            raise InvalidDelta(ikey, f"must be one-dimensional, got shape {list(index.shape)}")
        _check_float(vkey, value, (index.shape[0],))
        size = shape[0] * shape[1]
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
            raise InvalidDelta(ikey, f"index out of range [0, {size})")
        if torch.unique(index).numel() != index.numel():
            raise InvalidDelta(ikey, "indices must be distinct")
        return cls(module, shape, index, value)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{self.module}.sparse_index": self.index, f"{self.module}.sparse_value": self.value}

    @property
    def nbytes(self) -> int:
        return _nbytes(self.index, self.value)

    def dense_effect(self, weight: torch.Tensor) -> torch.Tensor:
        device = weight.device
        return effective_weight(weight, sparse_index=self.index.to(device), sparse_value=self.value.to(device))


@register_module_part
@dataclass(frozen=True)
class BiasDelta(ModulePart):
    """`δb_m`: an additive change of the module's bias, `b'_m = b_m + δb_m` (zero bias when it has none).

    Added to the format after import showed that a full fine-tune's bias changes decide about 3 %
    of the labels although they are 0.1 % of the bytes (docs/delta-format.md, bias deltas).
    """

    kind: ClassVar[str] = "bias"
    suffixes: ClassVar[tuple[str, ...]] = ("bias_delta",)

    module: str
    delta: torch.Tensor  # float [out]

    @classmethod
    def parse(cls, module: str, shape: tuple[int, int], found: Mapping[str, torch.Tensor]) -> BiasDelta:
        _check_float(f"{module}.bias_delta", found["bias_delta"], (shape[0],))
        return cls(module, found["bias_delta"])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{self.module}.bias_delta": self.delta}

    @property
    def nbytes(self) -> int:
        return _nbytes(self.delta)

    def dense_effect(self, weight: torch.Tensor) -> torch.Tensor:
        return weight  # the weight is untouched; see `dense_bias`

    def dense_bias(self, bias: torch.Tensor | None) -> torch.Tensor:
        delta = self.delta.to(torch.float32 if bias is None else bias.dtype)
        return delta if bias is None else bias + delta.to(bias.device)


@dataclass(frozen=True)
class HeadKeep:
    """Which attention heads of one layer contribute (structured pruning)."""

    layer: int
    keep: torch.Tensor  # uint8 [num_heads], 0 or 1

    @classmethod
    def parse(cls, layer: int, keep: torch.Tensor, spec: BackboneSpec) -> HeadKeep:
        key = f"layers.{layer}.head_keep"
        if not 0 <= layer < spec.num_layers:
            raise InvalidDelta(key, f"layer out of range: the backbone has {spec.num_layers} layers")
        _check_dtype(key, keep, torch.uint8)
        _check_shape(key, keep, (spec.num_heads,))
        if bool((keep > 1).any()):
            raise InvalidDelta(key, "values must be 0 or 1")
        return cls(layer, keep)

    @property
    def dropped_heads(self) -> list[int]:
        return [i for i, k in enumerate(self.keep.tolist()) if k == 0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"layers.{self.layer}.head_keep": self.keep}

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keep)


NORM_SUFFIXES = ("norm_weight_delta", "norm_bias_delta")
EMBEDDING_KEYS = ("embeddings.position_delta", "embeddings.token_type_delta")


@dataclass(frozen=True)
class NormDelta:
    """`δγ`, `δβ` of one LayerNorm: `LN'(x) = (γ + δγ) ⊙ x̂ + (β + δβ)`, x̂ the normalised input.

    Either may be absent (zero). Added with the bias delta: a full fine-tune moves every
    LayerNorm, and putting them back changed 3 % of a fine-tuned MiniLM's labels.
    """

    module: str
    weight: torch.Tensor | None  # float [d]
    bias: torch.Tensor | None  # float [d]

    @classmethod
    def parse(cls, module: str, found: Mapping[str, torch.Tensor], spec: BackboneSpec) -> NormDelta:
        width = spec.layer_norms[module]
        for suffix, tensor in found.items():
            _check_float(f"{module}.{suffix}", tensor, (width,))
        return cls(module, found.get("norm_weight_delta"), found.get("norm_bias_delta"))

    def tensors(self) -> dict[str, torch.Tensor]:
        return _present({f"{self.module}.norm_weight_delta": self.weight, f"{self.module}.norm_bias_delta": self.bias})

    @property
    def nbytes(self) -> int:
        return _nbytes(self.weight, self.bias)


@dataclass(frozen=True)
class EmbeddingShift:
    """Added to the embeddings' sum, before their LayerNorm: `position[p]` to the token at sequence
    position p (0-based; positions from P on get nothing) and `token_type[t]` to a token of type t."""

    position: torch.Tensor | None  # float [P, d]
    token_type: torch.Tensor | None  # float [type_vocab_size, d]

    @classmethod
    def parse(cls, found: Mapping[str, torch.Tensor], spec: BackboneSpec) -> EmbeddingShift:
        d = spec.hidden_size
        position, token_type = found.get(EMBEDDING_KEYS[0]), found.get(EMBEDDING_KEYS[1])
        if spec.embedding_norm is None:
            raise InvalidDelta(next(iter(found)), "this backbone has no LayerNorm over its embeddings to shift")
        if position is not None:
            key = EMBEDDING_KEYS[0]
            if position.dim() != 2 or not 1 <= position.shape[0] <= spec.max_length:
                raise InvalidDelta(key, f"shape must be [P, {d}] with 1 <= P <= {spec.max_length}, "
                                        f"got {list(position.shape)}")
            _check_float(key, position, (position.shape[0], d))
        if token_type is not None:
            key = EMBEDDING_KEYS[1]
            if spec.type_vocab_size < 1:
                raise InvalidDelta(key, "this backbone has no token type embeddings")
            _check_float(key, token_type, (spec.type_vocab_size, d))
        return cls(position, token_type)

    def tensors(self) -> dict[str, torch.Tensor]:
        return _present(dict(zip(EMBEDDING_KEYS, (self.position, self.token_type), strict=True)))

    @property
    def nbytes(self) -> int:
        return _nbytes(self.position, self.token_type)


@dataclass(frozen=True)
class PastaVectors:
    """`vectors[l, p]` added to the p-th special token's hidden state before layer l."""

    vectors: torch.Tensor  # [num_layers, P, d]

    @classmethod
    def parse(cls, vectors: torch.Tensor, spec: BackboneSpec) -> PastaVectors:
        key = "pasta.vectors"
        if vectors.dim() != 3 or vectors.shape[1] < 1:
            raise InvalidDelta(key, f"shape must be [{spec.num_layers}, P, {spec.hidden_size}] with P >= 1, "
                               f"got {list(vectors.shape)}")
        _check_float(key, vectors, (spec.num_layers, vectors.shape[1], spec.hidden_size))
        return cls(vectors)

    @property
    def slots(self) -> int:
        return self.vectors.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"pasta.vectors": self.vectors}

    @property
    def nbytes(self) -> int:
        return _nbytes(self.vectors)


def _pair(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`head.<name>.weight` and `.bias`, which come together or not at all."""
    weight, bias = tensors.get(f"head.{name}.weight"), tensors.get(f"head.{name}.bias")
    if (weight is None) != (bias is None):
        missing = f"head.{name}.weight" if weight is None else f"head.{name}.bias"
        raise InvalidDelta(missing, f"head.{name}.weight and head.{name}.bias come together; this one is missing")
    return weight, bias


@dataclass(frozen=True)
class TaskHead:
    """The task's own head: a classifier (and optionally its own pooler), or an embedding's projection.

    Classification tasks always carry the classifier; an embedding task never does, and may
    carry a linear `projection` to its output size instead (task-delta.md, Head).
    """

    classifier_weight: torch.Tensor | None  # [C, d]; None for embedding
    classifier_bias: torch.Tensor | None  # [C]
    pooler_weight: torch.Tensor | None = None  # [d, d]
    pooler_bias: torch.Tensor | None = None  # [d]
    projection_weight: torch.Tensor | None = None  # [D, d]; embedding only
    projection_bias: torch.Tensor | None = None  # [D]

    @classmethod
    def parse(cls, tensors: Mapping[str, torch.Tensor], meta: DeltaMeta, spec: BackboneSpec) -> TaskHead:
        d = spec.hidden_size
        weight, bias = _pair(tensors, "classifier")
        if meta.is_embedding:
            if weight is not None:
                raise InvalidDelta("head.classifier.weight", "an embedding task has no classifier "
                                   "(head.projection.* is its optional linear map)")
        else:
            for key, tensor in (("head.classifier.weight", weight), ("head.classifier.bias", bias)):
                if tensor is None:
                    raise InvalidDelta(key, "required tensor is missing")
            assert weight is not None and bias is not None
            num_classes = len(meta.labels)
            if weight.dim() == 2 and weight.shape[1] == d and weight.shape[0] != num_classes:
                raise InvalidDelta("head.classifier.weight",
                                   f"has {weight.shape[0]} classes but labels names {num_classes}")
            _check_float("head.classifier.weight", weight, (num_classes, d))
            _check_float("head.classifier.bias", bias, (num_classes,))
        pw, pb = _pair(tensors, "pooler")
        if pw is not None and pb is not None:
            if meta.task_type != "sequence-classification":
                raise InvalidDelta("head.pooler.weight", "a pooler is only allowed for sequence-classification")
            _check_float("head.pooler.weight", pw, (d, d))
            _check_float("head.pooler.bias", pb, (d,))
        proj_w, proj_b = _pair(tensors, "projection")
        if proj_w is not None and proj_b is not None:
            if not meta.is_embedding:
                raise InvalidDelta("head.projection.weight", "a projection is only allowed for embedding")
            if proj_w.dim() != 2 or proj_w.shape[0] < 1:
                raise InvalidDelta("head.projection.weight", f"shape must be [D, {d}] with D >= 1, "
                                   f"got {list(proj_w.shape)}")
            _check_float("head.projection.weight", proj_w, (proj_w.shape[0], d))
            _check_float("head.projection.bias", proj_b, (proj_w.shape[0],))
        return cls(weight, bias, pw, pb, proj_w, proj_b)

    @property
    def num_classes(self) -> int:
        return 0 if self.classifier_weight is None else self.classifier_weight.shape[0]

    def output_size(self, hidden_size: int) -> int:
        """Logits per row for a classifier; the vector's size for an embedding."""
        if self.classifier_weight is not None:
            return self.classifier_weight.shape[0]
        return hidden_size if self.projection_weight is None else self.projection_weight.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return _present({
            "head.classifier.weight": self.classifier_weight, "head.classifier.bias": self.classifier_bias,
            "head.pooler.weight": self.pooler_weight, "head.pooler.bias": self.pooler_bias,
            "head.projection.weight": self.projection_weight, "head.projection.bias": self.projection_bias,
        })

    @property
    def nbytes(self) -> int:
        return _nbytes(*self.tensors().values())


Part = ModulePart | HeadKeep | PastaVectors | TaskHead | NormDelta | EmbeddingShift


# --------------------------------------------------------------------------- the delta


@dataclass(frozen=True)
class TaskDelta:
    meta: DeltaMeta
    head: TaskHead
    module_parts: Mapping[str, Mapping[str, ModulePart]] = field(default_factory=dict)  # module -> kind -> part
    head_keep: Mapping[int, HeadKeep] = field(default_factory=dict)
    pasta: PastaVectors | None = None
    norms: Mapping[str, NormDelta] = field(default_factory=dict)  # LayerNorm module -> its deltas
    embedding_shift: EmbeddingShift | None = None

    @classmethod
    def from_parts(
        cls,
        meta: DeltaMeta,
        head: TaskHead,
        parts: Iterable[ModulePart] = (),
        head_keep: Mapping[int, HeadKeep] | None = None,
        pasta: PastaVectors | None = None,
        norms: Iterable[NormDelta] = (),
        embedding_shift: EmbeddingShift | None = None,
    ) -> TaskDelta:
        """Group module parts by module (each module's parts in registry order)."""
        grouped: dict[str, dict[str, ModulePart]] = {}
        for part in parts:
            if part.kind in grouped.setdefault(part.module, {}):
                raise ValueError(f"{part.module}: two {part.kind} parts")
            grouped[part.module][part.kind] = part
        ordered = {
            module: {kind: found[kind] for kind in MODULE_PARTS if kind in found}
            for module, found in sorted(grouped.items())
        }
        return cls(meta, head, ordered, dict(head_keep or {}), pasta,
                   {norm.module: norm for norm in sorted(norms, key=lambda n: n.module)}, embedding_shift)

    def parts_of(self, kind: str) -> dict[str, ModulePart]:
        """module -> part, for one registered kind."""
        return {module: found[kind] for module, found in self.module_parts.items() if kind in found}

    @property
    def keep(self) -> dict[str, KeepMask]:
        return self.parts_of(KeepMask.kind)  # type: ignore[return-value]

    @property
    def low_rank(self) -> dict[str, LowRank]:
        return self.parts_of(LowRank.kind)  # type: ignore[return-value]

    @property
    def sparse(self) -> dict[str, SparseUpdate]:
        return self.parts_of(SparseUpdate.kind)  # type: ignore[return-value]

    @property
    def bias(self) -> dict[str, BiasDelta]:
        return self.parts_of(BiasDelta.kind)  # type: ignore[return-value]

    def parts(self) -> Iterator[Part]:
        yield self.head
        for found in self.module_parts.values():
            yield from found.values()
        yield from self.head_keep.values()
        if self.pasta is not None:
            yield self.pasta
        yield from self.norms.values()
        if self.embedding_shift is not None:
            yield self.embedding_shift

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for part in self.parts():
            out.update(part.tensors())
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors (what the delta costs in memory, as stored)."""
        return sum(part.nbytes for part in self.parts())

    def bytes_by_part(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for part in self.parts():
            name = type(part).__name__
            totals[name] = totals.get(name, 0) + part.nbytes
        return totals

    def modules(self) -> set[str]:
        """Backbone linear modules this delta changes."""
        return set(self.module_parts)

    def dense_weight(self, module: str, weight: torch.Tensor) -> torch.Tensor:
        """`W ⊙ K + B·A + S` of one module (head keep is applied separately, on input columns)."""
        for part in self.module_parts.get(module, {}).values():
            weight = part.dense_effect(weight)
        return weight

    def dense_bias(self, module: str, bias: torch.Tensor | None) -> torch.Tensor | None:
        """`b + δb` of one module: its bias with this delta's bias part, if it has one."""
        part = self.module_parts.get(module, {}).get(BiasDelta.kind)
        return part.dense_bias(bias) if isinstance(part, BiasDelta) else bias

    def to_bytes(self) -> bytes:
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}
        return st_save(tensors, metadata=self.meta.to_metadata())


_HEAD_KEYS = tuple(f"head.{name}.{kind}" for name in ("classifier", "pooler", "projection")
                   for kind in ("weight", "bias"))
_LAYER_KEY = re.compile(r"^layers\.(0|[1-9][0-9]*)\.head_keep$")
_MAX_LAYER_DIGITS = 6  # more digits than any backbone's layer count (int() of 5,000 digits raised a 500)


def read_header(data: bytes) -> dict[str, object]:
    """The JSON header of a safetensors file, checked before any tensor is built.

    Every string in it (tensor keys, metadata keys and values) must be valid Unicode, every
    metadata value a string, and every tensor's dtype one of `FILE_DTYPES`; each refusal names
    the key.
    """
    if len(data) < 8:
        raise InvalidDelta("file", "not a safetensors file (shorter than its 8-byte header length)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8 or header_len > 100_000_000:
        raise InvalidDelta("file", "not a safetensors file (header length out of range)")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidDelta("file", "not a safetensors file (header is not JSON)") from None
    except RecursionError:  # Python's parser recurses per level: a deep header would be a 500
        raise InvalidDelta("file", "not a safetensors file (header JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise InvalidDelta("file", "not a safetensors file (header is not a JSON object)")
    metadata = header.get("__metadata__")
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise InvalidDelta("__metadata__", "every metadata value must be a string")
        for key, value in metadata.items():
            check_text(key, key)
            check_text(key, value)
    for key, entry in header.items():
        check_text(key, key)
        if key == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if isinstance(dtype, str) and dtype not in FILE_DTYPES:
            raise InvalidDelta(key, f"dtype {shown_key(dtype, 40)} is not one a delta uses: "
                                    f"{', '.join(FILE_DTYPES)} (float32, float16, bfloat16, uint8, int64)")
    return header


def read_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, without loading its tensors."""
    return dict(read_header(data).get("__metadata__") or {})  # type: ignore[call-overload]


def max_tensor_count(spec: BackboneSpec) -> int:
    """How many tensors a valid delta for this backbone can have at most: every key the format allows.

    More means an unknown key; counted from the header, before 150,000 tiny tensors cost seconds
    and hundreds of MB to build only to be refused.
    """
    return (len(spec.linear_modules) * len(_PART_OF_SUFFIX) + spec.num_layers + 1 + len(_HEAD_KEYS)
            + len(spec.layer_norms) * len(NORM_SUFFIXES) + len(EMBEDDING_KEYS))


def parse_delta(data: bytes, spec: BackboneSpec) -> TaskDelta:
    """Validate the bytes of a delta file completely and return it typed.

    Raises `BackboneMismatch` for another backbone's delta and `InvalidDelta` for any other
    broken rule; the message always names the offending key.
    """
    header = read_header(data)
    meta = DeltaMeta.parse(header.get("__metadata__"), spec)  # type: ignore[arg-type]
    count = sum(key != "__metadata__" for key in header)
    if count > max_tensor_count(spec):
        raise InvalidDelta("file", f"has {count} tensors; a delta for this backbone has at most "
                                   f"{max_tensor_count(spec)} (one per key task-delta.md allows)")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, KeyError) as err:
        raise InvalidDelta("file", f"not a readable safetensors file ({err})") from None

    by_module: dict[str, dict[str, torch.Tensor]] = {}
    by_norm: dict[str, dict[str, torch.Tensor]] = {}
    embedding: dict[str, torch.Tensor] = {}
    head_keep: dict[int, HeadKeep] = {}
    pasta = None
    for key, tensor in tensors.items():
        if key in _HEAD_KEYS:
            continue
        if key in EMBEDDING_KEYS:
            embedding[key] = tensor
            continue
        if key == "pasta.vectors":
            pasta = PastaVectors.parse(tensor, spec)
            continue
        match = _LAYER_KEY.match(key)
        if match:
            if len(match.group(1)) > _MAX_LAYER_DIGITS:
                raise InvalidDelta(key, f"layer out of range: the backbone has {spec.num_layers} layers")
            layer = int(match.group(1))
            head_keep[layer] = HeadKeep.parse(layer, tensor, spec)
            continue
        module, _, suffix = key.rpartition(".")
        if suffix in NORM_SUFFIXES:
            if module not in spec.layer_norms:
                raise InvalidDelta(key, f"the backbone has no LayerNorm {module!r}")
            by_norm.setdefault(module, {})[suffix] = tensor
            continue
        if module_part_of_suffix(suffix) is None:
            raise InvalidDelta(key, "unknown key (see task-delta.md for the allowed keys)")
        if module not in spec.linear_modules:
            raise InvalidDelta(key, f"the backbone has no linear module {module!r}")
        by_module.setdefault(module, {})[suffix] = tensor

    head = TaskHead.parse(tensors, meta, spec)
    parts: list[ModulePart] = []
    for module, found in sorted(by_module.items()):
        shape = tuple(spec.linear_modules[module])
        for cls in MODULE_PARTS.values():
            if any(suffix in found for suffix in cls.suffixes):
                parts.append(cls.parse(module, shape, found))  # type: ignore[arg-type]
    norms = [NormDelta.parse(module, found, spec) for module, found in sorted(by_norm.items())]
    shift = EmbeddingShift.parse(embedding, spec) if embedding else None
    return TaskDelta.from_parts(meta, head, parts, head_keep, pasta, norms, shift)
