"""The training loop: data in, best-epoch delta and a JSON report out.

One `train()` call reads the files, builds a `DeltaModel` on a fresh backbone, lets the method
choose what trains, runs AdamW with linear warmup/decay (tqdm shows loss and examples/s),
evaluates after every epoch and keeps the best epoch's delta bytes, already validated by
`parse_delta` against the backbone.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from adapters_store.format import DeltaMeta, parse_delta
from server.backbone import Backbone
from training.data import IGNORE, Encoded, Example, batches, encode, label_set, read_examples
from training.methods import Method, TaskInfo
from training.metrics import accuracy, binary_f1, entity_f1, mcc
from training.model import DeltaModel


@dataclass
class TrainSettings:
    method: str
    task_type: str
    train: str
    eval: str
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    backbone: str | None = None
    epochs: int = 3
    lr: float | None = None
    head_lr: float | None = None
    batch_size: int = 32
    max_length: int = 128
    seed: int = 42
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    head_pooler: bool = False
    word_piece: str = "first"
    warmup_ratio: float = 0.06
    threads: int | None = None
    out: str | None = None
    report: str | None = None
    description: str = ""
    label_names: tuple[str, ...] | None = None  # names served for the classes, in class-id order


@dataclass
class TrainResult:
    report: dict
    delta_bytes: bytes | None
    model: DeltaModel


def subsample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    if limit is None or limit >= len(examples):
        return examples
    chosen = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def evaluate(model: DeltaModel, data: list[Encoded], labels: list[str], batch_size: int) -> dict[str, float]:
    """eval_accuracy always; eval_f1 (binary or entity-level) and eval_mcc where they apply."""
    model.eval()
    gold: list = []
    pred: list = []
    with torch.no_grad():
        for group, batch in batches(data, batch_size * 2, model.backbone.pad_id, shuffle=False):
            logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            best = logits.argmax(-1)
            for row, index in enumerate(group):
                item = data[index]
                if item.word_tokens is None:
                    gold.append(item.label)
                    pred.append(int(best[row]))
                else:  # a word truncated away is predicted O (counts against recall)
                    outside = labels.index("O") if "O" in labels else 0
                    gold.append([labels[t] for t in item.word_labels or []])
                    pred.append([labels[int(best[row, t])] if t >= 0 else labels[outside] for t in item.word_tokens])
    if model.task_type == "token-classification":
        words = [(g, p) for gs, ps in zip(gold, pred, strict=True) for g, p in zip(gs, ps, strict=True)]
        scores = entity_f1(gold, pred)
        return {"eval_accuracy": sum(g == p for g, p in words) / max(len(words), 1), "eval_f1": scores["f1"],
                "eval_precision": scores["precision"], "eval_recall": scores["recall"]}
    out = {"eval_accuracy": accuracy(gold, pred), "eval_mcc": mcc(gold, pred, len(labels))}
    if len(labels) == 2:
        out["eval_f1"] = binary_f1(gold, pred, positive=1)
    return out


def write_atomic(path: str | Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the file private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_model(settings: TrainSettings, method: Method, backbone: Backbone, labels: list[str],
                pairs: bool) -> DeltaModel:
    torch.manual_seed(settings.seed)
    model = DeltaModel(backbone, settings.task_type, len(labels), head_pooler=settings.head_pooler,
                       word_piece=settings.word_piece)
    method.setup(model, TaskInfo(settings.task_type, len(labels), pairs))
    return model


def optimizer_for(model: DeltaModel, method: Method, settings: TrainSettings) -> torch.optim.Optimizer:
    lr = settings.lr if settings.lr is not None else method.default_lr
    # The head starts random; some methods want it faster than their own parameters (mask scores).
    head_lr = settings.head_lr or method.default_head_lr or lr
    head_ids = {id(p) for p in model.classifier.parameters()}
    if model.pooler is not None:
        head_ids |= {id(p) for p in model.pooler.parameters()}
    body = [p for p in model.trainable_parameters() if id(p) not in head_ids]
    head = [p for p in model.trainable_parameters() if id(p) in head_ids]
    return torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": head_lr}], weight_decay=0.0)


def served_label_names(data_labels: list[str], names: tuple[str, ...] | None) -> tuple[str, ...]:
    """The labels a delta serves: the data's own (e.g. SST-2's 0/1), or names given for them in order."""
    if names is None:
        return tuple(data_labels)
    if len(names) != len(data_labels) or len(set(names)) != len(names):
        raise ValueError(f"--label-names needs {len(data_labels)} distinct names, one for each of the data's "
                         f"labels in class-id order {data_labels}; got {list(names)}")
    return tuple(names)


def train(settings: TrainSettings, method: Method, backbone: Backbone | None = None,
          progress: bool = True) -> TrainResult:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    random.seed(settings.seed)
    backbone = backbone or Backbone.load(settings.backbone, device="cpu", max_length=settings.max_length)
    read = {"task_type": settings.task_type, "text_column": settings.text_column,
            "pair_column": settings.text_pair_column, "label_column": settings.label_column}
    train_examples = subsample(read_examples(settings.train, **read), settings.max_train_examples, settings.seed)
    eval_examples = subsample(read_examples(settings.eval, **read), settings.max_eval_examples, settings.seed)
    labels = label_set(train_examples + eval_examples)
    served_labels = served_label_names(labels, settings.label_names)
    pairs = any(ex.pair is not None for ex in train_examples)
    model = build_model(settings, method, backbone, labels, pairs)
    train_data = encode(train_examples, backbone, labels, settings.task_type, settings.max_length, settings.word_piece)
    eval_data = encode(eval_examples, backbone, labels, settings.task_type, settings.max_length, settings.word_piece)

    optimizer = optimizer_for(model, method, settings)
    epochs = method.total_epochs(settings.epochs)
    steps_per_epoch = (len(train_data) + settings.batch_size - 1) // settings.batch_size
    total_steps = max(epochs * steps_per_epoch, 1)
    warmup = int(settings.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / max(warmup, 1), max(total_steps - s, 0) / max(total_steps - warmup, 1)))
    meta = DeltaMeta(method=method.name, task_type=settings.task_type,  # type: ignore[arg-type]
                     labels=served_labels, backbone_fingerprint=backbone.fingerprint,
                     max_length=settings.max_length, word_piece=settings.word_piece,
                     description=settings.description)
    rng = random.Random(settings.seed)
    history: list[dict] = []
    best: dict | None = None
    best_bytes: bytes | None = None
    select = "eval_f1" if settings.task_type == "token-classification" else "eval_accuracy"
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        seen, running, tick = 0, 0.0, time.perf_counter()
        bar = tqdm(batches(train_data, settings.batch_size, backbone.pad_id, shuffle=True, rng=rng),
                   total=steps_per_epoch, desc=f"epoch {epoch}/{epochs}", disable=not progress, mininterval=2)
        for step, (_, batch) in enumerate(bar, 1):
            logits = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            loss = loss_fn(logits, batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += batch["input_ids"].shape[0]
            running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
            bar.set_postfix(loss=f"{running:.4f}", ex_s=f"{seen / (time.perf_counter() - tick):.1f}")
        changed = method.on_epoch_end(model, epoch)
        metrics = evaluate(model, eval_data, labels, settings.batch_size)
        history.append({"epoch": epoch, "train_loss": running, **metrics,
                        "seconds": round(time.perf_counter() - started, 1)})
        if progress:
            tqdm.write(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if changed:
            best, best_bytes = None, None  # earlier epochs are another model (e.g. before pruning)
        if best is None or metrics[select] > best[select]:
            best = {"epoch": epoch, **metrics}
            best_bytes = model.export(meta).to_bytes() if method.exports else None
    train_seconds = time.perf_counter() - started
    assert best is not None
    if best_bytes is not None:
        parse_delta(best_bytes, backbone.spec())  # never hand out a file the server would refuse
    report = {
        **{k: v for k, v in best.items() if k.startswith("eval_")},
        "best_epoch": best["epoch"],
        "epochs": epochs,
        "method": method.name,
        "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
        "delta_bytes": len(best_bytes) if best_bytes is not None else None,
        "train_seconds": round(train_seconds, 1),
        "train_examples": len(train_data),
        "eval_examples": len(eval_data),
        "labels": list(served_labels),
        "data_labels": labels,
        "backbone": backbone.name,
        "backbone_fingerprint": backbone.fingerprint,
        "settings": asdict(settings),
        "method_config": method.describe(),
        "history": history,
        "torch_threads": torch.get_num_threads(),
    }
    if best_bytes is not None and settings.out:
        write_atomic(settings.out, best_bytes)
    if settings.report:
        write_atomic(settings.report, (json.dumps(report, indent=2) + "\n").encode())
    return TrainResult(report, best_bytes, model)
