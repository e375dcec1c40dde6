"""Training embedding deltas: text pairs in, a delta whose answer is a sentence vector out.

The data are pairs of texts that mean the same thing (paraphrases, a question and its answer, a
title and its body). The loss is the in-batch-negatives ranking loss of sentence-transformers'
`MultipleNegativesRankingLoss`: in a batch of n pairs, each first text has to pick its own second
text out of all n second texts, scored by cosine similarity times 20, under cross-entropy — the
other pairs are the negatives, so no negative labels are needed. A batch never holds the same
text twice (a repeated text would be a "negative" identical to the answer).

A label column is optional. Where it is there, training keeps the matching pairs (label =
`--positive-label`), and evaluation also scores the non-matching ones.

Evaluation on held-out pairs, with the vectors the delta serves (mean pooled, L2-normalised):
- retrieval: every matching pair's first text is a query, and the distinct second texts of all
  matching pairs are the corpus; recall@1 and MRR of the query's own second text. A tie with a
  wrong text counts against the query, so a collapsed model (one vector for everything) scores
  1/corpus, not 1;
- with labels of both kinds: the F1 of "cosine ≥ t" for the best threshold t on these pairs (as
  sentence-transformers' `BinaryClassificationEvaluator`; t is chosen on the evaluated pairs
  themselves, so it is an optimistic reading, the same for every model compared).

Training (`train_embedding`, which `training.trainer.train` hands `--task-type embedding` to)
selects its epoch on validation MRR (a split carved from the training pairs, or `--val`) and
scores the bare backbone on `--eval` first, so every report carries its own baseline
(`--no-baseline` skips it when several methods are compared on the same data).
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from adapters_store.format import DeltaMeta, parse_delta
from server.backbone import Backbone
from training.data import LABEL_COLUMNS, PAIR_COLUMNS, TEXT_COLUMNS, Encoded, batches, collate, pick_column, read_table
from training.methods import Method, TaskInfo
from training.model import DeltaModel

SCALE = 20.0  # MultipleNegativesRankingLoss's default: cosine similarities times 20 are the logits


@dataclass(frozen=True)
class Pair:
    """Two texts; `match` is the label read as "they mean the same" (None: the file has no labels)."""

    text: str
    pair: str
    match: bool | None = None


# ---------------------------------------------------------------------------- data


def read_pairs(path: str | Path, text_column: str | None = None, pair_column: str | None = None,
               label_column: str | None = None, positive_label: str = "1") -> list[Pair]:
    """The text pairs of a .tsv/.csv/.jsonl file; labels read when a label column is named or found."""
    path = Path(path)
    header, rows = read_table(path)
    text_key = pick_column(header, text_column, TEXT_COLUMNS, "text", path)
    pair_key = pick_column(header, pair_column, PAIR_COLUMNS, "pair", path)
    label_key = pick_column(header, label_column, LABEL_COLUMNS, "label", path, required=False)
    if label_key is not None:
        seen = {str(row[label_key]) for row in rows}
        if rows and positive_label not in seen:
            raise ValueError(f"{path}: no row has the matching label {positive_label!r} in column {label_key!r} "
                             f"(labels seen: {sorted(seen)[:10]}); pass --positive-label")
    return [Pair(str(row[text_key]), str(row[pair_key]),
                 None if label_key is None else str(row[label_key]) == positive_label) for row in rows]


def matching(pairs: Sequence[Pair]) -> list[Pair]:
    """The pairs that mean the same: all of them when unlabelled."""
    return [p for p in pairs if p.match is not False]


def pair_batches(pairs: Sequence[Pair], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of pair indices in which no text occurs twice (either side).

    A pair that would repeat a text of the batch waits for a later batch; a pair alone in its
    batch has no negatives and is dropped from this epoch.
    """
    pending = list(range(len(pairs)))
    rng.shuffle(pending)
    out: list[list[int]] = []
    while pending:
        batch: list[int] = []
        seen: set[str] = set()
        later: list[int] = []
        for index in pending:
            texts = {pairs[index].text, pairs[index].pair}
            if len(batch) < batch_size and not texts & seen:
                batch.append(index)
                seen |= texts
            else:
                later.append(index)
        if len(batch) > 1:
            out.append(batch)
        pending = later
    return out


def encode_texts(texts: Sequence[str], backbone: Backbone, max_length: int) -> list[Encoded]:
    """Each text tokenised alone (an embedding reads one text), special-token marks for PASTA."""
    enc = backbone.tokenizer(list(texts), truncation=True, max_length=max_length, return_special_tokens_mask=True)
    types = enc.get("token_type_ids") if backbone.uses_token_types else None
    return [Encoded(list(enc["input_ids"][i]), list(types[i]) if types is not None else None, 0,
                    special_tokens_mask=list(enc["special_tokens_mask"][i])) for i in range(len(texts))]


class TextIndex:
    """The distinct texts of some pairs, tokenised once; `id[text]` is its row in `encoded`."""

    def __init__(self, pairs: Sequence[Pair], backbone: Backbone, max_length: int) -> None:
        texts = list(dict.fromkeys(t for p in pairs for t in (p.text, p.pair)))
        self.id = {text: i for i, text in enumerate(texts)}
        self.encoded = encode_texts(texts, backbone, max_length)


# ---------------------------------------------------------------------------- loss and metrics


def ranking_loss(anchors: torch.Tensor, positives: torch.Tensor, scale: float = SCALE) -> torch.Tensor:
    """MultipleNegativesRankingLoss: cross-entropy of scale·cos(anchor_i, positive_j) with target j = i."""
    scores = F.normalize(anchors.float(), dim=-1) @ F.normalize(positives.float(), dim=-1).T * scale
    return F.cross_entropy(scores, torch.arange(len(anchors), device=scores.device))


def retrieval_metrics(queries: torch.Tensor, corpus: torch.Tensor, gold: Sequence[int]) -> dict[str, float]:
    """recall@1 and MRR of each query's `gold` row of `corpus` under cosine similarity.

    A query's rank is the number of corpus rows scoring at least its gold row's score: ties count
    against it.
    """
    sims = F.normalize(queries.float(), dim=-1) @ F.normalize(corpus.float(), dim=-1).T
    rows = torch.arange(len(gold))
    target = sims[rows, torch.as_tensor(list(gold), dtype=torch.long)]
    ranks = (sims >= target.unsqueeze(1)).sum(dim=1).float()
    return {"recall_at_1": float((ranks == 1).float().mean()), "mrr": float((1.0 / ranks).mean())}


def best_threshold_f1(scores: Sequence[float], matches: Sequence[bool]) -> tuple[float, float]:
    """(F1, threshold): the best F1 of predicting "match" for score ≥ threshold, over every threshold.

    The threshold is halfway between the lowest score called a match and the next lower score
    (the lowest score itself when every pair is called a match).
    """
    ranked = sorted(zip(scores, matches, strict=True), key=lambda item: -item[0])
    positives = sum(matches)
    best_f1, best_threshold = 0.0, ranked[0][0] if ranked else 0.0
    true_positives = 0
    for i, (score, match) in enumerate(ranked):
        true_positives += match
        if i + 1 < len(ranked) and ranked[i + 1][0] == score:
            continue  # equal scores fall on the same side of any threshold
        predicted = i + 1
        f1 = 2 * true_positives / (predicted + positives) if true_positives else 0.0
        if f1 > best_f1:
            lower = ranked[i + 1][0] if i + 1 < len(ranked) else score
            best_f1, best_threshold = f1, (score + lower) / 2
    return best_f1, best_threshold


@torch.no_grad()
def embed(model: DeltaModel, encoded: Sequence[Encoded], batch_size: int,
          autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """[n, D] float32 vectors of `encoded`, in its order, as the delta serves them."""
    model.eval()
    out: torch.Tensor | None = None
    for group, batch in batches(encoded, batch_size, model.backbone.pad_id, shuffle=False):
        with autocast or contextlib.nullcontext():
            vectors = model.run(batch).float().cpu()
        if out is None:
            out = torch.empty(len(encoded), vectors.shape[1])
        out[group] = vectors
    assert out is not None, "nothing to embed"
    return out


def evaluate_pairs(model: DeltaModel, pairs: Sequence[Pair], index: TextIndex, batch_size: int,
                   autocast: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
    """eval_recall_at_1 and eval_mrr over the matching pairs; eval_f1 (best threshold) where both kinds."""
    vectors = embed(model, index.encoded, batch_size * 2, autocast)
    positives = matching(pairs)
    corpus_texts = list(dict.fromkeys(p.pair for p in positives))
    corpus_row = {text: i for i, text in enumerate(corpus_texts)}
    queries = vectors[[index.id[p.text] for p in positives]]
    corpus = vectors[[index.id[t] for t in corpus_texts]]
    metrics = retrieval_metrics(queries, corpus, [corpus_row[p.pair] for p in positives])
    out = {"eval_recall_at_1": metrics["recall_at_1"], "eval_mrr": metrics["mrr"],
           "eval_queries": len(positives), "eval_corpus": len(corpus_texts)}
    if any(p.match is False for p in pairs) and positives:
        cosines = (F.normalize(vectors[[index.id[p.text] for p in pairs]], dim=-1)
                   * F.normalize(vectors[[index.id[p.pair] for p in pairs]], dim=-1)).sum(-1)
        f1, threshold = best_threshold_f1(cosines.tolist(), [bool(p.match) for p in pairs])
        out.update({"eval_f1": f1, "eval_f1_threshold": threshold})
    return out


# ---------------------------------------------------------------------------- training


def load_pair_data(settings) -> tuple[list[Pair], list[Pair], list[Pair], str]:
    """(train, validation, evaluation) pairs and where validation came from.

    Training and validation keep the matching pairs only; evaluation keeps every pair (the
    non-matching ones score F1). A carved validation split takes no pair whose texts are in
    `--eval` and leaves training with no pair it holds.
    """
    from training.data import split_validation
    from training.trainer import subsample

    read = {"text_column": settings.text_column, "pair_column": settings.text_pair_column,
            "label_column": settings.label_column, "positive_label": settings.positive_label}
    pool = subsample(matching(read_pairs(settings.train, **read)), settings.max_train_examples, settings.seed)
    evaluation = subsample(read_pairs(settings.eval, **read), settings.max_eval_examples, settings.seed)
    if settings.val:
        val = matching(read_pairs(settings.val, **read))
        held = {(p.text, p.pair) for p in val}
        train = [p for p in pool if (p.text, p.pair) not in held]
        source = f"--val file {settings.val} ({len(val)} matching pairs)"
    else:
        train, val = split_validation(pool, fraction=settings.val_fraction, limit=settings.max_val_examples,
                                      seed=settings.seed, exclude=evaluation)  # type: ignore[arg-type]
        source = (f"{len(val)} matching pairs carved from the training file (seed {settings.seed}, "
                  f"{settings.val_fraction:.0%} capped at {settings.max_val_examples}), disjoint from training "
                  f"and from --eval")
    if len(train) < 2 or len(val) < 2:
        raise ValueError(f"{settings.train}: too few matching pairs to train and validate ({len(train)} train, "
                         f"{len(val)} validation; an in-batch loss needs 2 or more)")
    if not matching(evaluation):
        raise ValueError(f"{settings.eval}: no matching pair to evaluate retrieval on")
    return train, val, evaluation, source


def embedding_optimizer(model: DeltaModel, method: Method, settings, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """AdamW: the method's parameters at its rate, a projection head (if any) at the head rate."""
    lr = settings.lr if settings.lr is not None else method.recipe.lr
    head_lr = settings.head_lr if settings.head_lr is not None else (method.recipe.head_lr or lr)
    head = [p for p in model.projection.parameters() if p.requires_grad] if model.projection is not None else []
    head_ids = {id(p) for p in head}
    body = [p for p in model.trainable_parameters() if id(p) not in head_ids]
    return torch.optim.AdamW([{"name": "body", "params": body, "lr": lr * lr_scale},
                              {"name": "head", "params": head, "lr": head_lr * lr_scale}], weight_decay=0.0)


def batch_loss(model: DeltaModel, pairs: Sequence[Pair], group: Sequence[int], index: TextIndex,
               autocast: contextlib.AbstractContextManager) -> torch.Tensor:
    """The ranking loss of one batch of pairs: both sides in one forward pass, split after."""
    items = [index.encoded[index.id[pairs[i].text]] for i in group] + \
            [index.encoded[index.id[pairs[i].pair]] for i in group]
    with autocast:
        vectors = model.run(collate(items, model.backbone.pad_id))
    return ranking_loss(vectors[: len(group)], vectors[len(group):])


def train_embedding(settings, method: Method, backbone: Backbone | None = None, progress: bool = True):
    """`train()` for `task_type` embedding: same settings, same report keys where they apply."""
    from training.trainer import PhaseBudget, TrainResult, _restore, autocast_for, run_details, write_outputs

    random.seed(settings.seed)
    run_started = time.perf_counter()
    backbone = backbone or Backbone.load(settings.backbone, device=settings.device, dtype=torch.float32,
                                         max_length=settings.max_length)
    # One thread unless told: on shared cores more threads are often slower (oversubscription).
    if backbone.device.type == "cpu":
        torch.set_num_threads(settings.threads or 1)
    train_pairs, val_pairs, eval_pairs, val_source = load_pair_data(settings)
    index = TextIndex([*train_pairs, *val_pairs, *eval_pairs], backbone, settings.max_length)
    autocast, precision = autocast_for(backbone.device, settings.precision)

    torch.manual_seed(settings.seed)
    model = DeltaModel(backbone, "embedding", 0)
    tick = time.perf_counter()
    bare = None
    if settings.baseline:  # before any part exists: the bare backbone
        bare = {k.replace("eval_", ""): v for k, v in
                evaluate_pairs(model, eval_pairs, index, settings.batch_size, autocast).items()}
    bare_seconds = time.perf_counter() - tick
    method.setup(model, TaskInfo("embedding", 0, False))

    recipe = method.recipe
    budget = settings.epochs if settings.epochs is not None else recipe.epochs
    if budget < 1:
        raise ValueError(f"--epochs must be at least 1, got {budget}")
    phases = method.phases(budget)
    stop_drop = settings.stop_drop if settings.stop_drop is not None else recipe.stop_drop
    warmup_ratio = settings.warmup_ratio if settings.warmup_ratio is not None else recipe.warmup_ratio
    rng = random.Random(settings.seed)
    steps_per_epoch = len(pair_batches(train_pairs, settings.batch_size, random.Random(settings.seed)))
    meta = DeltaMeta(method=method.name, task_type="embedding", labels=(),
                     backbone_fingerprint=backbone.fingerprint, max_length=settings.max_length,
                     description=settings.description, pooling=model.pooling, normalize=True)
    history: list[dict] = []
    stopped: list[str] = []
    best: dict | None = None
    steps = epoch = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    for phase_index, phase in enumerate(phases):
        if phase_index > 0:
            assert best is not None
            _restore(model, best["state"])
            method.before_phase(model, phase_index)
        optimizer = embedding_optimizer(model, method, settings, phase.lr_scale)
        phase_budget = PhaseBudget(optimizer, phase, steps_per_epoch, warmup_ratio, recipe.select_from, stop_drop,
                                   len(val_pairs), "MRR")
        scheduler = phase_budget.scheduler
        for phase_epoch in range(1, phase.epochs + 1):
            epoch += 1
            model.train()
            groups = pair_batches(train_pairs, settings.batch_size, rng)
            running = 0.0
            bar = tqdm(groups, desc=f"{phase.name} {phase_epoch}/{phase.epochs}", disable=not progress,
                       mininterval=2)
            for step, group in enumerate(bar, 1):
                loss = batch_loss(model, train_pairs, group, index, autocast)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
                bar.set_postfix(loss=f"{running:.4f}")
            steps += len(groups)
            val = {k.replace("eval_", "val_"): v for k, v in
                   evaluate_pairs(model, val_pairs, index, settings.batch_size, autocast).items()}
            history.append({"epoch": epoch, "phase": phase.name, "steps": steps, "train_loss": running,
                            "lr_factor": phase_budget.lr_factor(), **val,
                            "seconds": round(time.perf_counter() - started, 1)})
            if progress:
                tqdm.write(f"epoch {epoch} ({phase.name}): val_mrr={val['val_mrr']:.4f}, "
                           f"val_recall_at_1={val['val_recall_at_1']:.4f}")
            reason = phase_budget.observe(model, epoch, phase_epoch, val["val_mrr"], val)
            if reason:
                stopped.append(reason)
                break
        else:
            stopped.append(phase_budget.finished())
        best = phase_budget.best
    train_seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    assert best is not None
    _restore(model, best["state"])
    delta_bytes = model.export(meta).to_bytes() if method.exports else None
    if delta_bytes is not None:
        parse_delta(delta_bytes, backbone.spec())  # never hand out a file the server would refuse
    tick = time.perf_counter()
    metrics = evaluate_pairs(model, eval_pairs, index, settings.batch_size, autocast)
    report = {
        **metrics,
        **best["val"],
        "backbone_eval": bare,
        "backbone_eval_seconds": round(bare_seconds, 1) if bare is not None else None,
        "loss": f"in-batch negatives ranking (MultipleNegativesRankingLoss), cosine x {SCALE:g}",
        "best_epoch": best["epoch"],
        "epochs": epoch,
        "steps": steps,
        "selection": "best epoch of the last phase's annealed part by validation MRR; --eval is only reported",
        "validation": val_source,
        "budget": f"{budget} epoch(s), annealed to 0; early stop on a validation drop over {stop_drop:g} standard "
                  "errors" if stop_drop > 0 else f"{budget} epoch(s), annealed to 0; no early stop",
        "stopped": stopped,
        "method": method.name,
        "task_type": "embedding",
        "pooling": model.pooling,
        "trainable_params": sum(p.numel() for p in model.trainable_parameters()),
        "delta_bytes": len(delta_bytes) if delta_bytes is not None else None,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "eval_seconds": round(time.perf_counter() - tick, 1),
        "wall_seconds": round(time.perf_counter() - run_started, 1),
        "train_examples": len(train_pairs),
        "val_examples": len(val_pairs),
        "eval_examples": len(eval_pairs),
        **run_details(backbone, model, method, settings, precision, history),
    }
    write_outputs(report, delta_bytes, settings)
    return TrainResult(report, delta_bytes, model)


# ---------------------------------------------------------------------------- the RESULTS.md table

ORDER = ("finetune", "mask", "lora", "dsee", "pasta")


def results_table(reports: Sequence[dict]) -> str:
    """RESULTS.md's table of embedding reports: the bare backbone (from a report that scored it), then one
    row each."""
    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.2f}"

    lines = ["| model | recall@1 | MRR | best-threshold F1 | val MRR (selects) | trainable params | delta bytes "
             "| epochs | train s (wall) | train s (CPU) |", "|---|---|---|---|---|---|---|---|---|---|"]
    bare = next((r["backbone_eval"] for r in reports if r.get("backbone_eval")), None)
    if bare is None:
        raise ValueError("no report scored the bare backbone (all ran with --no-baseline)")
    lines.append(f"| bare backbone | {pct(bare['recall_at_1'])} | {pct(bare['mrr'])} | {pct(bare.get('f1'))} "
                 "| – | 0 | 0 | – | – | – |")
    for rep in sorted(reports, key=lambda r: ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER)):
        size = f"{rep['delta_bytes']:,}" if rep.get("delta_bytes") else "– (no delta)"
        lines.append(" | ".join([
            f"| {rep['method']}", pct(rep["eval_recall_at_1"]), pct(rep["eval_mrr"]), pct(rep.get("eval_f1")),
            pct(rep["val_mrr"]), f"{rep['trainable_params']:,}", size, str(rep["epochs"]),
            f"{rep['train_seconds']:.0f}", f"{rep['train_cpu_seconds']:.0f} |"]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m training.embedding REPORT.json ...`: print the results table of embedding reports."""
    import sys

    paths = list(argv if argv is not None else sys.argv[1:])
    if not paths:
        print("usage: python -m training.embedding REPORT.json ...", file=sys.stderr)
        return 2
    print(results_table([json.loads(Path(p).read_text()) for p in paths]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
