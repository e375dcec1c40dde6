"""The training loop: data in, best-epoch delta and a JSON report out.

One `train()` call reads the files, carves a validation split out of the training data (or
reads `--val`), builds a `DeltaModel` on a fresh float32 backbone, lets the method choose what
trains (the readout in its own parameter group, optionally fitted on frozen features first),
and runs AdamW phase by phase (DSEE: dense, then prune and retrain), each phase over an
annealed budget (`PhaseBudget`): warm-up, then a linear decay reaching 0 at the budget's end.
After every epoch the model is scored on the validation split; the kept epoch is the best of
the budget's annealed part, and training stops early only on a drop larger than the validation
noise. The kept epoch is restored, exported (validated by `parse_delta` against the backbone)
and only then scored on `--eval`, which is reported and never used to choose anything.

Speed: the backbone's device (CUDA when present) with bf16 autocast there (fp16 with a gradient
scaler where bf16 is missing); on CPU the thread count that measures fastest on a real batch
(probed at start, unless `--threads`), since on shared cores more threads are often slower;
batches bucketed by length so padding stays small (`training.data.batches`).
"""

from __future__ import annotations

import contextlib
import json
import math
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
from training.data import (
    IGNORE,
    Encoded,
    Example,
    batches,
    encode,
    label_set,
    read_examples,
    split_validation,
)
from training.methods import Method, Phase, TaskInfo
from training.metrics import accuracy, binary_f1, entity_f1, mcc
from training.model import DeltaModel


@dataclass
class TrainSettings:
    method: str
    task_type: str
    train: str
    eval: str
    val: str | None = None  # validation file; None: a seeded fraction of the training data
    val_fraction: float = 0.1
    max_val_examples: int | None = 1000  # a carved split stops here (it is scored every epoch)
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    positive_label: str = "1"  # embedding: the label of a matching pair (only matching pairs train)
    baseline: bool = True  # embedding: score the bare backbone on --eval before training
    backbone: str | None = None
    epochs: int | None = None  # the budget (the schedule reaches 0 at its end); None: the method's recipe
    stop_drop: float | None = None  # early stop on a validation drop of this many standard errors; 0: never
    lr: float | None = None
    head_lr: float | None = None
    batch_size: int = 32
    max_length: int = 128
    seed: int = 42
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    head_pooler: bool = False
    head_fit: bool | None = None  # fit the classifier on frozen features first; None: the method's recipe
    pooling: str | None = None  # cls | mean (sequence classification); None: the backbone's own, else cls
    word_piece: str = "first"
    warmup_ratio: float | None = None  # None: the method's recipe
    threads: int | None = None  # None: probe on CPU
    device: str | None = None  # None: cuda when available, else cpu
    precision: str = "auto"  # auto (bf16/fp16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
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


def evaluate(model: DeltaModel, data: list[Encoded], labels: list[str], batch_size: int,
             autocast: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
    """eval_accuracy always; eval_f1 (binary or entity-level) and eval_mcc where they apply."""
    model.eval()
    gold: list = []
    pred: list = []
    with torch.no_grad():
        for group, batch in batches(data, batch_size * 2, model.backbone.pad_id, shuffle=False):
            with autocast or contextlib.nullcontext():
                logits = model.run(batch)
            best = logits.argmax(-1).cpu()
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


def run_details(backbone: Backbone, model: DeltaModel, method: Method, settings: TrainSettings, precision: str,
                history: list[dict]) -> dict:
    """The report's closing keys, the same for every task type: what ran, where, how, and epoch by epoch."""
    return {
        "backbone": backbone.name,
        "backbone_fingerprint": backbone.fingerprint,
        "device": str(model.device),
        "precision": precision,
        "torch_threads": torch.get_num_threads(),
        "settings": asdict(settings),
        "recipe": asdict(method.recipe),
        "method_config": method.describe(),
        "history": history,
    }


def write_outputs(report: dict, delta_bytes: bytes | None, settings: TrainSettings) -> None:
    """What a run writes: the delta to `--out` (when the method exports one) and the JSON report to
    `--report`, each atomically (`--push` is the command line's, after this)."""
    if delta_bytes is not None and settings.out:
        write_atomic(settings.out, delta_bytes)
    if settings.report:
        write_atomic(settings.report, (json.dumps(report, indent=2) + "\n").encode())


def resolve_pooling(settings: TrainSettings, backbone: Backbone) -> str:
    """The delta's `pooling`: the flag, else what the backbone was trained with, else `cls`
    (token classification reads every token: always `cls`, never written)."""
    if settings.task_type != "sequence-classification":
        if settings.pooling == "mean":
            raise ValueError("--pooling mean is for sequence classification")
        return "cls"
    return settings.pooling or backbone.trained_pooling or "cls"


def build_model(settings: TrainSettings, method: Method, backbone: Backbone, labels: list[str],
                pairs: bool) -> DeltaModel:
    torch.manual_seed(settings.seed)
    model = DeltaModel(backbone, settings.task_type, len(labels), head_pooler=settings.head_pooler,
                       word_piece=settings.word_piece, pooling=resolve_pooling(settings, backbone))
    method.setup(model, TaskInfo(settings.task_type, len(labels), pairs))
    return model


def readout_parameters(model: DeltaModel) -> list[torch.nn.Parameter]:
    """The trainable parameters of the readout: the classifier and the task pooler."""
    ids = {id(p) for p in model.classifier.parameters()}
    if model.pooler is not None:
        ids |= {id(p) for p in model.pooler.parameters()}
    return [p for p in model.trainable_parameters() if id(p) in ids]


def optimizer_for(model: DeltaModel, method: Method, settings: TrainSettings,
                  lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """AdamW with two groups: `body` (the method's own parameters) at the method's rate and `head`
    (the readout, which starts random or freshly fitted) at its own rate."""
    lr = settings.lr if settings.lr is not None else method.recipe.lr
    head_lr = settings.head_lr if settings.head_lr is not None else (method.recipe.head_lr or lr)
    head = readout_parameters(model)
    head_ids = {id(p) for p in head}
    body = [p for p in model.trainable_parameters() if id(p) not in head_ids]
    return torch.optim.AdamW([{"name": "body", "params": body, "lr": lr * lr_scale},
                              {"name": "head", "params": head, "lr": head_lr * lr_scale}], weight_decay=0.0)


def schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then linear decay reaching 0 at `total_steps`, the
    budget's end (the factor for step s is applied before step s + 1 runs)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(total_steps - step, 0) / max(total_steps - warmup, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def validation_noise(score: float, examples: int) -> float:
    """Standard error of a validation score read as a proportion over `examples` rows
    (exact for accuracy, an approximation for F1)."""
    return math.sqrt(max(score * (1.0 - score), 1.0 / max(examples, 1)) / max(examples, 1))


def annealed_from(epochs: int, select_from: float) -> int:
    """The first epoch (1-based) of a phase of `epochs` whose validation score may be kept."""
    return min(epochs, max(1, math.ceil(select_from * epochs)))


class PhaseBudget:
    """One phase's annealed budget: its optimiser schedule, which epoch is kept, when to stop early.

    The schedule warms up (unless the phase continues a trained model) and decays to 0 at the
    phase's last step. The kept epoch is the best validation score among the annealed part
    (epochs from `select_from` of the phase on); before that part is reached, the best so far.
    Training stops early only when a score falls more than `stop_drop` standard errors under the
    best of the phase. Both training loops (classification and embedding) use this one rule.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, phase: Phase, steps_per_epoch: int, warmup_ratio: float,
                 select_from: float, stop_drop: float, val_rows: int, metric: str) -> None:
        self.phase = phase
        total_steps = max(phase.epochs * steps_per_epoch, 1)
        warmup = min(int(warmup_ratio * total_steps), steps_per_epoch) if phase.warmup else 0
        self.scheduler = schedule(optimizer, total_steps, warmup)
        self.first_kept = annealed_from(phase.epochs, select_from)
        self.stop_drop, self.val_rows, self.metric = stop_drop, val_rows, metric
        self.best: dict | None = None  # the kept candidate, with the model's state
        self.peak: dict | None = None  # the best score of any epoch of the phase

    def lr_factor(self) -> float:
        """The schedule's factor now (1 = the peak rate; 0 at the end of the budget)."""
        group = self.scheduler.optimizer.param_groups[0]
        return round(group["lr"] / group["initial_lr"], 4) if group.get("initial_lr") else 0.0

    def observe(self, model: DeltaModel, epoch: int, phase_epoch: int, score: float,
                val: dict[str, float]) -> str | None:
        """Record an epoch's validation; returns why to stop now, or None to go on."""
        annealed = phase_epoch >= self.first_kept
        candidate = {"epoch": epoch, "score": score, "annealed": annealed, "val": val}
        best = self.best
        if best is None or (annealed and not best["annealed"]) or (annealed == best["annealed"]
                                                                   and score > best["score"]):
            self.best = {**candidate, "state": _snapshot(model)}
        if self.peak is None or score > self.peak["score"]:
            self.peak = candidate
        noise = validation_noise(self.peak["score"], self.val_rows)
        if self.stop_drop > 0 and phase_epoch < self.phase.epochs and \
                score < self.peak["score"] - self.stop_drop * noise:
            return (f"{self.phase.name}: validation {self.metric} {score:.4f} fell more than {self.stop_drop:g} "
                    f"standard errors ({noise:.4f}) under its best ({self.peak['score']:.4f}, epoch "
                    f"{self.peak['epoch']}); stopped at epoch {epoch}")
        return None

    def finished(self) -> str:
        return f"{self.phase.name}: ran its budget of {self.phase.epochs} epoch(s); the rate reached 0"


def fit_head(model: DeltaModel, data: list[Encoded], batch_size: int, num_labels: int,
             autocast: contextlib.AbstractContextManager, l2: float = 1e-4) -> dict[str, float]:
    """Fit the classifier on the model's current (frozen) features: multinomial logistic
    regression by L-BFGS, so training starts from a readout that already fits instead of a random one."""
    feats, golds = [], []
    model.eval()
    for _, batch in batches(data, batch_size * 2, model.backbone.pad_id, shuffle=False):
        with autocast:
            z = model.features(batch).float()
        y = batch["labels"].to(z.device)
        if z.dim() == 3:  # token classification: the labelled tokens only
            keep = y != IGNORE
            z, y = z[keep], y[keep]
        feats.append(z)
        golds.append(y)
    x, y = torch.cat(feats), torch.cat(golds)
    weight = torch.zeros(num_labels, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_labels, device=x.device, requires_grad=True)
    solver = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        solver.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    solver.step(closure)
    with torch.no_grad():
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(bias)
        accuracy_ = float(((x @ weight.T + bias).argmax(-1) == y).float().mean())
    return {"rows": int(x.shape[0]), "train_accuracy": round(accuracy_, 4)}


def served_label_names(data_labels: list[str], names: tuple[str, ...] | None) -> tuple[str, ...]:
    """The labels a delta serves: the data's own (e.g. SST-2's 0/1), or names given for them in order."""
    if names is None:
        return tuple(data_labels)
    if len(names) != len(data_labels) or len(set(names)) != len(names):
        raise ValueError(f"--label-names needs {len(data_labels)} distinct names, one for each of the data's "
                         f"labels in class-id order {data_labels}; got {list(names)}")
    return tuple(names)


def autocast_for(device: torch.device, precision: str) -> tuple[contextlib.AbstractContextManager, str]:
    """The autocast context of a run and the precision it stands for."""
    if precision == "auto":
        precision = "fp32" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return contextlib.nullcontext(), precision
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    if device.type != "cuda":
        raise ValueError(f"{precision} autocast is for CUDA; on CPU use fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype), precision


def probe_threads(model: DeltaModel, batch: dict[str, torch.Tensor]) -> int:
    """The CPU thread count with the fastest forward+backward on `batch` (1, 2, 4, ... up to the cores).

    On cores shared with other jobs, OpenMP oversubscription can make 2 threads several times
    slower than 1, so this is measured, not assumed. RNG state and gradients are left as found.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    candidates = [n for n in (1, 2, 4, 8, 16) if n <= cores]
    if len(candidates) == 1:
        return 1
    timings = {}
    with torch.random.fork_rng(devices=[]):
        model.train()
        for n in candidates:
            torch.set_num_threads(n)
            best = float("inf")
            for _ in range(2):  # the first run warms up allocator and kernels
                tick = time.perf_counter()
                loss_fn(model.run(batch), batch["labels"].to(model.device)).backward()
                best = min(best, time.perf_counter() - tick)
            timings[n] = best
    model.zero_grad(set_to_none=True)
    # More threads must win clearly: under bursty contention a lucky timing is not worth the
    # risk of oversubscription, which costs far more than it saves.
    fastest = candidates[0]
    for n in candidates[1:]:
        if timings[n] < 0.8 * timings[fastest]:
            fastest = n
    torch.set_num_threads(fastest)
    return fastest


def _snapshot(model: DeltaModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _restore(model: DeltaModel, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def pooling_metadata(task_type: str, pooling: str) -> dict:
    """`DeltaMeta` keywords carrying a sequence task's pooling (task-delta.md's metadata `pooling`)."""
    return {"pooling": pooling} if task_type == "sequence-classification" else {}


def load_data(settings: TrainSettings) -> tuple[list[Example], list[Example], list[Example], str]:
    """(train, validation, evaluation) examples and a sentence saying where validation came from."""
    read = {"task_type": settings.task_type, "text_column": settings.text_column,
            "pair_column": settings.text_pair_column, "label_column": settings.label_column}
    pool = subsample(read_examples(settings.train, **read), settings.max_train_examples, settings.seed)
    eval_examples = subsample(read_examples(settings.eval, **read), settings.max_eval_examples, settings.seed)
    if settings.val:
        val = read_examples(settings.val, **read)
        # identical inputs leave the training side, so the validation score is not a training score
        val_keys = {(e.text, e.pair) for e in val}
        train_examples = [e for e in pool if (e.text, e.pair) not in val_keys]
        source = f"--val file {settings.val} ({len(val)} examples)"
    else:
        train_examples, val = split_validation(pool, fraction=settings.val_fraction,
                                               limit=settings.max_val_examples, seed=settings.seed,
                                               exclude=eval_examples)
        source = (f"{len(val)} examples carved from the training file (seed {settings.seed}, "
                  f"{settings.val_fraction:.0%} capped at {settings.max_val_examples}), disjoint from the "
                  f"training rows and from --eval")
    if not train_examples or not val:
        raise ValueError(f"{settings.train}: too few examples to train and validate "
                         f"({len(train_examples)} train, {len(val)} validation)")
    return train_examples, val, eval_examples, source


def training_backbone(settings: TrainSettings) -> Backbone:
    """The backbone in float32 on any device: the trainables are made like its weights, and float16
    master weights would lose AdamW's small updates (its eps is 0 there); autocast gives the speed."""
    return Backbone.load(settings.backbone, device=settings.device, dtype=torch.float32,
                         max_length=settings.max_length)


def train(settings: TrainSettings, method: Method, backbone: Backbone | None = None,
          progress: bool = True) -> TrainResult:
    if settings.task_type == "embedding":  # pairs and a ranking loss: its own loop (training.embedding)
        from training.embedding import train_embedding

        return train_embedding(settings, method, backbone, progress)
    random.seed(settings.seed)
    run_started = time.perf_counter()
    backbone = backbone or training_backbone(settings)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    elif backbone.device.type == "cpu":
        # Until the probe has measured: one thread. A method's setup (DSEE's GreBsmo splits) at the
        # default thread count next to another job took minutes instead of seconds (oversubscription).
        torch.set_num_threads(1)
    train_examples, val_examples, eval_examples, val_source = load_data(settings)
    labels = label_set(train_examples + val_examples + eval_examples)
    served_labels = served_label_names(labels, settings.label_names)
    pairs = any(ex.pair is not None for ex in train_examples)
    model = build_model(settings, method, backbone, labels, pairs)
    enc = {"backbone": backbone, "labels": labels, "task_type": settings.task_type,
           "max_length": settings.max_length, "word_piece": settings.word_piece}
    train_data, val_data, eval_data = (encode(x, **enc) for x in (train_examples, val_examples, eval_examples))
    autocast, precision = autocast_for(model.device, settings.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    if model.device.type == "cpu" and not settings.threads:
        _, probe = next(batches(train_data, settings.batch_size, backbone.pad_id, shuffle=True,
                                rng=random.Random(settings.seed)))
        probe_threads(model, probe)

    recipe = method.recipe
    budget = settings.epochs if settings.epochs is not None else recipe.epochs
    if budget < 1:
        raise ValueError(f"--epochs must be at least 1, got {budget}")
    phases = method.phases(budget)
    stop_drop = settings.stop_drop if settings.stop_drop is not None else recipe.stop_drop
    head_fit = settings.head_fit if settings.head_fit is not None else recipe.head_fit
    warmup_ratio = settings.warmup_ratio if settings.warmup_ratio is not None else recipe.warmup_ratio
    steps_per_epoch = (len(train_data) + settings.batch_size - 1) // settings.batch_size
    meta = DeltaMeta(method=method.name, task_type=settings.task_type,  # type: ignore[arg-type]
                     labels=served_labels, backbone_fingerprint=backbone.fingerprint,
                     max_length=settings.max_length, word_piece=settings.word_piece,
                     description=settings.description, **pooling_metadata(settings.task_type, model.pooling))
    rng = random.Random(settings.seed)
    select = "f1" if settings.task_type == "token-classification" else "accuracy"
    history: list[dict] = []
    steps = 0
    epoch = 0
    stopped: list[str] = []
    best: dict | None = None
    started, cpu_started = time.perf_counter(), time.process_time()
    head_fitted = None
    if head_fit and model.classifier.weight.requires_grad:
        head_fitted = fit_head(model, train_data, settings.batch_size, len(labels), autocast)
    for index, phase in enumerate(phases):
        if index > 0:
            assert best is not None
            _restore(model, best["state"])  # the next phase starts from this phase's best epoch
            method.before_phase(model, index)
        optimizer = optimizer_for(model, method, settings, phase.lr_scale)
        # earlier phases' epochs are another model: they never compete
        phase_budget = PhaseBudget(optimizer, phase, steps_per_epoch, warmup_ratio, recipe.select_from, stop_drop,
                              len(val_data), select)
        for phase_epoch in range(1, phase.epochs + 1):
            epoch += 1
            running = _train_epoch(model, optimizer, phase_budget.scheduler, scaler, autocast, train_data, settings,
                                   rng, f"{phase.name} {phase_epoch}/{phase.epochs}", steps_per_epoch, progress)
            steps += steps_per_epoch
            scores = evaluate(model, val_data, labels, settings.batch_size, autocast)
            val = {k.replace("eval_", "val_"): v for k, v in scores.items()}
            history.append({"epoch": epoch, "phase": phase.name, "steps": steps, "train_loss": running,
                            "lr_factor": phase_budget.lr_factor(), **val,
                            "seconds": round(time.perf_counter() - started, 1)})
            if progress:
                tqdm.write(f"epoch {epoch} ({phase.name}): " + ", ".join(f"{k}={v:.4f}" for k, v in val.items()))
            reason = phase_budget.observe(model, epoch, phase_epoch, scores[f"eval_{select}"], val)
            if reason:
                stopped.append(reason)
                break
        else:
            stopped.append(phase_budget.finished())
        best = phase_budget.best
    train_seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started  # apart from waiting (shared or paused cores)
    assert best is not None
    _restore(model, best["state"])
    best_bytes = model.export(meta).to_bytes() if method.exports else None
    if best_bytes is not None:
        parse_delta(best_bytes, backbone.spec())  # never hand out a file the server would refuse
    tick = time.perf_counter()
    metrics = evaluate(model, eval_data, labels, settings.batch_size, autocast)
    eval_seconds = time.perf_counter() - tick
    report = {
        **metrics,
        **best["val"],
        "best_epoch": best["epoch"],
        "epochs": epoch,
        "steps": steps,
        "selection": f"best epoch of the last phase's annealed part by validation {select}; --eval is only "
                     "reported",
        "validation": val_source,
        "budget": f"{budget} epoch(s), annealed to 0 (" + ("--epochs" if settings.epochs is not None else "recipe")
                  + "); the kept epoch is the best of the annealed part" + (
                      f"; early stop on a validation drop over {stop_drop:g} standard errors" if stop_drop > 0
                      else "; no early stop"),
        "pooling": model.pooling if settings.task_type == "sequence-classification" else None,
        "head_fit": head_fitted,
        "stopped": stopped,
        "method": method.name,
        "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
        "delta_bytes": len(best_bytes) if best_bytes is not None else None,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "wall_seconds": round(time.perf_counter() - run_started, 1),  # the whole run: setup, training, eval
        "train_examples": len(train_data),
        "val_examples": len(val_data),
        "eval_examples": len(eval_data),
        "labels": list(served_labels),
        "data_labels": labels,
        **run_details(backbone, model, method, settings, precision, history),
    }
    write_outputs(report, best_bytes, settings)
    return TrainResult(report, best_bytes, model)


def _train_epoch(model: DeltaModel, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                 autocast: contextlib.AbstractContextManager, data: list[Encoded], settings: TrainSettings,
                 rng: random.Random, desc: str, total: int, progress: bool) -> float:
    """One pass over `data`; returns the smoothed training loss."""
    model.train()
    seen, running, tick = 0, 0.0, time.perf_counter()
    bar = tqdm(batches(data, settings.batch_size, model.backbone.pad_id, shuffle=True, rng=rng),
               total=total, desc=desc, disable=not progress, mininterval=2)
    for step, (_, batch) in enumerate(bar, 1):
        with autocast:
            logits = model.run(batch)
        loss = loss_fn(logits.float(), batch["labels"].to(model.device))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        seen += batch["input_ids"].shape[0]
        value = loss.item()
        running = value if step == 1 else 0.98 * running + 0.02 * value
        bar.set_postfix(loss=f"{running:.4f}", ex_s=f"{seen / (time.perf_counter() - tick):.1f}")
    return running
