"""Command line: `deltaserve train`, `import-peft`, `import-finetuned` and `export`.

`add_parsers(subparsers)` registers them on the server's CLI; `main()` runs them alone
(`python -m training ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from server.settings import add_token_flags, client_token
from training.finetuned_import import DEFAULT_MAX_MEAN_PROB_DIFF, DEFAULT_MIN_AGREEMENT
from training.methods import add_all_arguments, make_method, registry


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a task delta (or a full fine-tune for comparison)",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--method", required=True, choices=list(registry()))
    train.add_argument("--train", required=True, help="training file: .tsv, .csv, .jsonl, or CoNLL")
    train.add_argument("--eval", required=True,
                       help="evaluation file, same format: only reported, never used to choose an epoch")
    train.add_argument("--val", help="validation file that chooses the epoch and stops training (default: a "
                       "seeded --val-fraction of the training file)")
    train.add_argument("--val-fraction", type=float, default=0.1)
    train.add_argument("--max-val-examples", type=int, default=1000, help="cap on the carved validation split")
    train.add_argument("--task-type", required=True,
                       choices=("sequence-classification", "token-classification", "embedding"),
                       help="embedding: trains on text pairs that mean the same with an in-batch-negatives "
                       "ranking loss; the label column is optional (see --positive-label)")
    train.add_argument("--text-column", help="name (or 0-based index) of the text column")
    train.add_argument("--text-pair-column", "--pair-column", dest="text_pair_column",
                       help="second text of a pair")
    train.add_argument("--label-column")
    train.add_argument("--positive-label", default="1",
                       help="embedding: the label of a matching pair; only matching pairs train, and evaluation "
                       "scores the others too (best-threshold F1)")
    train.add_argument("--no-baseline", dest="baseline", action="store_false",
                       help="embedding: do not score the bare backbone on --eval before training (the report's "
                       "backbone_eval)")
    train.add_argument("--backbone", help="backbone folder (default: the packaged MiniLM)")
    train.add_argument("--epochs", type=int, help="the budget: the learning rate decays to 0 at its end, and the "
                       "kept epoch is the best of its annealed part on validation (default: the method's recipe)")
    train.add_argument("--stop-drop", type=float, help="stop early when the validation score falls this many "
                       "standard errors under its best; 0: never (default: the method's recipe, 2)")
    train.add_argument("--lr", type=float, help="learning rate (default: the method's recipe)")
    train.add_argument("--head-lr", type=float,
                       help="classifier learning rate (default: the method's head lr, else --lr)")
    train.add_argument("--warmup-ratio", type=float, help="warm-up share of the capped steps (default: method's)")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--max-length", type=int, default=128)
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--max-train-examples", type=int, help="train on a seeded random subset of this size")
    train.add_argument("--max-eval-examples", type=int, help="evaluate on a seeded random subset")
    train.add_argument("--head-pooler", action="store_true", help="train a task pooler (head.pooler) too")
    train.add_argument("--head-fit", action=argparse.BooleanOptionalAction, default=None,
                       help="fit the classifier on the frozen features before training (default: the method's)")
    train.add_argument("--pooling", choices=("cls", "mean"),
                       help="sequence classification: what the head reads, the first token or the mean of the "
                       "tokens (default: what the backbone was trained with, from its sentence-transformers "
                       "1_Pooling/config.json; else cls)")
    train.add_argument("--word-piece", choices=("first", "last"), default="first")
    train.add_argument("--threads", type=int, help="torch CPU threads (default: the fastest of 1, 2, 4... measured)")
    train.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda when available)")
    train.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="autocast on CUDA (auto: bf16 where supported, else fp16; fp32 on CPU)")
    train.add_argument("--description", default="")
    train.add_argument("--label-names", help="comma-separated names to serve for the data's labels, in class-id "
                       "order (the data's labels sorted), e.g. negative,positive for SST-2's 0,1")
    train.add_argument("--out", help="write the best epoch's delta here (.safetensors)")
    train.add_argument("--report", help="write a JSON report here")
    add_push_flags(train)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    add_all_arguments(train)
    train.set_defaults(func=run_train)

    imp = subparsers.add_parser("import-peft", help="convert a PEFT LoRA adapter folder into a task delta")
    imp.add_argument("dir", help="folder with adapter_config.json and adapter_model.safetensors")
    imp.add_argument("--out", required=True)
    imp.add_argument("--backbone", help="backbone folder (default: the packaged MiniLM)")
    imp.add_argument("--labels", help="comma-separated label names, in class-id order")
    imp.add_argument("--task-type", choices=("sequence-classification", "token-classification"))
    imp.add_argument("--max-length", type=int)
    imp.set_defaults(func=run_import_peft)

    fin = subparsers.add_parser(
        "import-finetuned", help="compress a fine-tuned transformers classifier into a task delta",
        description="Per linear module, carry ΔW = W_ft − W by the cheapest part that fits (exact low rank, keep "
        "mask, low rank + sparse under --budget-bytes), bring the head and labels, report what the format cannot "
        "carry, and check the delta as served against the original on calibration texts: below the gate nothing "
        "is written unless --force.")
    fin.add_argument("checkpoint", help="a transformers save_pretrained folder (…ForSequenceClassification or "
                     "…ForTokenClassification) fine-tuned from the backbone")
    fin.add_argument("--out", required=True, help="the delta file to write (.safetensors)")
    fin.add_argument("--backbone", help="backbone folder (default: the packaged MiniLM)")
    fin.add_argument("--calibration", help="plain text file, one text per line (a tab separates a pair); default: "
                     "a small built-in set")
    fin.add_argument("--budget-bytes", type=int,
                     help="bytes for the whole delta (default: 1/16 of the checkpoint's weights)")
    fin.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT,
                     help="gate: least label agreement")
    fin.add_argument("--max-mean-prob-diff", type=float, default=DEFAULT_MAX_MEAN_PROB_DIFF,
                     help="gate: largest mean (over texts) of the largest class-probability difference")
    fin.add_argument("--max-length", type=int, help="max_length metadata of the delta")
    fin.add_argument("--description", default="")
    fin.add_argument("--report", help="write the full JSON report here")
    fin.add_argument("--force", action="store_true", help="write the delta even below the gate")
    add_push_flags(fin)
    fin.set_defaults(func=run_import_finetuned)

    exp = subparsers.add_parser(
        "export", help="write a delta out as a standard transformers model folder",
        description="Fold a delta into the backbone (W ⊙ K + B·A + S, pruned heads, task head, id2label, tokenizer) "
        "and save a folder that transformers.pipeline loads. PASTA and mean pooling are refused with the reason.")
    exp.add_argument("delta", help="a delta file, or a task name in --store")
    exp.add_argument("out_dir")
    exp.add_argument("--backbone", help="backbone folder (default: the packaged MiniLM)")
    exp.add_argument("--store", default=os.environ.get("DELTASERVE_STORE", "./store"),
                     help="the server's store, where a task name is looked up (env DELTASERVE_STORE)")
    exp.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    exp.set_defaults(func=run_export)


def add_push_flags(parser: argparse.ArgumentParser) -> None:
    """`--push URL` and `--name`, with `--token`/`--token-file`: upload the delta the command makes to a running
    server (`push_token` checks them)."""
    parser.add_argument("--push", metavar="URL", help="upload the delta to a running server")
    parser.add_argument("--name", help="task name for --push")
    add_token_flags(parser)


def push_token(args: argparse.Namespace) -> str | None:
    """The admin token `--push` sends (None without --push); a ValueError, with the message to show, when
    --push lacks --name or the token flags are wrong. Called before the work, not after it."""
    if not args.push:
        return None
    if not args.name:
        raise ValueError("--push needs --name")
    return client_token(args.token, args.token_file)


def run_train(args: argparse.Namespace) -> int:
    from training.trainer import TrainSettings, train

    if args.method == "finetune" and (args.out or args.push):
        print("error: finetune trains every weight (embeddings and LayerNorms too), which no task delta can "
              "hold; it only writes --report as the yardstick. Drop --out/--push.", file=sys.stderr)
        return 2
    try:  # checked before the work, not after it
        token = push_token(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = TrainSettings(
        method=args.method, task_type=args.task_type, train=args.train, eval=args.eval,
        val=args.val, val_fraction=args.val_fraction, max_val_examples=args.max_val_examples,
        stop_drop=args.stop_drop, warmup_ratio=args.warmup_ratio, head_fit=args.head_fit, pooling=args.pooling,
        device=args.device, precision=args.precision,
        text_column=args.text_column, text_pair_column=args.text_pair_column, label_column=args.label_column,
        positive_label=args.positive_label, baseline=args.baseline,
        backbone=args.backbone, epochs=args.epochs, lr=args.lr, head_lr=args.head_lr, batch_size=args.batch_size,
        max_length=args.max_length, seed=args.seed, max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples, head_pooler=args.head_pooler, word_piece=args.word_piece,
        threads=args.threads, out=args.out, report=args.report, description=args.description,
        label_names=tuple(n.strip() for n in args.label_names.split(",")) if args.label_names else None,
    )
    result = train(settings, make_method(args.method, args), progress=not args.quiet)
    summary = {k: v for k, v in result.report.items() if k not in ("history", "settings", "labels")}
    print(json.dumps(summary, indent=2))
    if args.push and result.delta_bytes is not None:
        push(args.push, args.name, result.delta_bytes, token)
    return 0


def push(url: str, name: str, data: bytes, token: str | None = None) -> None:
    import httpx

    headers = {"Content-Type": "application/octet-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    response = httpx.put(f"{url.rstrip('/')}/tasks/{name}", content=data, headers=headers, timeout=60)
    response.raise_for_status()
    print(f"pushed {len(data)} bytes to {url.rstrip('/')}/tasks/{name}: HTTP {response.status_code}")


def run_import_peft(args: argparse.Namespace) -> int:
    from adapters_store.format import parse_delta
    from server.backbone import Backbone
    from training.peft_import import import_peft
    from training.trainer import write_atomic

    backbone = Backbone.load(args.backbone, device="cpu")  # conversion only: no compute
    labels = args.labels.split(",") if args.labels else None
    delta = import_peft(args.dir, backbone, labels=labels, task_type=args.task_type, max_length=args.max_length)
    data = delta.to_bytes()
    parse_delta(data, backbone.spec())
    write_atomic(args.out, data)
    print(f"wrote {args.out}: {len(delta.low_rank)} LoRA modules, {len(data)} bytes")
    return 0


def run_import_finetuned(args: argparse.Namespace) -> int:
    from server.backbone import Backbone
    from training.finetuned_import import ImportFinetunedError, import_finetuned, read_calibration
    from training.trainer import write_atomic

    try:  # checked before the work, not after it
        token = push_token(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        texts = read_calibration(args.calibration)
        backbone = Backbone.load(args.backbone, device="cpu")
        result = import_finetuned(args.checkpoint, backbone, calibration=texts, budget_bytes=args.budget_bytes,
                                  min_agreement=args.min_agreement, max_mean_prob_diff=args.max_mean_prob_diff,
                                  max_length=args.max_length, description=args.description,
                                  log=lambda message: print(message, file=sys.stderr))
    except ImportFinetunedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = result.report()
    if args.report:
        write_atomic(args.report, json.dumps(report, indent=2).encode())
    print(json.dumps({k: v for k, v in report.items() if k != "modules"}, indent=2))
    if not result.passed and not args.force:
        print("error: below the fidelity gate, nothing written: " + "; ".join(result.reasons)
              + " (see not_carried for what the format dropped; raise --budget-bytes, or --force)", file=sys.stderr)
        return 1
    write_atomic(args.out, result.data)
    print(f"wrote {args.out}: {len(result.data)} bytes, 1/{report['compression']} of the checkpoint"
          + ("" if result.passed else " (forced below the gate)"))
    if args.push:
        push(args.push, args.name, result.data, token)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from adapters_store.format import InvalidDelta, parse_delta
    from server.backbone import Backbone
    from training.export import ExportError, export_delta

    backbone = Backbone.load(args.backbone, device="cpu")
    try:
        if Path(args.delta).is_file():
            data = Path(args.delta).read_bytes()
        else:
            from adapters_store import open_store
            from adapters_store.store import StoreError

            try:
                if not str(args.store).startswith("s3://") and not Path(args.store).is_dir():
                    raise StoreError(f"no store folder {args.store}")
                data = open_store(args.store, backbone.spec()).read_bytes(args.delta)
            except StoreError as err:
                print(f"error: {args.delta}: not a file, and not a task of the store {args.store} ({err})",
                      file=sys.stderr)
                return 2
        out = export_delta(parse_delta(data, backbone.spec()), backbone, args.out_dir, force=args.force)
    except (InvalidDelta, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if (out / "modules.json").is_file():
        print(f"wrote {out}: a sentence-transformers folder (SentenceTransformer({str(out)!r}).encode(texts))")
        return 0
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    task = "token-classification" if "ForTokenClassification" in architecture else "text-classification"
    print(f"wrote {out}: a standard transformers model folder (transformers.pipeline({task!r}, {str(out)!r}))")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
