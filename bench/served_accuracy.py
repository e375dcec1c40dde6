"""A trained delta's metric measured again from outside: through a real server, over HTTP.

    python -m bench.served_accuracy runs/run2/*.json [--batch 32]

For each `deltaserve train --report` JSON that has a delta (`--out`), one real
`python -m server serve` (uvicorn subprocess, its own empty store) receives the delta with
`PUT /tasks/{name}`, then the report's `--eval` file as `POST /tasks/{name}/predict` requests, and the
metric is computed from the answers with the trainer's own metric functions. It should equal the
trainer's reported figure: the trainer and the engine compute the same formula, and the server's
tokenizer, pair handling and label names are what the trainer wrote into the delta.

CoNLL-style token tasks: each sentence is sent as its words joined by spaces; a word's label is the
label of the served word that starts where it starts (the server splits words as the tokenizer's
pre-tokenizer does, so "U.S." may come back in pieces, whose first piece carries the label of the
word's first sub-token, as in training). The one place they may differ: a sentence longer than
`max_length` tokens, which the trainer truncates (the cut words count as `O`) and the server
windows (nothing is cut).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import httpx

from bench.http import ServerProcess
from training.data import read_examples
from training.metrics import accuracy, binary_f1, entity_f1, mcc


def _sequence_scores(client: httpx.Client, name: str, report: dict, batch: int) -> dict[str, float]:
    s = report["settings"]
    examples = read_examples(s["eval"], s["task_type"], s.get("text_column"), s.get("text_pair_column"),
                             s.get("label_column"))
    served_to_class = {label: i for i, label in enumerate(report["labels"])}
    data_to_class = {label: i for i, label in enumerate(report["data_labels"])}
    gold, pred = [], []
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        inputs = [e.text if e.pair is None else [e.text, e.pair] for e in chunk]
        response = client.post(f"/tasks/{name}/predict", json={"inputs": inputs})
        response.raise_for_status()
        for example, prediction in zip(chunk, response.json()["predictions"], strict=True):
            gold.append(data_to_class[example.label])
            pred.append(served_to_class[prediction["label"]])
    out = {"eval_accuracy": accuracy(gold, pred), "eval_mcc": mcc(gold, pred, len(served_to_class))}
    if len(served_to_class) == 2:
        out["eval_f1"] = binary_f1(gold, pred, positive=1)
    return out


def _token_scores(client: httpx.Client, name: str, report: dict, batch: int) -> dict[str, float]:
    examples = read_examples(report["settings"]["eval"], "token-classification")
    gold: list[list[str]] = []
    pred: list[list[str]] = []
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        response = client.post(f"/tasks/{name}/predict", json={"inputs": [" ".join(e.text) for e in chunk]})
        response.raise_for_status()
        for example, prediction in zip(chunk, response.json()["predictions"], strict=True):
            by_start = {}
            for token in prediction["tokens"]:
                by_start.setdefault(token["start"], token["label"])
            offset, labels = 0, []
            for word in example.text:
                labels.append(by_start.get(offset, "O"))
                offset += len(word) + 1
            gold.append(list(example.label))
            pred.append(labels)
    words = [(g, p) for gs, ps in zip(gold, pred, strict=True) for g, p in zip(gs, ps, strict=True)]
    return {"eval_accuracy": sum(g == p for g, p in words) / max(len(words), 1),
            "eval_f1": entity_f1(gold, pred)["f1"]}


def measure(reports: Sequence[Path], batch: int = 32, server_args: Sequence[str] = ()) -> list[dict]:
    """Per report with a delta: the served metrics and the trainer's. `server_args` go to `serve`."""
    rows = []
    with tempfile.TemporaryDirectory() as store:
        server = ServerProcess(Path(store), threads=2, extra=list(server_args))
        try:
            with httpx.Client(base_url=server.url, timeout=600) as client:
                for path in reports:
                    report = json.loads(path.read_text())
                    delta = report["settings"].get("out")
                    if not delta:
                        continue  # full fine-tuning: nothing to serve
                    name = path.stem
                    response = client.put(f"/tasks/{name}", content=Path(delta).read_bytes(),
                                          headers={"Content-Type": "application/octet-stream"})
                    response.raise_for_status()
                    token = report["settings"]["task_type"] == "token-classification"
                    served = (_token_scores if token else _sequence_scores)(client, name, report, batch)
                    rows.append({"task": name, "served": served,
                                 "trained": {k: report[k] for k in served if k in report}})
        finally:
            server.stop()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.served_accuracy", description=__doc__.split("\n")[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--batch", type=int, default=32, help="inputs per predict request")
    parser.add_argument("--backbone", help="the backbone the deltas were trained on (default: the packaged one)")
    args = parser.parse_args(argv)
    rows = measure(args.reports, args.batch, ["--backbone", args.backbone] if args.backbone else [])
    print("| delta | metric | trainer reported | served over HTTP | difference |")
    print("|---|---|---|---|---|")
    for row in rows:
        for metric, value in row["served"].items():
            trained = row["trained"].get(metric)
            diff = "–" if trained is None else f"{100 * (value - trained):+.2f}"
            shown = "–" if trained is None else f"{100 * trained:.2f}"
            print(f"| {row['task']} | {metric.removeprefix('eval_')} | {shown} | {100 * value:.2f} | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
