"""The import table of RESULTS.md: MiniLMs fine-tuned with plain transformers, imported at several budgets.

    python -m bench.import_finetuned finetune --task {sst2,mrpc,conll} --data DATA --out-dir /tmp/import-bench
    python -m bench.import_finetuned measure --task {sst2,mrpc,conll} --data DATA --out-dir /tmp/import-bench
    python -m bench.import_finetuned lora --json results/import/merged-lora.json
    python -m bench.import_finetuned table

`finetune` trains `…ForSequenceClassification` (SST-2, MRPC pairs) or `…ForTokenClassification`
(CoNLL-2003) on the packaged MiniLM with nothing but transformers and torch (every weight,
embeddings and LayerNorms included: what a user brings), on a seeded subset of the training set
(`--train-rows`, 2,000 by default: small enough for a shared CPU), and saves it with
`save_pretrained`, with 256 further training texts as its calibration file. `measure` scores that
checkpoint on the dev set with transformers (accuracy; MRPC also F1; CoNLL entity F1, a word's
label from its first sub-token), imports it at each budget, serves each delta with the engine on
dev, and records score, label agreement (per text; per word for CoNLL), bytes, import wall/CPU time,
what was carried and the representation of every module. `lora` exports a trained LoRA delta (a
merged LoRA: W + B·A in float32), imports it back, and records how exactly it returns and at what
bytes against the LoRA's own. `table` renders RESULTS.md's tables from the JSON files.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from server.backbone import Backbone, EncodedText, packaged_model_path
from training.data import Example, batches, encode, read_examples
from training.finetuned_import import engine_logits, import_finetuned, read_calibration, transformers_logits
from training.metrics import accuracy, binary_f1, entity_f1


@dataclass(frozen=True)
class BenchTask:
    """One data set of the table: where it lives, what model class it needs, its metric."""

    name: str
    task_type: str
    train: str
    dev: str
    labels: tuple[str, ...]  # names in class-id order (the files' own label strings)
    max_length: int


TASKS = {
    "sst2": BenchTask("sst2", "sequence-classification", "sst2/train.tsv", "sst2/dev.tsv", ("0", "1"), 64),
    "mrpc": BenchTask("mrpc", "sequence-classification", "mrpc/train.tsv", "mrpc/dev.tsv", ("0", "1"), 128),
    "conll": BenchTask("conll", "token-classification", "conll2003/train.txt", "conll2003/dev.txt",
                       ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"), 64),
}
CARRIED_NAMES = {"biases": "biases", "layer_norms": "LayerNorms", "position_embeddings": "positions + token types"}
LABEL_NAMES = {"sst2": ("negative", "positive"), "mrpc": ("not_equivalent", "equivalent")}


def _examples(data: Path, task: BenchTask, split: str) -> list[Example]:
    return read_examples(data / (task.train if split == "train" else task.dev), task.task_type)


def _checkpoint(out_dir: Path, task: BenchTask) -> Path:
    return out_dir / f"{task.name}-finetuned"


def _calibration_text(example: Example) -> str:
    """One line of a calibration file: a text, a tab-separated pair, or a token task's words joined."""
    if isinstance(example.text, tuple):
        return " ".join(example.text)
    return f"{example.text}\t{example.pair}" if example.pair is not None else example.text


def finetune(data: Path, out_dir: Path, task: BenchTask, train_rows: int, epochs: int, seed: int,
             lr: float) -> None:
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    torch.manual_seed(seed)
    rows = _examples(data, task, "train")
    random.Random(seed).shuffle(rows)
    train = rows[:train_rows]
    backbone = Backbone.load(device="cpu")
    encoded = encode(train, backbone, task.labels, task.task_type, task.max_length)
    names = LABEL_NAMES.get(task.name, task.labels)
    auto = (AutoModelForTokenClassification if task.task_type == "token-classification"
            else AutoModelForSequenceClassification)
    model = auto.from_pretrained(packaged_model_path(), num_labels=len(names), id2label=dict(enumerate(names)),
                                 label2id={n: i for i, n in enumerate(names)})
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(train) + 31) // 32)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: max(0.0, 1 - step / steps))
    started = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        for _, batch in batches(encoded, 32, backbone.pad_id, shuffle=True, rng=random.Random(seed + epoch)):
            batch.pop("special_tokens_mask", None)
            loss = model(**batch).loss
            loss.backward()
            optimiser.step()
            schedule.step()
            optimiser.zero_grad()
        print(f"epoch {epoch + 1}: loss {float(loss):.3f}, {time.perf_counter() - started:.0f} s", flush=True)
    folder = _checkpoint(out_dir, task)
    model.eval().save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps(
        {"task": task.name, "train_rows": train_rows, "epochs": epochs, "seed": seed, "lr": lr,
         "max_length": task.max_length, "seconds": time.perf_counter() - started}))
    calibration = [_calibration_text(e) for e in rows[train_rows:train_rows + 256]]
    (out_dir / f"{task.name}-calibration.txt").write_text("\n".join(calibration) + "\n")


def _dev_inputs(backbone: Backbone, task: BenchTask, examples: list[Example]) -> list[EncodedText]:
    """The dev set tokenised as the server tokenises it; a token task's words split as the data splits them."""
    if task.task_type != "token-classification":
        return backbone.encode([(e.text, e.pair) if e.pair is not None else e.text for e in examples])  # type: ignore[misc]
    encoded = []
    for e in examples:
        enc = backbone.tokenizer(list(e.text), is_split_into_words=True, truncation=True,
                                 max_length=backbone.max_length, return_special_tokens_mask=True)
        n = len(enc["input_ids"])
        types = enc.get("token_type_ids") if backbone.uses_token_types else None
        encoded.append(EncodedText(list(enc["input_ids"]), list(types) if types is not None else None,
                                   [(0, 0)] * n, list(enc.word_ids()), list(enc.sequence_ids()),
                                   list(enc["special_tokens_mask"])))
    return encoded


def _word_labels(logits: torch.Tensor, text: EncodedText, words: int) -> list[int]:
    """Each word's class from its first sub-token (-1 where truncation dropped the word)."""
    labels = [-1] * words
    for position, word in enumerate(text.word_ids):
        if word is not None and labels[word] == -1:
            labels[word] = int(logits[position].argmax())
    return labels


def _score(task: BenchTask, examples: list[Example], texts: list[EncodedText], logits: list[torch.Tensor]
           ) -> tuple[dict[str, float], list]:
    """The task's dev metrics, and each answer's labels (for agreement)."""
    if task.task_type == "token-classification":
        predicted = [_word_labels(row, text, len(e.text)) for row, text, e in zip(logits, texts, examples, strict=True)]
        names = [[task.labels[i] if i >= 0 else "O" for i in words] for words in predicted]
        f1 = entity_f1([list(e.label) for e in examples], names)["f1"]  # type: ignore[arg-type]
        return {"entity_f1": f1}, predicted
    predicted = [int(row.argmax()) for row in logits]
    gold = [task.labels.index(str(e.label)) for e in examples]
    metrics = {"accuracy": accuracy(gold, predicted)}
    if task.name == "mrpc":
        metrics["f1"] = binary_f1(gold, predicted)
    return metrics, predicted


def _agreement(a: list, b: list) -> float:
    if a and isinstance(a[0], list):  # per word
        pairs = [(x, y) for words_a, words_b in zip(a, b, strict=True) for x, y in zip(words_a, words_b, strict=True)]
    else:
        pairs = list(zip(a, b, strict=True))
    return sum(x == y for x, y in pairs) / len(pairs)


def measure(data: Path, out_dir: Path, task: BenchTask, budgets: list[int], json_path: Path,
            dev_rows: int | None = None) -> None:
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    checkpoint = _checkpoint(out_dir, task)
    dev = _examples(data, task, "dev")[:dev_rows]  # the first rows when asked (file order: no choosing)
    calibration = read_calibration(out_dir / f"{task.name}-calibration.txt")
    backbone = Backbone.load(device="cpu")
    texts = _dev_inputs(backbone, task, dev)
    auto = (AutoModelForTokenClassification if task.task_type == "token-classification"
            else AutoModelForSequenceClassification)
    original = transformers_logits(auto.from_pretrained(checkpoint).eval(), backbone, texts)
    original_metrics, original_labels = _score(task, dev, texts, original)
    metric = next(iter(original_metrics))
    checkpoint_bytes = sum(p.stat().st_size for p in checkpoint.glob("model.safetensors"))
    results = {"task": task.name, "checkpoint": json.loads((checkpoint / "training.json").read_text()),
               "checkpoint_file_bytes": checkpoint_bytes, "metric": metric, "original": original_metrics,
               "dev_rows": len(dev), "calibration_texts": len(calibration), "imports": []}
    print(f"original: {original_metrics}", flush=True)
    for budget in budgets:
        result = import_finetuned(checkpoint, Backbone.load(device="cpu"), calibration=calibration,
                                  budget_bytes=budget)
        served = engine_logits(result.data, Backbone.load(device="cpu"), texts)
        served_metrics, served_labels = _score(task, dev, texts, served)
        report = result.report()
        entry = {"budget_bytes": budget, "delta_bytes": len(result.data),
                 "fraction_of_checkpoint": len(result.data) / checkpoint_bytes,
                 "served": served_metrics, "dev_label_agreement": _agreement(original_labels, served_labels),
                 "import_seconds": report["seconds"], "import_cpu_seconds": report["cpu_seconds"],
                 "calibration_fidelity": report["fidelity"], "passed_gate": report["passed"],
                 "representations": report["representations"], "carried": report["carried"],
                 "carried_ceiling": report["carried_ceiling"], "not_carried": report["not_carried"],
                 "modules": [{k: m[k] for k in ("module", "representation", "rank", "sparse_entries", "bytes",
                                                 "relative_error")} for m in report["modules"]]}
        results["imports"].append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k not in ("modules", "not_carried")}), flush=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2))


def merged_lora(delta_path: Path, json_path: Path, out_dir: Path) -> None:
    """Export a trained LoRA delta (W + B·A folded in float32: a merged LoRA), import it back, compare."""
    from adapters_store.format import parse_delta
    from training.export import export_delta
    from training.finetuned_import import read_calibration

    backbone = Backbone.load(device="cpu")
    data = delta_path.read_bytes()
    delta = parse_delta(data, backbone.spec())
    lora_bytes = sum(p.nbytes for p in delta.low_rank.values()) + delta.head.nbytes
    folder = export_delta(delta, backbone, out_dir / f"{delta_path.stem}-merged", force=True)
    result = import_finetuned(folder, Backbone.load(device="cpu"), calibration=read_calibration(None))
    ranks = {m: p.rank for m, p in delta.low_rank.items()}
    recovered = {c.module: c.rank for c in result.choices if c.representation != "unchanged"}
    texts = backbone.encode([line for line in read_calibration(None) if isinstance(line, str)])
    before = engine_logits(data, Backbone.load(device="cpu"), texts)
    after = engine_logits(result.data, Backbone.load(device="cpu"), texts)
    diff = max(float((a.softmax(-1) - b.softmax(-1)).abs().max()) for a, b in zip(before, after, strict=True))
    out = {"delta": delta_path.name, "lora_modules": len(ranks), "lora_bytes": lora_bytes,
           "imported_bytes": len(result.data), "ranks_equal": ranks == recovered,
           "representations": result.report()["representations"],
           "max_prob_diff_vs_lora_delta": diff, "max_prob_diff_vs_merged_model": result.fidelity.max_prob_diff,
           "import_seconds": round(result.seconds, 2), "import_cpu_seconds": round(result.cpu_seconds, 2)}
    print(json.dumps(out, indent=2))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(out, indent=2))


def table(task_jsons: list[Path], lora_json: Path) -> str:
    """RESULTS.md's import tables, rendered from the JSON files (one per task, and the merged LoRA)."""
    lines = ["| task | budget | delta bytes | of the checkpoint | served dev | original | vs original "
             "| dev label agreement | calibration agreement (ceiling) | import CPU s | carried beyond ΔW | modules |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in task_jsons:
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        metric, size = results["metric"], results["checkpoint_file_bytes"]
        base = results["original"][metric]
        for entry in sorted(results["imports"], key=lambda e: -e["budget_bytes"]):
            kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(entry["representations"].items()))
            ranks = sorted(m["rank"] for m in entry["modules"])
            carried = ", ".join(CARRIED_NAMES.get(kind, kind) for kind in entry["carried"]) or "none"
            lines.append(
                f"| {results['task']} ({metric.replace('_', ' ')}) | 1/{size / entry['budget_bytes']:.0f} "
                f"| {entry['delta_bytes']:,} | 1/{1 / entry['fraction_of_checkpoint']:.1f} "
                f"| {100 * entry['served'][metric]:.2f} | {100 * base:.2f} "
                f"| {100 * (entry['served'][metric] - base):+.2f} | {100 * entry['dev_label_agreement']:.2f} "
                f"| {100 * entry['calibration_fidelity']['label_agreement']:.2f} "
                f"({100 * entry['carried_ceiling']['label_agreement']:.2f}) | {entry['import_cpu_seconds']:.0f} "
                f"| {carried} | {kinds}; ranks {ranks[0]}–{ranks[-1]} |")
    lora = json.loads(lora_json.read_text())
    lines += ["", f"Merged LoRA ({lora['delta']}, {lora['lora_modules']} modules): {lora['representations']}, "
              f"ranks equal to the LoRA's: {lora['ranks_equal']}; {lora['imported_bytes']:,} bytes against the "
              f"LoRA's {lora['lora_bytes']:,} ({lora['imported_bytes'] / lora['lora_bytes']:.2f}×); largest "
              f"probability difference {lora['max_prob_diff_vs_lora_delta']:.1e} against the LoRA delta served, "
              f"{lora['max_prob_diff_vs_merged_model']:.1e} against the merged model in transformers; import "
              f"{lora['import_seconds']:.0f} s wall, {lora['import_cpu_seconds']:.0f} s CPU."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.import_finetuned")
    parser.add_argument("step", choices=("finetune", "measure", "lora", "table"))
    parser.add_argument("--task", choices=sorted(TASKS), default="sst2")
    parser.add_argument("--dev-rows", type=int, help="score on the dev set's first N rows only (default: all)")
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/import-bench"))
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--budgets", default="9085286,5678304,3028429,1514214",
                        help="comma-separated --budget-bytes (default: 1/10, 1/16, 1/30, 1/60 of MiniLM's 90.85 MB)")
    parser.add_argument("--delta", type=Path, default=Path("demo/conll-ner.safetensors"))
    parser.add_argument("--json", type=Path, required=False)
    parser.add_argument("--data", type=Path, default=Path("data"), help="folder with sst2/train.tsv and dev.tsv")
    args = parser.parse_args()
    # One thread: on the shared 2-core machine two threads spin and cost 2.4x the CPU time of one for a
    # forward (training.finetuned_import's docstring); the import measures its CPU time the same way.
    torch.set_num_threads(1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    task = TASKS[args.task]
    if args.step == "finetune":
        finetune(args.data, args.out_dir, task, args.train_rows, args.epochs, args.seed, args.lr)
    elif args.step == "measure":
        budgets = [int(b) for b in args.budgets.split(",")]
        measure(args.data, args.out_dir, task, budgets, args.json or Path(f"results/import/{task.name}.json"),
                args.dev_rows)
    elif args.step == "table":
        print(table([Path(f"results/import/{name}.json") for name in TASKS], Path("results/import/merged-lora.json")))
    else:
        merged_lora(args.delta, args.json or Path("results/import/merged-lora.json"), args.out_dir)


if __name__ == "__main__":
    main()
