"""`python -m bench.gpu` runs end to end: on CPU as a smoke run in Triton's interpreter, tiny model.

CI has no GPU, so the GPU suite's numbers can't be checked here; its logic can — every side
runs, grouped agrees with the per-segment engine, device bytes and ratios are reported.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench import gpu
from tests.conftest import make_tiny_model


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is for machines without a GPU")
def test_gpu_bench_smoke_run_on_cpu(tmp_path, tokenizer, capsys, monkeypatch):
    from server.backends import triton_ops

    monkeypatch.setattr(triton_ops, "_INTERPRET_TILES", {"BLOCK_N": 32, "BLOCK_K": 32})  # few programs
    folder = tmp_path / "tiny"
    make_tiny_model("bert").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    gpu.main(["--backbone", str(folder), "--allow-cpu", "--ks", "2,4", "--methods", "lora,dsee",
              "--batch", "2", "--tokens", "8", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| tiny | lora | 2 |" in out and "| tiny | dsee | 2 |" in out
    assert "k=4: skipped" in out and "| tiny | lora | 4 |" not in out  # 4 tasks cannot share 2 rows
    for line in out.splitlines():
        if line.startswith("| tiny | lora | 2 |"):
            cells = [c.strip() for c in line.split("|")]
            assert cells[4] != "–" and cells[5] != "–" and cells[6].endswith("×")  # run only: grouped, dense
            assert cells[7] != "–" and cells[8].endswith("×")  # end to end against the per-segment engine
            assert cells[9] != "–"  # PEFT's mixed batch ran for LoRA
            assert float(cells[-2]) < 1e-4  # grouped agrees with the per-segment engine
