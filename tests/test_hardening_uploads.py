"""Regression tests of issue 24 on uploads: what a malformed delta did to the store and to every listing.

A lone surrogate in `labels` was stored although its upload answered 500, and every `GET /tasks`
answered 500 after it; dtypes the reader has no torch type for and a layer index of thousands of
digits were 500s; 150,000 tiny tensors cost seconds before their 422; a rank-20,000 LoRA was
stored, and a LoRA whose values each lay within the bound made every predict fail.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import pytest
import torch
from delta_builders import build_delta
from http_helpers import ADMIN, served

from adapters_store.format import FILE_DTYPES, InvalidDelta, max_tensor_count, parse_delta

Q = "encoder.layer.0.attention.self.query"


def store_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "deltas" in p.parts)


def with_header(data: bytes, change: Callable[[dict[str, Any]], None], extra_bytes: bytes = b"") -> bytes:
    """`data` with its safetensors header changed by `change` (JSON written ASCII: `\\ud800` as a client
    would escape it) and `extra_bytes` appended to the tensor data."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + length:] + extra_bytes


def data_end(data: bytes) -> int:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    return max(entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__")


def with_raw_tensor(data: bytes, key: str, dtype: str, shape: list[int], raw: bytes) -> bytes:
    """`data` with one more tensor of any dtype the file format names, its bytes given raw."""
    end = data_end(data)

    def add(header: dict[str, Any]) -> None:
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [end, end + len(raw)]}

    return with_header(data, add, raw)


def uploads(bb) -> list[tuple[str, bytes, str]]:
    """(case, file, what the 422 must name)."""
    good = build_delta(bb)

    def metadata(**values: str) -> Callable[[dict[str, Any]], None]:
        return lambda header: header["__metadata__"].update(values)

    def rename(old: str, new: str) -> Callable[[dict[str, Any]], None]:
        return lambda header: header.update({new: header.pop(old)})

    return [
        ("escaped surrogate label", build_delta(bb, metadata={"labels": '["\\ud800", "pos"]'}), "labels[0]"),
        ("surrogate description", with_header(good, metadata(description="fine \udfff")), "description"),
        ("surrogate metadata key", with_header(good, metadata(**{"x\ud83d": "y"})), "x\\ud83d"),
        ("surrogate tensor key", with_header(good, rename(f"{Q}.lora_A", f"{Q}\ud800.lora_A")), "\\ud800"),
        # dtypes the safetensors file format names and safetensors' torch reader cannot build (KeyError)
        ("F8_E8M0", with_raw_tensor(good, f"{Q}.keep", "F8_E8M0", [4], bytes(4)), f"{Q}.keep"),
        ("F4", with_raw_tensor(good, "layers.0.head_keep", "F4", [8], bytes(4)), "layers.0.head_keep"),
        ("F6_E2M3", with_raw_tensor(good, "pasta.vectors", "F6_E2M3", [8], bytes(6)), "pasta.vectors"),
        ("F6_E3M2", with_raw_tensor(good, "head.pooler.bias", "F6_E3M2", [8], bytes(6)), "head.pooler.bias"),
        ("F64", with_raw_tensor(good, f"{Q}.sparse_value", "F64", [1], bytes(8)), f"{Q}.sparse_value"),
        ("bias delta of the wrong length", build_delta(bb, extra={f"{Q}.bias_delta": torch.zeros(31)}),
         f"{Q}.bias_delta"),
        ("bias delta NaN", build_delta(bb, extra={f"{Q}.bias_delta": torch.full((32,), float("nan"))}),
         f"{Q}.bias_delta"),
        ("bias delta F64", with_raw_tensor(good, f"{Q}.bias_delta", "F64", [32], bytes(256)), f"{Q}.bias_delta"),
        ("norm delta of the wrong width",
         build_delta(bb, extra={"encoder.layer.0.output.LayerNorm.norm_weight_delta": torch.zeros(31)}),
         "encoder.layer.0.output.LayerNorm.norm_weight_delta"),
        ("position shift past the backbone's positions",
         build_delta(bb, extra={"embeddings.position_delta": torch.zeros(bb.max_positions + 1, bb.hidden_size)}),
         "embeddings.position_delta"),
        ("huge layer index", with_raw_tensor(good, f"layers.{'9' * 5000}.head_keep", "U8", [4], bytes(4)),
         "layers.9999"),
    ]


def test_bad_uploads_are_422_naming_the_key_and_nothing_is_stored(tiny_backbone, tmp_path):
    with served(tiny_backbone, tmp_path) as client:
        assert client.put("/tasks/kept", content=build_delta(tiny_backbone), headers=ADMIN).status_code == 201
        before = store_files(tmp_path)
        for case, data, key in uploads(tiny_backbone):
            response = client.put("/tasks/bad", content=data, headers=ADMIN)
            assert response.status_code == 422, (case, response.text)
            assert key in response.json()["detail"], (case, response.json())
            assert store_files(tmp_path) == before, case
            listing = client.get("/tasks")
            assert listing.status_code == 200 and [t["name"] for t in listing.json()["tasks"]] == ["kept"], case
        assert client.post("/tasks/kept/predict", json={"inputs": "still serving"}).status_code == 200
    with served(tiny_backbone, tmp_path) as client:  # and after a restart
        assert [t["name"] for t in client.get("/tasks").json()["tasks"]] == ["kept"]


def test_a_key_of_thousands_of_characters_is_cut_in_the_message(tiny_backbone):
    data = with_raw_tensor(build_delta(tiny_backbone), f"layers.{'9' * 5000}.head_keep", "U8", [4], bytes(4))
    with pytest.raises(InvalidDelta) as caught:
        parse_delta(data, tiny_backbone.spec())
    assert len(str(caught.value)) < 400 and "5017 characters" in str(caught.value)


def test_every_dtype_a_delta_uses_still_loads(tiny_backbone):
    delta = build_delta(tiny_backbone, parts=("keep", "lora", "sparse", "head_keep"),
                        extra={"head.classifier.bias": torch.zeros(2, dtype=torch.bfloat16),
                               "head.classifier.weight": torch.zeros(2, tiny_backbone.hidden_size,
                                                                     dtype=torch.float16)})
    parse_delta(delta, tiny_backbone.spec())
    assert set(FILE_DTYPES) == {"F32", "F16", "BF16", "U8", "I64"}


def test_more_tensors_than_any_valid_delta_is_refused_before_loading_them(tiny_backbone):
    spec = tiny_backbone.spec()
    limit = max_tensor_count(spec)
    good = build_delta(tiny_backbone)
    end = data_end(good)

    def many(header: dict[str, Any]) -> None:
        for i in range(limit + 1):
            header[f"junk.{i}"] = {"dtype": "U8", "shape": [0], "data_offsets": [end, end]}

    with pytest.raises(InvalidDelta) as caught:
        parse_delta(with_header(good, many), spec)
    assert caught.value.key == "file" and f"at most {limit}" in str(caught.value)
    # Every key the format allows, at once, fits under the count.
    assert limit >= len(spec.linear_modules) * 5 + spec.num_layers + 1 + 2


def test_lora_rank_and_product_are_bounded(tiny_backbone):
    d = tiny_backbone.hidden_size
    spec = tiny_backbone.spec()
    too_wide = build_delta(tiny_backbone, extra={f"{Q}.lora_A": torch.zeros(d + 1, d),
                                                 f"{Q}.lora_B": torch.zeros(d, d + 1)})
    with pytest.raises(InvalidDelta) as caught:
        parse_delta(too_wide, spec)
    assert caught.value.key == f"{Q}.lora_A" and "rank" in str(caught.value)
    full_rank = build_delta(tiny_backbone, extra={f"{Q}.lora_A": torch.eye(d), f"{Q}.lora_B": torch.eye(d)})
    parse_delta(full_rank, spec)  # r = min(out, in) is allowed
    # Every value within ±65504, the product B·A far beyond it: refused, as the forward would overflow.
    at_bound = build_delta(tiny_backbone, extra={f"{Q}.lora_A": torch.full((4, d), 65504.0),
                                                 f"{Q}.lora_B": torch.full((d, 4), 65504.0)})
    with pytest.raises(InvalidDelta) as caught:
        parse_delta(at_bound, spec)
    assert caught.value.key == f"{Q}.lora_B" and "B·A" in str(caught.value)


def test_a_delta_whose_forward_overflows_is_refused_before_it_is_stored(tokenizer, tmp_path):
    """Bounding each value (and B·A) keeps a float32 forward finite on a usual backbone, but not on every
    one (a float16 GPU overflows at 65504): the upload is run once on the server's own engine. Here a
    backbone whose last LayerNorm scales by 1e34 stands for it: a classifier at the bound overflows it."""
    from conftest import make_tiny_backbone

    backbone = make_tiny_backbone(tokenizer, pooler=False)
    with torch.no_grad():
        backbone.model.encoder.layer[-1].output.LayerNorm.weight.fill_(1e34)
    d = backbone.hidden_size
    with served(backbone, tmp_path) as client:
        overflowing = build_delta(backbone, extra={"head.classifier.weight": torch.full((2, d), 65504.0)})
        parse_delta(overflowing, backbone.spec())  # every rule of the format holds
        response = client.put("/tasks/big", content=overflowing, headers=ADMIN)
        assert response.status_code == 422, response.text
        assert "file" in response.json()["detail"] and "not finite" in response.json()["detail"]
        assert store_files(tmp_path) == [] and client.get("/tasks").json()["tasks"] == []
        ordinary = build_delta(backbone, extra={"head.classifier.weight": torch.full((2, d), 1e-3)})
        assert client.put("/tasks/fine", content=ordinary, headers=ADMIN).status_code == 201
        assert client.post("/tasks/fine/predict", json={"inputs": "hello"}).status_code == 200
