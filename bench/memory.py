"""Memory: what n tasks cost resident with one shared backbone, against n full fine-tuned copies.

Computed figures come from measured per-task sizes (`PreparedDelta.nbytes`, the delta file's
bytes, the head's bytes) and the backbone's parameter bytes. The process-RSS check prepares
the same delta file `count` times (each a separate `PreparedDelta` with its own tensors) in a
fresh subprocess and reads VmRSS before and after, per method, and deep-copies the model a few
times for the full-copy side; it confirms (or not) the computed per-task figure.

    python -m bench.memory --method mask --rss 100      # the subprocess side; prints JSON
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.workload import METHODS, make_method_delta

ROOT = Path(__file__).resolve().parents[1]
TASK_COUNTS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


@dataclass
class MethodSize:
    method: str
    file_bytes: int
    resident_bytes: int
    head_bytes: int
    rss_per_task: float | None = None


def sizes(delta_bytes: dict[str, bytes], resident: dict[str, int], head: dict[str, int]) -> list[MethodSize]:
    return [MethodSize(m, len(delta_bytes[m]), resident[m], head[m]) for m in delta_bytes]


def serving_bytes(backbone_bytes: int, per_task: float, n: int) -> float:
    return backbone_bytes + n * per_task


def copies_bytes(backbone_bytes: int, head_bytes: int, n: int) -> float:
    return n * (backbone_bytes + head_bytes)


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _trim() -> None:
    """Collect garbage and hand freed heap back to the OS, so RSS growth is what is kept."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_rss(method: str, count: int, copies: int = 4) -> dict[str, float]:
    """RSS growth per prepared delta of `method` (or per full model copy for "full-copy"), in this process."""
    from server.backbone import Backbone
    from server.delta import prepare_delta

    backbone = Backbone.load()
    result: dict[str, float] = {}
    if method != "full-copy":
        data = make_method_delta(backbone, method, seed=0).to_bytes()
        prepare_delta(data, backbone, "warm", 1)
        _trim()
        before = rss()
        kept = [prepare_delta(data, backbone, f"{method}-{i}", 1) for i in range(count)]
        _trim()
        result[method] = (rss() - before) / count
        result[f"{method}/nbytes"] = kept[0].nbytes
        return result
    _trim()
    before = rss()
    models = [copy.deepcopy(backbone.model) for _ in range(copies)]
    _trim()
    result["full-copy"] = (rss() - before) / len(models)
    result["full-copy/nbytes"] = backbone.parameter_bytes
    return result


def rss_in_subprocess(method: str, count: int) -> dict[str, float]:
    """`measure_rss` in a fresh process, so no other method's freed heap is reused."""
    out = subprocess.run([sys.executable, "-m", "bench.memory", "--method", method, "--rss", str(count)],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(path: Path, backbone_bytes: int, methods: list[MethodSize]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ns = list(TASK_COUNTS)
    head = max(m.head_bytes for m in methods)
    ax.plot(ns, [copies_bytes(backbone_bytes, head, n) / 2**20 for n in ns], "k--", label="full fine-tuned copies")
    for m in methods:
        ax.plot(ns, [serving_bytes(backbone_bytes, m.resident_bytes, n) / 2**20 for n in ns], marker="o",
                markersize=3, label=f"{m.method} ({m.resident_bytes / 2**10:,.0f} KiB/task)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("number of tasks")
    ax.set_ylabel("resident MiB (backbone + deltas)")
    ax.set_title("MiniLM: one backbone + deltas vs a copy per task")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rss", type=int, required=True, help="prepared deltas per method")
    parser.add_argument("--method", required=True, choices=[*METHODS, "full-copy"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(measure_rss(args.method, args.rss)))


if __name__ == "__main__":
    main()
