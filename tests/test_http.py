"""The HTTP API end to end on a tiny backbone: uploads of every kind of part, predictions equal to
the engine's own, the store routes, /memory, /backbone, /health, /metrics and /docs."""

from __future__ import annotations

import pytest
from conftest import make_tiny_backbone
from delta_builders import NER_LABELS, build_delta
from http_helpers import ADMIN, assert_close, engine_answer, matches, served

TEXTS = ["a gripping, funny and moving film", "dull.", "The plot of this film, set in Paris, never works at all."]
PAIRS = [("A man is sleeping.", "Someone rests."), ("The cat sat.", "A stock market crash in New York.")]
NER_TEXTS = ["John Smith flew from Paris to New York on Monday.", "unbelievably hyphenated-words, e.g. don't"]


@pytest.fixture
def reference(tokenizer):
    """An identical, separate backbone for the engine's own answers (the app owns its engine)."""
    return make_tiny_backbone(tokenizer)


CASES = {
    "keep": dict(parts=("keep",), method="mask"),
    "lora": dict(parts=("lora",), method="lora"),
    "sparse": dict(parts=("sparse",), method="dsee"),
    "head-keep": dict(parts=("head_keep",), method="dsee"),
    "pasta": dict(parts=("pasta",), method="pasta"),
    "pooler-head": dict(parts=(), method="full-head", pooler_head=True),
    "everything": dict(parts=("keep", "lora", "sparse", "head_keep", "pasta"), pooler_head=True, max_length=12),
    "regression": dict(parts=("lora",), labels=["similarity"], problem_type="regression"),
}


def test_every_kind_of_part_answers_as_the_engine_does(tiny_backbone, reference, tmp_path):
    deltas = {name: build_delta(reference, seed=i, **kw) for i, (name, kw) in enumerate(CASES.items())}
    deltas["pairs"] = build_delta(reference, parts=("lora", "pasta"), labels=["no", "maybe", "yes"], seed=20)
    deltas["ner"] = build_delta(reference, parts=("lora", "keep"), task_type="token-classification",
                                labels=NER_LABELS, seed=21)
    deltas["ner-last"] = build_delta(reference, parts=("sparse",), task_type="token-classification",
                                     labels=NER_LABELS, word_piece="last", seed=22)
    inputs = {name: TEXTS for name in deltas} | {"pairs": PAIRS, "ner": NER_TEXTS, "ner-last": NER_TEXTS}

    with served(tiny_backbone, tmp_path) as client:
        for name, data in deltas.items():
            response = client.put(f"/tasks/{name}", content=data, headers=ADMIN)
            assert response.status_code == 201, response.text
        for name, data in deltas.items():
            response = client.post(f"/tasks/{name}/predict", json={"inputs": [list(x) if isinstance(x, tuple) else x
                                                                              for x in inputs[name]]})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["task"] == name and body["version"] == 1
            assert_close(body["predictions"], engine_answer(reference, data, inputs[name]), where=name)
        # One text instead of a list answers a list of one prediction.
        one = client.post("/tasks/lora/predict", json={"inputs": TEXTS[0]}).json()["predictions"]
        assert_close(one, engine_answer(reference, deltas["lora"], TEXTS[:1]))


def test_prediction_shapes(tiny_backbone, tmp_path):
    with served(tiny_backbone, tmp_path) as client:
        client.put("/tasks/sst2", content=build_delta(tiny_backbone), headers=ADMIN)
        client.put("/tasks/stsb", content=build_delta(tiny_backbone, labels=["score"], problem_type="regression"),
                   headers=ADMIN)
        client.put("/tasks/ner", content=build_delta(tiny_backbone, task_type="token-classification",
                                                     labels=NER_LABELS), headers=ADMIN)
        (seq,) = client.post("/tasks/sst2/predict", json={"inputs": "good"}).json()["predictions"]
        assert set(seq) == {"label", "score", "scores", "logits"} and set(seq["scores"]) == {"negative", "positive"}
        assert seq["score"] == max(seq["scores"].values()) and abs(sum(seq["scores"].values()) - 1) < 1e-12
        (reg,) = client.post("/tasks/stsb/predict", json={"inputs": [["a", "b"]]}).json()["predictions"]
        assert set(reg) == {"value"} and isinstance(reg["value"], float)
        text = "Angela Merkel visited Washington"
        (tok,) = client.post("/tasks/ner/predict", json={"inputs": text}).json()["predictions"]
        assert [t["word"] for t in tok["tokens"]] == ["Angela", "Merkel", "visited", "Washington"]
        assert all(text[t["start"]:t["end"]] == t["word"] for t in tok["tokens"])
        assert all(text[e["start"]:e["end"]] == e["text"] for e in tok["entities"])
        # Pairs make no sense for token classification.
        bad = client.post("/tasks/ner/predict", json={"inputs": [["a", "b"]]})
        assert bad.status_code == 422 and "pairs" in bad.json()["detail"]


def test_truncation_follows_the_task_max_length(tiny_backbone, reference, tmp_path):
    """Sequence classification truncates to the task's max_length (the delta's, else the server's); token
    classification cuts a long text into windows of that length instead (tests/test_windows.py): no word lost."""
    long_text = " ".join(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"] * 40)
    short = build_delta(reference, max_length=8)
    default = build_delta(reference)
    ner = build_delta(reference, max_length=8, task_type="token-classification", labels=NER_LABELS)
    with served(tiny_backbone, tmp_path, max_length=16) as client:
        for name, data in (("short", short), ("default", default), ("ner", ner)):
            client.put(f"/tasks/{name}", content=data, headers=ADMIN)
        answers = {name: client.post(f"/tasks/{name}/predict", json={"inputs": long_text}).json()["predictions"]
                   for name in ("short", "default", "ner")}
    assert_close(answers["short"], engine_answer(reference, short, [long_text]))  # the delta's 8
    assert_close(answers["default"], engine_answer(reference, default, [long_text], 16))  # the server's 16
    assert not matches(answers["default"], engine_answer(reference, default, [long_text], 8))
    assert [t["word"] for t in answers["ner"][0]["tokens"]] == long_text.split()


def test_store_routes(tiny_backbone, tmp_path):
    with served(tiny_backbone, tmp_path) as client:
        assert client.get("/tasks").json() == {"tasks": []}
        first = build_delta(tiny_backbone, description="first try")
        created = client.put("/tasks/sst2", content=first, headers=ADMIN)
        assert created.status_code == 201
        info = created.json()
        for key in ("name", "method", "task_type", "labels", "version", "sha256", "delta_bytes", "created_at"):
            assert key in info
        assert info["delta_bytes"] == len(first) and info["description"] == "first try"

        # Multipart with a field `file` works as well as a raw body; a replace answers 200.
        replaced = client.put("/tasks/sst2", files={"file": ("d.safetensors", build_delta(tiny_backbone, seed=3))},
                              headers=ADMIN)
        assert replaced.status_code == 200 and replaced.json()["version"] == 2
        assert client.get("/tasks/sst2").json()["version"] == 2
        assert [t["name"] for t in client.get("/tasks").json()["tasks"]] == ["sst2"]
        assert client.post("/tasks/sst2/predict", json={"inputs": "x y"}).json()["version"] == 2

        assert client.delete("/tasks/sst2", headers=ADMIN).status_code == 204
        assert client.get("/tasks/sst2").status_code == 404
        assert client.post("/tasks/sst2/predict", json={"inputs": "x"}).status_code == 404
        assert client.delete("/tasks/sst2", headers=ADMIN).status_code == 404


def test_memory_backbone_health_metrics_docs(tiny_backbone, tmp_path):
    with served(tiny_backbone, tmp_path) as client:
        empty = client.get("/memory").json()
        # The spec's formulas, as they are: with no task one backbone costs more than no copy.
        assert empty["num_tasks"] == 0 and empty["saved_fraction"] == 0
        assert empty["saved_bytes"] == -tiny_backbone.parameter_bytes
        a = build_delta(tiny_backbone, parts=("lora",))
        b = build_delta(tiny_backbone, parts=(), pooler_head=True, labels=["a", "b", "c"])
        client.put("/tasks/a", content=a, headers=ADMIN)
        client.put("/tasks/b", content=b, headers=ADMIN)
        memory = client.get("/memory").json()
        backbone = tiny_backbone.parameter_bytes
        heads = (2 * 32 + 2) * 4 + (3 * 32 + 3 + 32 * 32 + 32) * 4
        assert memory["backbone_bytes"] == backbone
        assert memory["num_tasks"] == 2 and memory["delta_bytes_total"] == len(a) + len(b)
        assert [(t["name"], t["delta_bytes"]) for t in memory["tasks"]] == [("a", len(a)), ("b", len(b))]
        assert memory["serving_bytes"] == backbone + len(a) + len(b)
        assert memory["finetuned_copies_bytes"] == 2 * backbone + heads
        assert memory["saved_bytes"] == memory["finetuned_copies_bytes"] - memory["serving_bytes"]
        assert memory["saved_fraction"] == pytest.approx(memory["saved_bytes"] / memory["finetuned_copies_bytes"])

        info = client.get("/backbone").json()
        for key in ("name", "fingerprint", "num_layers", "hidden_size", "num_heads", "special_tokens",
                    "max_length", "linear_modules"):
            assert key in info
        assert info["fingerprint"] == tiny_backbone.fingerprint and info["num_layers"] == 3
        assert info["linear_modules"]["encoder.layer.0.attention.self.query"] == [32, 32]
        assert client.get("/health").json()["status"] == "ok"

        client.post("/tasks/a/predict", json={"inputs": ["one", "two"]})
        client.post("/tasks/missing/predict", json={"inputs": "x"})
        metrics = client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        predict = 'deltaserve_requests_total{method="POST",route="/tasks/{name}/predict"'
        assert predict + ',status="200",task="a"} 1.0' in text
        assert predict + ',status="404",task=""} 1.0' in text
        for name in ("deltaserve_request_seconds_bucket", "deltaserve_batch_requests_bucket", "deltaserve_queue_depth",
                     "deltaserve_cache_hits_total", "deltaserve_cache_evictions_total",
                     "deltaserve_cache_resident_bytes", "deltaserve_tasks 2.0"):
            assert name in text, name

        assert client.get("/docs").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/tasks", "/tasks/{name}", "/tasks/{name}/predict", "/memory", "/backbone", "/health"} <= set(paths)
