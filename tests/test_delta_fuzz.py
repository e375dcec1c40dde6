"""Malformed delta files derived from valid ones (Hypothesis): each refused with a 4xx naming the problem.

A corruption either leaves a file that is still a valid delta (a flipped bit inside a float may
well), which must then be accepted exactly as `parse_delta` judges it, or it is refused with 422
(409 for another backbone) and a detail that names a key; nothing is stored by a refusal, and
the server answers afterwards. Derandomized: the same files on every run.
"""

from __future__ import annotations

import struct

from delta_builders import build_delta
from http_helpers import ADMIN, served
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters_store.format import InvalidDelta, parse_delta


def corrupt(data: bytes, how: str, at: int, blob: bytes) -> bytes:
    (header_len,) = struct.unpack("<Q", data[:8])
    header_end = 8 + header_len
    if how == "truncate":
        return data[: at % len(data)]
    if how == "flip":  # one byte anywhere
        i = at % len(data)
        return data[:i] + bytes([data[i] ^ (blob[0] if blob else 0xFF) or 1]) + data[i + 1:]
    if how == "flip-header":  # one byte of the JSON header
        i = 8 + at % header_len
        return data[:i] + bytes([data[i] ^ (blob[0] if blob else 0x20) or 1]) + data[i + 1:]
    if how == "header-length":
        return struct.pack("<Q", at) + data[8:]
    if how == "splice-header":  # bytes pasted into the header, its length fixed up
        i = 8 + at % header_len
        header = data[8:i] + blob + data[i:header_end]
        return struct.pack("<Q", len(header)) + header + data[header_end:]
    if how == "append":
        return data + blob
    raise ValueError(how)


CORRUPTIONS = st.tuples(
    st.sampled_from(["truncate", "flip", "flip-header", "header-length", "splice-header", "append"]),
    st.integers(min_value=0, max_value=2**40),
    st.binary(min_size=1, max_size=24) | st.sampled_from([b'"', b"{", b"}", b"[[[[", b'"x":', b"\xff\xfe", b","]),
)


def test_corrupted_deltas_are_refused_naming_the_problem(tiny_backbone, tmp_path):
    valid = build_delta(tiny_backbone, parts=("lora", "sparse", "keep", "head_keep", "pasta"))
    spec = tiny_backbone.spec()
    with served(tiny_backbone, tmp_path) as client:
        assert client.put("/tasks/kept", content=valid, headers=ADMIN).status_code == 201
        seen = {"accepted": 0, "refused": 0}

        @settings(max_examples=60, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(CORRUPTIONS)
        def check(corruption):
            data = corrupt(valid, *corruption)
            before = sorted(p.name for p in tmp_path.rglob("*"))
            manifest = (tmp_path / "manifest.json").read_bytes()
            response = client.put("/tasks/fuzzed", content=data, headers=ADMIN)
            try:
                parse_delta(data, spec)
                judged_valid = True
            except InvalidDelta:
                judged_valid = False
            if response.status_code in (200, 201):
                assert judged_valid, corruption
                seen["accepted"] += 1
                assert client.delete("/tasks/fuzzed", headers=ADMIN).status_code == 204
                return
            seen["refused"] += 1
            assert response.status_code in (409, 422), (corruption, response.status_code, response.text)
            assert not judged_valid
            detail = response.json()["detail"]
            assert isinstance(detail, str) and ":" in detail, detail  # "<key>: <problem>"
            assert sorted(p.name for p in tmp_path.rglob("*")) == before
            assert (tmp_path / "manifest.json").read_bytes() == manifest

        check()
        assert seen["refused"] > 30, seen  # the corruptions mostly break the file
        assert client.post("/tasks/kept/predict", json={"inputs": "still serving"}).status_code == 200
        assert [t["name"] for t in client.get("/tasks").json()["tasks"]] == ["kept"]
