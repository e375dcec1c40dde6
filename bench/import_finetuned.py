"""The import table of RESULTS.md: a MiniLM fine-tuned with plain transformers, imported at several budgets.

    python -m bench.import_finetuned finetune --data DATA --out-dir /tmp/import-bench [--train-rows 2000 --epochs 2]
    python -m bench.import_finetuned measure --data DATA --out-dir /tmp/import-bench --json results/import/sst2.json
    python -m bench.import_finetuned lora --json results/import/lora.json

`finetune` trains `BertForSequenceClassification` on the packaged MiniLM with nothing but
transformers and torch (every weight, embeddings and LayerNorms included: what a user brings), on a
seeded subset of SST-2's training set, and saves it with `save_pretrained`. `measure` scores that
checkpoint on SST-2 dev with transformers, imports it at each budget (calibration: 256 training
sentences outside the fine-tuning subset, the user's own texts), serves each delta with the engine on
dev, and records score, label agreement, bytes, import wall/CPU time and the representation of every
module. `lora` exports a trained LoRA delta (a merged LoRA: W + B·A in float32), imports it back, and
records how exactly it returns and at what bytes against the LoRA's own.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from server.backbone import Backbone, packaged_model_path
from training.data import read_examples
from training.finetuned_import import engine_logits, import_finetuned, transformers_logits


def _sst2(data: Path, split: str) -> list[tuple[str, int]]:
    """SST-2's `split` from `data`/sst2/ (GLUE's TSV: sentence, label)."""
    return [(e.text, int(e.label)) for e in read_examples(data / "sst2" / f"{split}.tsv",  # type: ignore[misc]
                                                           "sequence-classification")]


def finetune(data: Path, out_dir: Path, train_rows: int, epochs: int, seed: int, lr: float) -> None:
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(seed)
    rows = _sst2(data, "train")
    random.Random(seed).shuffle(rows)
    train = rows[:train_rows]
    source = packaged_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = BertForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(train) + 31) // 32)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: max(0.0, 1 - step / steps))
    started = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        random.Random(seed + epoch).shuffle(train)
        for start in range(0, len(train), 32):
            chunk = train[start:start + 32]
            batch = tokenizer([t for t, _ in chunk], padding=True, truncation=True, max_length=64,
                              return_tensors="pt")
            loss = model(**batch, labels=torch.tensor([y for _, y in chunk])).loss
            loss.backward()
            optimiser.step()
            schedule.step()
            optimiser.zero_grad()
        print(f"epoch {epoch + 1}: loss {float(loss):.3f}, {time.perf_counter() - started:.0f} s", flush=True)
    model.eval().save_pretrained(out_dir / "sst2-finetuned")
    tokenizer.save_pretrained(out_dir / "sst2-finetuned")
    (out_dir / "sst2-finetuned" / "training.json").write_text(json.dumps(
        {"train_rows": train_rows, "epochs": epochs, "seed": seed, "lr": lr, "max_length": 64,
         "seconds": time.perf_counter() - started}))
    calibration = [t for t, _ in rows[train_rows:train_rows + 256]]
    (out_dir / "calibration.txt").write_text("\n".join(calibration) + "\n")


def _accuracy(logits: list[torch.Tensor], labels: list[int]) -> float:
    return sum(int(row.argmax()) == y for row, y in zip(logits, labels, strict=True)) / len(labels)


def measure(data: Path, out_dir: Path, budgets: list[int], json_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    checkpoint = out_dir / "sst2-finetuned"
    dev = _sst2(data, "dev")
    calibration = [line for line in (out_dir / "calibration.txt").read_text().splitlines() if line.strip()]
    backbone = Backbone.load(device="cpu")
    texts = backbone.encode([t for t, _ in dev])
    original = transformers_logits(AutoModelForSequenceClassification.from_pretrained(checkpoint).eval(),
                                   backbone, texts)
    labels = [y for _, y in dev]
    checkpoint_bytes = sum(p.stat().st_size for p in checkpoint.glob("model.safetensors"))
    results = {"checkpoint": json.loads((checkpoint / "training.json").read_text()),
               "checkpoint_file_bytes": checkpoint_bytes, "original_dev_accuracy": _accuracy(original, labels),
               "dev_rows": len(dev), "calibration_texts": len(calibration), "imports": []}
    print(f"original: {results['original_dev_accuracy']:.4f}", flush=True)
    for budget in budgets:
        result = import_finetuned(checkpoint, Backbone.load(device="cpu"), calibration=calibration,
                                  budget_bytes=budget)
        served = engine_logits(result.data, Backbone.load(device="cpu"), texts)
        agreement = sum(int(a.argmax()) == int(b.argmax()) for a, b in zip(original, served, strict=True))
        report = result.report()
        entry = {"budget_bytes": budget, "delta_bytes": len(result.data),
                 "fraction_of_checkpoint": len(result.data) / checkpoint_bytes,
                 "served_dev_accuracy": _accuracy(served, labels), "dev_label_agreement": agreement / len(dev),
                 "import_seconds": report["seconds"], "import_cpu_seconds": report["cpu_seconds"],
                 "calibration_fidelity": report["fidelity"], "passed_gate": report["passed"],
                 "representations": report["representations"], "carried_ceiling": report["carried_ceiling"],
                 "not_carried": report["not_carried"],
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


def table(sst2_json: Path, lora_json: Path) -> str:
    """RESULTS.md's import tables, rendered from the two JSON files."""
    results = json.loads(sst2_json.read_text())
    base = results["original_dev_accuracy"]
    size = results["checkpoint_file_bytes"]
    lines = ["| budget | delta bytes | of the checkpoint | served dev acc. | vs original | dev label agreement "
             "| calibration agreement (ceiling) | import wall / CPU s | modules |",
             "|---|---|---|---|---|---|---|---|---|"]
    for entry in sorted(results["imports"], key=lambda e: -e["budget_bytes"]):
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(entry["representations"].items()))
        ranks = sorted(m["rank"] for m in entry["modules"])
        lines.append(
            f"| 1/{size / entry['budget_bytes']:.0f} | {entry['delta_bytes']:,} "
            f"| 1/{1 / entry['fraction_of_checkpoint']:.1f} | {100 * entry['served_dev_accuracy']:.2f} "
            f"| {100 * (entry['served_dev_accuracy'] - base):+.2f} | {100 * entry['dev_label_agreement']:.2f} "
            f"| {100 * entry['calibration_fidelity']['label_agreement']:.2f} "
            f"({100 * entry['carried_ceiling']['label_agreement']:.2f}) | {entry['import_seconds']:.0f} / "
            f"{entry['import_cpu_seconds']:.0f} | {kinds}; ranks {ranks[0]}–{ranks[-1]} |")
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
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.step == "finetune":
        finetune(args.data, args.out_dir, args.train_rows, args.epochs, args.seed, args.lr)
    elif args.step == "measure":
        budgets = [int(b) for b in args.budgets.split(",")]
        measure(args.data, args.out_dir, budgets, args.json or Path("results/import/sst2.json"))
    elif args.step == "table":
        print(table(args.json or Path("results/import/sst2.json"), Path("results/import/merged-lora.json")))
    else:
        merged_lora(args.delta, args.json or Path("results/import/merged-lora.json"), args.out_dir)


if __name__ == "__main__":
    main()
