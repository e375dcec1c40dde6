"""Compress a fine-tuned transformers classifier into a task delta (`deltaserve import-finetuned`).

People already own fine-tuned classifiers, one full model copy each. Each is the served backbone
plus `ΔW = W_ft − W` on every linear module, plus a head; this module finds, per linear module,
the cheapest of the format's parts that carries that ΔW at the fidelity asked:

- **nothing** — the module did not change;
- **exact low rank** — ΔW's numerical rank is small (a merged LoRA: `W + (α/r)·BA` comes back
  exactly at its own rank), factors kept in float32;
- **keep mask** — the fine-tune zeroed pretrained weights (a pruned model, or a mask delta
  exported by `deltaserve export`), with whatever else changed on top;
- **low rank** / **low rank + sparse** — everything else (a full fine-tune changes every weight):
  a truncated SVD whose ranks are allocated over all modules at once, greedily by singular
  energy per byte, under `--budget-bytes`; a module's last rank-1 term is swapped for its
  largest residual entries (a sparse part) where those carry more energy for the same bytes.
  Approximate factors are stored in float16 (half the bytes; their rounding is far below the
  truncation error).

The head comes along (the classifier; the pooler as `head.pooler.*` when it changed), labels
from `id2label`. Biases, LayerNorms, positions and token types come along as their own parts
(bias deltas, norm deltas, the embedding shift), bought before any rank: on a MiniLM fine-tuned
on SST-2 they decided 3.7 % of the dev labels for 0.12 % of the bytes. Each bias delta also
takes the truncated ΔW's mean effect, `(ΔW − carried) · μ`, μ the module's mean calibration input.
What the format cannot carry — the word embeddings — is reported with its measured effect: the
original model is run again with them set back to the backbone's. Finally the fidelity gate runs
the original with transformers and the delta with the serving engine on the calibration texts and
compares labels and probabilities; below the threshold nothing is written unless forced.

Torch runs on one thread during an import: on a 2-core machine shared with training, two threads
took 2.4× the CPU time of one for a forward and 9× for an SVD (spinning), for no better wall time.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from adapters_store.format import (
    BiasDelta,
    DeltaMeta,
    EmbeddingShift,
    KeepMask,
    LowRank,
    ModulePart,
    NormDelta,
    SparseUpdate,
    TaskDelta,
    TaskHead,
)
from adapters_store.packing import pack_bits
from server.backbone import Backbone, TextInput
from training.export import PADDED_POSITIONS

BUILTIN_CALIBRATION = Path(__file__).with_name("data") / "calibration.txt"
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
# A fine-tune that moved the linear weights by more than this (relative Frobenius norm) did not
# start from this backbone: fine-tuning moves them by about 1 %.
MAX_RELATIVE_CHANGE = 0.5
DEFAULT_BUDGET_FRACTION = 16  # default --budget-bytes: 1/16 of the checkpoint's weights
# The gate's defaults: met by every import of the RESULTS.md table from 1/30 of the checkpoint up
# (calibration agreement 99.2-100 %, mean probability difference at most 0.006) once biases,
# LayerNorms and the embedding shift were carried; 0.95 / 0.05 before, when those were dropped.
DEFAULT_MIN_AGREEMENT = 0.98
DEFAULT_MAX_MEAN_PROB_DIFF = 0.02
# Bias deltas, LayerNorm deltas and the embedding shift are stored in float16 (their rounding, 5e-4 of
# each change, is far below what they fix) and carried whenever all of them together take at most this
# share of the tensor budget.
BIAS_DTYPE = EXTRA_DTYPE = torch.float16
BIAS_ITEMSIZE = 2
MAX_BIAS_SHARE = 0.25
POSITION_ROW_THRESHOLD = 0.01
CARRIED_EXTRAS = ("biases", "layer_norms", "position_embeddings")  # kinds of _categorise those parts carry
SEQUENCE_HEADS = {"bert": "pooler", "roberta": "dense_head", "xlm-roberta": "dense_head",
                  "camembert": "dense_head", "mpnet": "dense_head", "distilbert": "relu_head"}


class ImportFinetunedError(ValueError):
    """The checkpoint cannot become a delta of this backbone; the message names what does not fit."""


# --------------------------------------------------------------------------- loading and checks


def load_checkpoint(path: str | Path) -> tuple[nn.Module, str]:
    """The fine-tuned model (eval, float32) and its task type; clear errors for what is missing or broken."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    folder = Path(path)
    if not folder.is_dir():
        raise ImportFinetunedError(f"{folder}: no such folder (a transformers save_pretrained folder is expected)")
    if not (folder / "config.json").is_file():
        raise ImportFinetunedError(f"{folder / 'config.json'}: missing (not a transformers save_pretrained folder)")
    weights = [folder / name for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")]
    if not any(p.is_file() for p in weights):
        raise ImportFinetunedError(f"{folder}: no model weights (model.safetensors or pytorch_model.bin)")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ImportFinetunedError(f"{folder / 'config.json'}: unreadable ({err})") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        task_type, auto = "sequence-classification", AutoModelForSequenceClassification
    elif any(a.endswith("ForTokenClassification") for a in architectures):
        task_type, auto = "token-classification", AutoModelForTokenClassification
    else:
        raise ImportFinetunedError(
            f"{folder}: no classification head: architectures = {architectures or 'unset'}; a task delta needs a "
            "sequence- or token-classification model (…ForSequenceClassification / …ForTokenClassification)")
    if getattr(config, "problem_type", None) == "multi_label_classification":
        raise ImportFinetunedError("problem_type multi_label_classification: a task delta answers with a softmax "
                                   "over its labels (or one regression value), not independent sigmoids")
    try:
        model, info = auto.from_pretrained(folder, output_loading_info=True)
    except Exception as err:  # safetensors/torch raise many types for a damaged file
        raise ImportFinetunedError(f"{folder}: the weights cannot be read ({type(err).__name__}: {err})") from None
    missing = [key for key in info.get("missing_keys", ()) if "classifier" in key or "score" in key]
    if missing:
        raise ImportFinetunedError(f"{folder}: the classification head is missing from the weights ({missing[0]}); "
                                   "it would be random")
    return model.float().eval().requires_grad_(False), task_type


def check_compatible(model: nn.Module, backbone: Backbone, folder: str | Path) -> None:
    """Raise naming the first difference between the checkpoint's encoder and the backbone."""
    config, base_config = model.config, backbone.model.config
    if config.model_type != backbone.model_type:
        raise ImportFinetunedError(f"another backbone: the checkpoint is a {config.model_type!r} model, "
                                   f"the backbone a {backbone.model_type!r}")
    for attr in ("vocab_size", "hidden_size", "dim", "num_hidden_layers", "n_layers", "num_attention_heads",
                 "n_heads", "intermediate_size", "hidden_dim", "max_position_embeddings", "type_vocab_size"):
        mine, theirs = getattr(config, attr, None), getattr(base_config, attr, None)
        if mine != theirs:
            raise ImportFinetunedError(
                f"another backbone: {attr} is {mine} in the checkpoint, {theirs} in the backbone")
    folder = Path(folder)
    tokenizer_files = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json")
    if any((folder / name).is_file() for name in tokenizer_files):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as err:
            raise ImportFinetunedError(f"{folder}: its tokenizer files cannot be read ({err})") from None
        mine, theirs = tokenizer.get_vocab(), backbone.tokenizer.get_vocab()
        if mine != theirs:
            extra = sorted(set(mine) - set(theirs))[:3]
            raise ImportFinetunedError(
                f"another backbone: the tokenizer vocabulary differs ({len(mine)} tokens in the checkpoint, "
                f"{len(theirs)} in the backbone{'; e.g. ' + ', '.join(map(repr, extra)) if extra else ''})")
        probe = "Hello World, naïve café! 2024"
        if tokenizer(probe)["input_ids"] != backbone.tokenizer(probe)["input_ids"]:
            raise ImportFinetunedError("another backbone: the tokenizers split text differently (casing or "
                                       "normalisation) although their vocabularies agree")


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fine-tuned encoder's state dict, keyed as the backbone's (`encoder.layer.0...`)."""
    return {k: v.detach() for k, v in model.base_model.state_dict().items()}


# --------------------------------------------------------------------------- per-module analysis


@dataclass
class ModuleChoice:
    """What one linear module became, and what it costs."""

    module: str
    representation: str  # unchanged | keep | exact low rank | low rank | low rank + sparse | keep + ...
    rank: int = 0
    exact_rank: int | None = None  # ΔW's numerical rank (None: full)
    sparse_entries: int = 0
    keep_zeros: int = 0
    bytes: int = 0
    relative_error: float = 0.0  # ‖ΔW − carried‖ / ‖ΔW‖ (Frobenius)


@dataclass
class _Analysis:
    module: str
    shape: tuple[int, int]
    keep: torch.Tensor | None  # bool [out, in] when the fine-tune zeroed pretrained weights
    delta: torch.Tensor  # float64 ΔW on top of W ⊙ K
    U: torch.Tensor | None = None
    S: torch.Tensor | None = None
    Vh: torch.Tensor | None = None
    exact_rank: int = 0
    exact: bool = False  # ΔW is carried exactly at exact_rank (or is zero)
    rank: int = 0
    sparse_index: torch.Tensor | None = None

    @property
    def norm(self) -> float:
        return float(torch.linalg.norm(self.delta))


def _analyse(module: str, weight: torch.Tensor, tuned: torch.Tensor) -> _Analysis:
    W, F = weight.detach().double().cpu(), tuned.detach().double().cpu()
    m, n = W.shape
    pruned = (F == 0) & (W != 0)
    keep = None
    if int(pruned.sum()) >= max(8, W.numel() // 10_000):  # exact zeros this many do not happen by chance
        keep = ~pruned
        W = W * keep
    delta = F - W
    analysis = _Analysis(module, (m, n), keep, delta)
    # Float32 rounding of W_ft: each entry is off by up to eps/2 of its magnitude; this bounds the
    # spectral norm of that noise, so singular values above it are real structure.
    entry_tol = FLOAT32_EPS * float(max(F.abs().max(), W.abs().max()))
    if float(delta.abs().max()) <= entry_tol:
        analysis.delta = torch.zeros_like(delta)
        analysis.exact = True
        return analysis
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    analysis.U, analysis.S, analysis.Vh = U, S, Vh
    noise_norm = entry_tol * (math.sqrt(m) + math.sqrt(n))
    analysis.exact_rank = int((noise_norm < S).sum())
    return analysis


def _factor_bytes(shape: tuple[int, int], rank: int, itemsize: int) -> int:
    return rank * (shape[0] + shape[1]) * itemsize


SPARSE_ENTRY_BYTES = 8 + 2  # int64 index + float16 value


def _allocate(analyses: list[_Analysis], budget: int) -> int:
    """Choose ranks (and sparse swaps) within `budget` bytes; returns the bytes used.

    Exactly low-rank modules (a merged LoRA) first, in float32, when they fit and are cheaper than
    half the weight; then the rest by global greedy on σ² per byte of float16 factors.
    """
    used = 0
    for a in analyses:
        if a.keep is not None:
            used += (a.shape[0] * a.shape[1] + 7) // 8
    for a in analyses:
        if a.S is None:
            continue
        cost = _factor_bytes(a.shape, a.exact_rank, 4)
        if 2 * a.exact_rank * sum(a.shape) <= a.shape[0] * a.shape[1] and used + cost <= budget:
            a.rank, a.exact = a.exact_rank, True
            used += cost
    candidates = []
    for index, a in enumerate(analyses):
        if a.S is None or a.exact:
            continue
        cost = _factor_bytes(a.shape, 1, 2)
        for i, s in enumerate(a.S[: a.exact_rank].tolist()):
            candidates.append((s * s / cost, index, i, cost))
    candidates.sort(key=lambda c: -c[0])
    for _, index, i, cost in candidates:
        a = analyses[index]
        if i != a.rank or used + cost > budget:
            continue  # ranks are prefixes: once a module stops, it stops
        a.rank += 1
        used += cost
    for a in analyses:  # swap a module's last rank-1 term for its largest residual entries where that wins
        if a.S is None or a.exact or a.rank == 0:
            continue
        k = a.rank - 1
        residual = a.delta - (a.U[:, :k] * a.S[:k]) @ a.Vh[:k]
        count = _factor_bytes(a.shape, 1, 2) // SPARSE_ENTRY_BYTES
        top = torch.topk(residual.reshape(-1).abs(), count)
        if float((top.values**2).sum()) > float(a.S[k] ** 2):
            a.rank = k
            a.sparse_index = top.indices.sort().values
    return used


def _parts_of(a: _Analysis, input_mean: torch.Tensor | None = None
              ) -> tuple[list[ModulePart], ModuleChoice, torch.Tensor | None]:
    """The format parts for one analysed module, the record of what it became, and what the part of
    ΔW left out adds to the output on average: `(ΔW − carried) · μ` for the mean input μ of the
    module over the calibration tokens (None when ΔW is carried exactly or μ is not known)."""
    parts: list[ModulePart] = []
    choice = ModuleChoice(a.module, "unchanged", exact_rank=a.exact_rank if a.S is not None else 0)
    names = []
    if a.keep is not None:
        parts.append(KeepMask(a.module, a.shape, pack_bits(a.keep)))
        choice.keep_zeros = int((~a.keep).sum())
        names.append("keep")
    carried = torch.zeros_like(a.delta)
    if a.rank:
        U, S, Vh = a.U[:, : a.rank], a.S[: a.rank], a.Vh[: a.rank]
        if a.exact:
            B, A = (U * S).float(), Vh.float().contiguous()
        else:  # balanced factors keep both within float16's range and precision
            root = S.sqrt()
            B, A = (U * root).half(), (root.unsqueeze(1) * Vh).half()
        parts.append(LowRank(a.module, A.contiguous(), B.contiguous()))
        carried += B.double() @ A.double()
        choice.rank = a.rank
        names.append("exact low rank" if a.exact else "low rank")
    if a.sparse_index is not None:
        values = (a.delta - carried).reshape(-1)[a.sparse_index].half()
        parts.append(SparseUpdate(a.module, a.shape, a.sparse_index.clone(), values))
        carried.view(-1)[a.sparse_index] += values.double()
        choice.sparse_entries = a.sparse_index.numel()
        names.append("sparse")
    if a.S is not None and not a.exact and not a.rank and a.sparse_index is None:
        names.append("dropped")  # ΔW too small to earn any bytes of the budget
    choice.representation = " + ".join(names) or "unchanged"
    choice.bytes = sum(p.nbytes for p in parts)
    norm = a.norm
    choice.relative_error = float(torch.linalg.norm(a.delta - carried)) / norm if norm else 0.0
    if choice.exact_rank == min(a.shape):
        choice.exact_rank = None  # full rank: say so rather than a number that looks like a choice
    left_out = None
    if input_mean is not None and not a.exact and norm:
        left_out = (a.delta - carried) @ input_mean
    return parts, choice, left_out


# --------------------------------------------------------------------------- head


def _head(model: nn.Module, task_type: str, backbone: Backbone, tuned: dict[str, torch.Tensor]) -> TaskHead:
    """The classifier, and the pooler as `head.pooler.*` unless it is the backbone's own."""
    family = backbone.model_type
    if task_type == "token-classification":
        classifier = model.classifier
        return TaskHead(classifier.weight.detach().float().clone(), classifier.bias.detach().float().clone())
    kind = SEQUENCE_HEADS.get(family)
    if kind == "relu_head":
        raise ImportFinetunedError(f"{family}'s classification head applies ReLU after pre_classifier; a task "
                                   "delta's pooler is dense + tanh, so this head cannot be carried")
    if kind == "dense_head":  # RoBERTa/MPNet: classifier.dense + tanh, then classifier.out_proj
        pooler, classifier = model.classifier.dense, model.classifier.out_proj
    else:
        classifier = model.classifier
        pooler = model.base_model.pooler.dense if getattr(model.base_model, "pooler", None) is not None else None
    pw = pb = None
    if pooler is not None:
        pw, pb = pooler.weight.detach().float().clone(), pooler.bias.detach().float().clone()
        if kind == "pooler" and backbone.has_pooler:
            base = backbone.model.pooler.dense
            if torch.equal(base.weight.float().cpu(), pw) and torch.equal(base.bias.float().cpu(), pb):
                pw = pb = None  # the backbone's own pooler: the engine uses it without a copy
    elif backbone.has_pooler:
        raise ImportFinetunedError("the checkpoint classifies the first token without a pooler, but the backbone "
                                   "has one, which the engine would apply")
    return TaskHead(classifier.weight.detach().float().clone(), classifier.bias.detach().float().clone(), pw, pb)


def _labels(model: nn.Module) -> tuple[tuple[str, ...], str]:
    config = model.config
    num = int(config.num_labels)
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    labels = tuple(id2label.get(i, f"LABEL_{i}") for i in range(num))
    if len(set(labels)) != len(labels):
        labels = tuple(f"LABEL_{i}" for i in range(num))
    problem = "regression" if getattr(config, "problem_type", None) == "regression" or num == 1 else "single_label"
    return labels, problem


# --------------------------------------------------------------------------- fidelity


def read_calibration(path: str | Path | None) -> list[TextInput]:
    """One text per line; a tab separates the two texts of a pair. The built-in set when `path` is None:
    50 short sentences (reviews, news with entities, support requests) and 25 pairs of them."""
    source = Path(path) if path else BUILTIN_CALIBRATION
    if not source.is_file():
        raise ImportFinetunedError(f"{source}: calibration file not found")
    lines = [line.rstrip("\n") for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts: list[TextInput] = []
    for line in lines:
        first, tab, second = line.partition("\t")
        texts.append((first, second) if tab and second.strip() else first)
    if not texts:
        raise ImportFinetunedError(f"{source}: no texts (one text per line)")
    if path is None:
        texts += [(lines[i], lines[i + 1]) for i in range(0, len(lines) - 1, 2)]
    return texts


@dataclass
class Fidelity:
    """Delta (served) against the original checkpoint (transformers) on the calibration texts."""

    label_agreement: float | None  # share of texts (tokens, for token classification) with the same top label
    max_prob_diff: float  # over every class probability (raw value for regression)
    mean_prob_diff: float
    count: int


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor], regression: bool) -> Fidelity:
    """Per-row logits [C] or [tokens, C] of two models on the same texts."""
    ref = torch.cat([r.reshape(-1, r.shape[-1]).float() for r in reference])
    cand = torch.cat([c.reshape(-1, c.shape[-1]).float() for c in candidate])
    if regression:
        diff = (ref - cand).abs()
        return Fidelity(None, float(diff.max()), float(diff.mean()), ref.shape[0])
    p, q = ref.softmax(-1), cand.softmax(-1)
    diff = (p - q).abs()
    agreement = float((p.argmax(-1) == q.argmax(-1)).float().mean())
    return Fidelity(agreement, float(diff.max()), float(diff.max(-1).values.mean()), ref.shape[0])


def _by_length(texts: Sequence, batch_size: int) -> list[list[int]]:
    """Batches of text indices, similar lengths together: padding was a third of the forwards' work."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i].input_ids))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def transformers_logits(model: nn.Module, backbone: Backbone, texts: Sequence, batch_size: int = 32,
                        input_means: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The plain transformers model on the backbone's tokenisation; [C] or [tokens, C] per text.

    With `input_means` (linear module name -> anything), each named module's mean input over every
    non-padding token of the texts is written into it, from the same forwards.
    """
    outputs: list[torch.Tensor] = [torch.empty(0)] * len(texts)
    sums: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor] = []

    def collect(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            total = torch.einsum("bl,bld->d", mask[0], args[0].float()).double()
            sums[name] = sums[name] + total if name in sums else total
        return hook

    handles = [model.base_model.get_submodule(name).register_forward_pre_hook(collect(name))
               for name in (input_means or {})]
    tokens = 0
    try:
        with torch.inference_mode():
            for indices in _by_length(texts, batch_size):
                chunk = [texts[i] for i in indices]
                inputs = {k: v.cpu() for k, v in backbone.pad(chunk).items()}
                mask[:] = [inputs["attention_mask"].float()]
                tokens += int(inputs["attention_mask"].sum())
                logits = model(**inputs).logits.float()
                for row, (i, text) in enumerate(zip(indices, chunk, strict=True)):
                    outputs[i] = logits[row, : len(text.input_ids)] if logits.dim() == 3 else logits[row]
    finally:
        for handle in handles:
            handle.remove()
    if input_means is not None:
        for name in input_means:
            input_means[name] = sums[name] / max(tokens, 1)
    return outputs


def engine_logits(data: bytes, backbone: Backbone, texts: Sequence, batch_size: int = 32) -> list[torch.Tensor]:
    """The delta served by the engine (its real batching path) on already encoded texts."""
    from server.delta import prepare_delta
    from server.engine import Engine, Row

    engine = Engine(backbone)
    delta = prepare_delta(data, backbone, name="import-check", version=1)
    outputs: list[torch.Tensor] = [torch.empty(0)] * len(texts)
    for indices in _by_length(texts, batch_size):
        for i, logits in zip(indices, engine.forward([Row(delta, texts[i]) for i in indices]), strict=True):
            outputs[i] = logits
    return outputs


def _categorise(model: nn.Module) -> dict[str, list[str]]:
    """State-dict keys of the encoder outside the linear weights, by kind: word_embeddings,
    position_embeddings (positions and token types), layer_norms, biases."""
    base = model.base_model
    kinds: dict[str, list[str]] = {"word_embeddings": [], "position_embeddings": [], "layer_norms": [],
                                   "biases": []}
    for name, module in base.named_modules():
        if name.startswith("pooler"):
            continue  # the pooler travels whole, as head.pooler
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Embedding):
            kind = "word_embeddings" if "word" in name else "position_embeddings"
            kinds[kind] += [prefix + p for p, _ in module.named_parameters(recurse=False)]
        elif isinstance(module, nn.LayerNorm):
            kinds["layer_norms"] += [prefix + p for p, _ in module.named_parameters(recurse=False)]
        elif isinstance(module, nn.Linear) and module.bias is not None:
            kinds["biases"].append(prefix + "bias")
    return kinds


@dataclass
class NotCarried:
    """A kind of parameter the format cannot carry, how much it changed, and what dropping it costs."""

    kind: str
    tensors_changed: int
    relative_change: float  # ‖θ_ft − θ‖ / ‖θ‖ over the kind's tensors
    bytes: int  # what carrying the changed tensors would take (float32)
    effect: Fidelity  # original vs original with this kind set back to the backbone's


@contextmanager
def _reset(model: nn.Module, keys: list[str], base: dict[str, torch.Tensor]) -> Iterator[None]:
    """The model with these tensors set back to the backbone's, in place (a copy of the model cost
    more than the forward it served), restored on exit."""
    state = model.base_model.state_dict()
    saved = {key: state[key].clone() for key in keys}
    with torch.no_grad():
        try:
            for key in keys:
                state[key].copy_(base[key].to(state[key].dtype))
            yield
        finally:
            for key, value in saved.items():
                state[key].copy_(value)


def _norms_and_shift(backbone: Backbone, base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]
                     ) -> tuple[list[NormDelta], EmbeddingShift | None]:
    """What the fine-tune changed in the LayerNorms and the position and token-type tables, as parts.

    Position rows past the last one the fine-tune really moved are left out: positions no training
    text reached move only by weight decay (rows 64+ of a MiniLM tuned at 64 tokens: 1/200 of the rest).
    """
    def change(key: str) -> torch.Tensor | None:
        if key not in tuned or key not in base or torch.equal(tuned[key].float().cpu(), base[key]):
            return None
        return (tuned[key].float().cpu() - base[key]).to(EXTRA_DTYPE)

    norms = []
    for name in backbone.layer_norms:
        weight, bias = change(f"{name}.weight"), change(f"{name}.bias")
        if weight is not None or bias is not None:
            norms.append(NormDelta(name, weight, bias))
    position = change("embeddings.position_embeddings.weight")
    if position is not None:
        offset = backbone.model.config.pad_token_id + 1 if backbone.model_type in PADDED_POSITIONS else 0
        rows = position[offset:offset + backbone.max_positions].float().norm(dim=1)
        moved = torch.nonzero(rows > POSITION_ROW_THRESHOLD * float(rows.max())).flatten()
        position = position[offset:offset + int(moved.max()) + 1].clone() if moved.numel() else None
    token_type = change("embeddings.token_type_embeddings.weight") if backbone.type_vocab_size else None
    shift = None
    if backbone.embedding_norm is not None and (position is not None or token_type is not None):
        shift = EmbeddingShift(position, token_type)
    return norms, shift


def _bias_changes(modules: list[str], base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """module -> b_ft − b (float64), for the linear modules whose bias the fine-tune changed."""
    changes = {}
    for name in modules:
        key = f"{name}.bias"
        if key in tuned and key in base and not torch.equal(tuned[key].float().cpu(), base[key]):
            changes[name] = tuned[key].double().cpu() - base[key].double()
    return changes


# --------------------------------------------------------------------------- the import


@dataclass
class ImportResult:
    delta: TaskDelta
    data: bytes
    choices: list[ModuleChoice]
    fidelity: Fidelity
    not_carried: list[NotCarried]
    carried_ceiling: Fidelity  # original vs original with every non-carried kind reset (what exact ΔW reaches)
    checkpoint_bytes: int
    budget_bytes: int
    seconds: float
    cpu_seconds: float
    passed: bool
    gate: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    carried: list[str] = field(default_factory=list)  # kinds beyond the linear weights the delta carries

    def report(self) -> dict:
        by_repr: dict[str, int] = {}
        for choice in self.choices:
            by_repr[choice.representation] = by_repr.get(choice.representation, 0) + 1
        return {
            "passed": self.passed,
            "reasons": self.reasons,
            "gate": self.gate,
            "fidelity": asdict(self.fidelity),
            "carried_ceiling": asdict(self.carried_ceiling),
            "delta_bytes": len(self.data),
            "checkpoint_bytes": self.checkpoint_bytes,
            "compression": round(self.checkpoint_bytes / len(self.data), 1),
            "budget_bytes": self.budget_bytes,
            "seconds": round(self.seconds, 2),
            "cpu_seconds": round(self.cpu_seconds, 2),
            "task_type": self.delta.meta.task_type,
            "labels": list(self.delta.meta.labels),
            "head_pooler": self.delta.head.pooler_weight is not None,
            "representations": by_repr,
            "modules": [asdict(c) for c in self.choices],
            "carried": self.carried,
            "not_carried": [asdict(n) for n in self.not_carried],
        }


def import_finetuned(
    checkpoint: str | Path,
    backbone: Backbone,
    *,
    calibration: Sequence[TextInput] | None = None,
    budget_bytes: int | None = None,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    max_mean_prob_diff: float = DEFAULT_MAX_MEAN_PROB_DIFF,
    max_length: int | None = None,
    description: str = "",
    log: Callable[[str], None] = lambda message: None,
    threads: int | None = 1,
) -> ImportResult:
    """Compress `checkpoint` into a delta for `backbone` and measure it; writes nothing.

    `backbone` is used for the engine check: its linear modules are swapped for the engine's
    (sharing the same weights), so pass one that nothing else uses. `threads`: torch's CPU threads for
    the import (None: leave torch's setting); see the module docstring for why one.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _import(checkpoint, backbone, calibration, budget_bytes, min_agreement, max_mean_prob_diff,
                       max_length, description, log)
    finally:
        torch.set_num_threads(previous)


def _import(checkpoint: str | Path, backbone: Backbone, calibration: Sequence[TextInput] | None,
            budget_bytes: int | None, min_agreement: float, max_mean_prob_diff: float, max_length: int | None,
            description: str, log: Callable[[str], None]) -> ImportResult:
    started, cpu_started = time.perf_counter(), time.process_time()
    model, task_type = load_checkpoint(checkpoint)
    check_compatible(model, backbone, checkpoint)
    tuned = base_state(model)
    base = {k: v.detach().float().cpu().clone() for k, v in backbone.model.state_dict().items()}
    checkpoint_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())

    modules = [name for name in backbone.linear_modules if not name.startswith("pooler.")]
    missing = [name for name in modules if f"{name}.weight" not in tuned]
    if missing:
        raise ImportFinetunedError(f"the checkpoint has no weight for the backbone's linear module {missing[0]!r}")
    total = math.sqrt(sum(float(torch.linalg.norm(base[f"{n}.weight"])) ** 2 for n in modules))
    moved = math.sqrt(sum(float(torch.linalg.norm(tuned[f"{n}.weight"].float() - base[f"{n}.weight"])) ** 2
                          for n in modules))
    if moved > MAX_RELATIVE_CHANGE * total:
        raise ImportFinetunedError(
            f"another backbone: the linear weights differ from the backbone's by {moved / total:.0%} (fine-tuning "
            "moves them by about 1 %); same shapes, but not fine-tuned from this backbone")

    labels, problem = _labels(model)
    head = _head(model, task_type, backbone, tuned)
    budget = budget_bytes if budget_bytes is not None else checkpoint_bytes // DEFAULT_BUDGET_FRACTION
    head_bytes = head.nbytes
    if budget <= head_bytes:
        raise ImportFinetunedError(f"--budget-bytes {budget} does not cover the head ({head_bytes} bytes)")

    texts = backbone.encode(list(calibration or read_calibration(None)), max_length)
    log(f"running the original on {len(texts)} calibration texts")
    input_means: dict[str, torch.Tensor] = dict.fromkeys(modules, torch.empty(0))
    original = transformers_logits(model, backbone, texts, input_means=input_means)

    log(f"analysing {len(modules)} linear modules")
    analyses = [_analyse(n, base[f"{n}.weight"], tuned[f"{n}.weight"]) for n in modules]
    meta = DeltaMeta(method="imported", task_type=task_type, labels=labels,  # type: ignore[arg-type]
                     backbone_fingerprint=backbone.fingerprint, problem_type=problem, max_length=max_length,
                     description=description or f"imported from fine-tuned checkpoint {Path(checkpoint).name}")
    bias_changes = _bias_changes(modules, base, tuned)
    norms, shift = _norms_and_shift(backbone, base, tuned)
    tensor_budget = budget - head_bytes
    # Biases, LayerNorms and the embedding shift first: 0.1 % of the checkpoint that decides more labels
    # than any rank (docs/import-export.md).
    extra_bytes = (sum(out * BIAS_ITEMSIZE for out, _ in backbone.linear_modules.values())
                   + sum(part.nbytes for part in norms) + (shift.nbytes if shift else 0))
    carry_extras = bool(bias_changes or norms or shift) and extra_bytes <= tensor_budget * MAX_BIAS_SHARE
    carry_biases = carry_extras
    if carry_extras:
        tensor_budget -= extra_bytes
    else:
        norms, shift = [], None
    for _ in range(4):  # the file's JSON header grows with the parts chosen: shrink until the file fits
        for analysis in analyses:
            analysis.rank, analysis.sparse_index = 0, None
            analysis.exact = analysis.S is None
        allocated = _allocate(analyses, tensor_budget)
        parts: list[ModulePart] = []
        choices: list[ModuleChoice] = []
        biases = dict(bias_changes) if carry_biases else {}
        for analysis in analyses:
            found, choice, left_out = _parts_of(analysis, input_means[analysis.module] if carry_biases else None)
            parts += found
            choices.append(choice)
            if left_out is not None:  # what the truncation drops on average goes into the bias
                biases[analysis.module] = biases.get(analysis.module, torch.zeros_like(left_out)) + left_out
        parts += [BiasDelta(module, change.to(BIAS_DTYPE)) for module, change in sorted(biases.items())]
        delta = TaskDelta.from_parts(meta, head, parts, norms=norms, embedding_shift=shift)
        data = delta.to_bytes()
        if len(data) <= budget:
            break
        # Shrink from what was allocated, not from the budget: an allocation that left slack under the
        # budget kept every part when only the budget shrank (a CoNLL import failed so at 1/10).
        tensor_budget = allocated - (len(data) - budget)
    else:
        raise ImportFinetunedError(f"--budget-bytes {budget} is too small for even the file's header and head")

    log("measuring what the format does not carry")
    regression = problem == "regression"
    not_carried: list[NotCarried] = []
    reset_all: list[str] = []
    for kind, keys in _categorise(model).items():
        changed = [k for k in keys if k in base and not torch.equal(tuned[k].float().cpu(), base[k])]
        if not changed or (carry_extras and kind in CARRIED_EXTRAS):
            continue
        reset_all += changed
        diff = math.sqrt(sum(float(torch.linalg.norm(tuned[k].float() - base[k])) ** 2 for k in changed))
        norm = math.sqrt(sum(float(torch.linalg.norm(base[k])) ** 2 for k in changed))
        with _reset(model, changed, base):
            effect = compare(original, transformers_logits(model, backbone, texts), regression)
        not_carried.append(NotCarried(kind, len(changed), diff / norm if norm else 0.0,
                                      sum(base[k].numel() * 4 for k in changed), effect))
    if len(not_carried) > 1:
        with _reset(model, reset_all, base):
            ceiling = compare(original, transformers_logits(model, backbone, texts), regression)
    else:  # one kind left out (or none): its effect is the ceiling, no forward needed
        ceiling = not_carried[0].effect if not_carried else compare(original, original, regression)
    log("serving the delta with the engine")
    fidelity = compare(original, engine_logits(data, backbone, texts), regression)

    reasons = []
    if fidelity.label_agreement is not None and fidelity.label_agreement < min_agreement:
        reasons.append(f"label agreement {fidelity.label_agreement:.2%} is below {min_agreement:.2%}")
    if fidelity.mean_prob_diff > max_mean_prob_diff:
        reasons.append(f"mean probability difference {fidelity.mean_prob_diff:.4f} is above {max_mean_prob_diff}")
    return ImportResult(
        delta=delta, data=data, choices=choices, fidelity=fidelity, not_carried=not_carried,
        carried_ceiling=ceiling, checkpoint_bytes=checkpoint_bytes, budget_bytes=budget,
        seconds=time.perf_counter() - started, cpu_seconds=time.process_time() - cpu_started,
        passed=not reasons, gate={"min_agreement": min_agreement, "max_mean_prob_diff": max_mean_prob_diff},
        reasons=reasons, carried=list(CARRIED_EXTRAS) if carry_extras else [],
    )
