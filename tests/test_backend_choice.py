"""Which backend serves: the Triton backend's start-up check, the fallback to the torch path, and
what /health and /memory say about it.

The check runs by default only on CUDA; here it is forced on the tiny model in Triton's
interpreter (`check=True`), which runs the very same code: the synthetic mixed batch through the
kernels and through the `cpu` backend, compared.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from adapters_store.format import MODULE_PARTS
from server.backbone import Backbone
from server.backends import selfcheck
from server.backends.choice import start_engine
from server.backends.selfcheck import BackendCheckFailed
from server.delta import prepare
from server.engine import Row
from tests.conftest import make_tiny_model
from tests.factories import make_delta
from tests.http_helpers import served


@pytest.fixture(autouse=True)
def interpreter_tiles(monkeypatch):
    """Few, big programs: the interpreter runs each in Python (as in tests/test_engine_triton.py)."""
    from server.backends import triton_ops

    if triton_ops.INTERPRET:
        monkeypatch.setattr(triton_ops, "_INTERPRET_TILES", {"BLOCK_N": 32, "BLOCK_K": 32})
        monkeypatch.setattr(triton_ops, "BLOCK_M_CHOICES", (4, 8, 16))


def _backbone(tokenizer) -> Backbone:
    return Backbone(make_tiny_model("bert"), tokenizer, "tiny", device="cuda" if torch.cuda.is_available() else "cpu",
                    dtype=torch.float32, backend="triton")


def test_triton_passes_its_start_up_check_and_keeps_serving(tokenizer, monkeypatch):
    monkeypatch.setattr(selfcheck, "TEXTS", selfcheck.TEXTS[:2])  # the interpreter is slow; both kinds of row
    backbone = _backbone(tokenizer)
    engine, choice = start_engine(backbone, "auto", check=True)
    assert choice.name == "triton" and engine.backend.name == "triton" and "passed" in choice.reason
    # The check put the torch path's modules in and took them out again: the kernels serve.
    assert all(type(module).__name__ == "TritonLinear" for module in engine.mixed.values())
    prepared = prepare(make_delta(backbone, ("low_rank",), seed=1), backbone, "t", 1)
    assert engine.forward([Row(prepared, backbone.encode(["x"])[0])])[0].shape == (2,)


def test_a_failed_check_falls_back_to_the_torch_path_or_stops_a_forced_start(tokenizer, monkeypatch):
    monkeypatch.setattr(selfcheck, "compare_with_torch_path", lambda *args: "task 0, text 1: logits differ by 3")
    backbone = _backbone(tokenizer)
    with pytest.raises(BackendCheckFailed, match="logits differ by 3"):
        start_engine(backbone, "triton", check=True)

    backbone = _backbone(tokenizer)
    engine, choice = start_engine(backbone, "auto", check=True)
    assert choice.name == "cpu" and "logits differ by 3" in choice.reason
    assert engine.backend.name == "cpu" and backbone.backend == "cpu"  # deltas get prepared for the torch path
    assert len(backbone.layers[0]._forward_pre_hooks) == 1  # the given-up engine's PASTA hook is gone
    prepared = prepare(make_delta(backbone, ("keep", "pasta"), seed=2), backbone, "t", 1)
    assert prepared.backend == "cpu"
    assert engine.forward([Row(prepared, backbone.encode(["x"])[0])])[0].shape == (2,)


def test_an_error_in_the_kernels_is_a_reason_too(tokenizer, monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(selfcheck, "compare_with_torch_path", broken)
    _, choice = start_engine(_backbone(tokenizer), "auto", check=True)
    assert choice.name == "cpu" and "no kernel image" in choice.reason


def test_health_and_memory_say_which_backend_serves(tokenizer, tmp_path):
    backbone = Backbone(make_tiny_model("bert"), tokenizer, "tiny", device="cpu", backend="cpu")
    with served(backbone, tmp_path / "store", backend="cpu") as client:
        health = client.get("/health").json()
        assert health["backend"] == "cpu" and health["backend_reason"] == "requested"
        memory = client.get("/memory", headers={"Authorization": "Bearer s3cret"}).json()
        assert memory["backend"] == "cpu"


def test_the_start_up_batch_has_every_kind_of_part_and_both_poolings(tokenizer):
    """A part the check's tasks lack is a part a broken kernel could serve wrong unnoticed."""
    tasks = selfcheck.synthetic_tasks(_backbone(tokenizer))
    kinds = {type(part).__name__ for task in tasks for part in task.parts()}
    wanted = {cls.__name__ for cls in MODULE_PARTS.values()} | {"HeadKeep", "PastaVectors", "NormDelta",
                                                                 "EmbeddingShift"}
    assert wanted <= kinds, f"missing from the start-up check: {sorted(wanted - kinds)}"
    assert {task.meta.pooling for task in tasks} == {"cls", "mean"}
