"""Examples in the OpenAPI schema (`/openapi.json`, `/docs`), for every route, in one place.

FastAPI builds the schema from the routes and their models; `add_examples(app)` then puts a
realistic example on each operation's JSON request body and on each of its responses, error
bodies included, wherever the route did not declare one itself (a route's own example wins).
The figures are those of a real server with the packaged MiniLM and the demo tasks. Keeping them
here, rather than spread over decorators, keeps the routers readable and makes "every route has
examples" one test over the generated schema.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI

from server.api.errors import error_body
from server.api.openapi import edit_operations

FINGERPRINT = "sha256:de66bc42eb878235190694c1d73c5823"

TASK_INFO = {
    "name": "sst2-mask", "version": 1, "sha256": "3f1d0c52a8e4b1f7a9d2e6c0b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6",
    "delta_bytes": 890760, "created_at": "2026-11-30T10:12:03.123Z", "method": "mask",
    "task_type": "sequence-classification", "labels": ["negative", "positive"], "description": "",
    "problem_type": "single_label", "max_length": 64, "word_piece": "first", "backbone_fingerprint": FINGERPRINT,
    "head_bytes": 3080, "bytes_by_part": {"KeepMask": 903168, "TaskHead": 3080}, "owner": None,
    "pooling": "cls", "normalize": None, "embedding_size": None,
}

SEQUENCE_ANSWER = {"task": "sst2-mask", "version": 1, "predictions": [
    {"label": "positive", "score": 0.9835, "scores": {"negative": 0.0165, "positive": 0.9835},
     "logits": {"negative": -2.0137, "positive": 2.0794}},
    {"label": "negative", "score": 0.9748, "scores": {"negative": 0.9748, "positive": 0.0252},
     "logits": {"negative": 1.7843, "positive": -1.8741}},
]}

TOKEN_ANSWER = {"task": "conll-ner", "version": 1, "predictions": [{
    "tokens": [
        {"word": "Angela", "start": 0, "end": 6, "label": "B-PER", "score": 0.993},
        {"word": "Merkel", "start": 7, "end": 13, "label": "I-PER", "score": 0.998},
        {"word": "visited", "start": 14, "end": 21, "label": "O", "score": 0.999},
        {"word": "Washington", "start": 22, "end": 32, "label": "B-LOC", "score": 0.994},
        {"word": ".", "start": 32, "end": 33, "label": "O", "score": 0.999},
    ],
    "entities": [
        {"text": "Angela Merkel", "label": "PER", "start": 0, "end": 13, "score": 0.996},
        {"text": "Washington", "label": "LOC", "start": 22, "end": 32, "score": 0.994},
    ],
}]}

MEMORY = {
    "backbone_bytes": 90852864, "num_tasks": 4,
    "tasks": [{"name": "conll-ner", "method": "lora", "delta_bytes": 1349236, "head_bytes": 13860},
              {"name": "sst2-dsee", "method": "dsee", "delta_bytes": 1636872, "head_bytes": 3080},
              {"name": "sst2-mask", "method": "mask", "delta_bytes": 890760, "head_bytes": 3080},
              {"name": "sst2-pasta", "method": "pasta", "delta_bytes": 22040, "head_bytes": 3080}],
    "delta_bytes_total": 3898908, "serving_bytes": 94751772, "finetuned_copies_bytes": 363434556,
    "saved_bytes": 268682784, "saved_fraction": 0.7393, "resident_delta_bytes": 2446812,
    "resident": [{"name": "sst2-dsee", "version": 1, "bytes": 1540720},
                 {"name": "sst2-mask", "version": 1, "bytes": 906092}],
    "replica": None,
    "tenants": None,
    "backend": "cpu", "backend_reason": "auto on cpu",
}

BACKBONE = {
    "name": "all-MiniLM-L6-v2", "fingerprint": FINGERPRINT, "model_type": "bert", "num_layers": 6,
    "hidden_size": 384, "num_heads": 12, "special_tokens": ["[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"],
    "max_length": 512, "parameters": 22713216, "parameter_bytes": 90852864, "device": "cpu", "dtype": "float32",
    "linear_modules": {"encoder.layer.0.attention.self.query": [384, 384],
                       "encoder.layer.0.intermediate.dense": [1536, 384],
                       "encoder.layer.0.output.dense": [384, 1536], "pooler.dense": [384, 384]},
    "layer_norms": {"embeddings.LayerNorm": 384, "encoder.layer.0.attention.output.LayerNorm": 384,
                    "encoder.layer.0.output.LayerNorm": 384},
    "pooling": "mean",
}

METRICS = """# HELP deltaserve_requests_total HTTP requests answered
# TYPE deltaserve_requests_total counter
deltaserve_requests_total{route="/tasks/{name}/predict",status="200",task="sst2-mask"} 1532.0
# HELP deltaserve_batch_requests requests merged into one engine forward
# TYPE deltaserve_batch_requests histogram
deltaserve_batch_requests_bucket{le="8.0"} 311.0
deltaserve_batch_requests_count 340.0
deltaserve_batch_requests_sum 1532.0
# HELP deltaserve_cache_hits_total delta cache hits
# TYPE deltaserve_cache_hits_total counter
deltaserve_cache_hits_total 336.0
"""

# method, path -> {"request": JSON body example, "<status>": answer example}
EXAMPLES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/tasks/{name}/predict"): {
        "request": {"inputs": ["a gripping, funny film", "a dull, tedious mess"]},
        "200": SEQUENCE_ANSWER,
    },
    ("get", "/tasks"): {"200": {"tasks": [TASK_INFO]}},
    ("get", "/tasks/{name}"): {"200": TASK_INFO},
    ("put", "/tasks/{name}"): {"200": {**TASK_INFO, "version": 2}, "201": TASK_INFO},
    ("delete", "/tasks/{name}"): {},
    ("get", "/backbone"): {"200": BACKBONE},
    ("get", "/memory"): {"200": MEMORY},
    ("get", "/health"): {"200": {"status": "ok", "backbone": "all-MiniLM-L6-v2", "tasks": 4, "queue_depth": 0,
                                 "backend": "cpu", "backend_reason": "auto on cpu"}},
    ("get", "/metrics"): {"200": METRICS},
}

# The standard protocols (server/api/oip.py, server/api/hf.py), with the same server's answers.
SST2_METADATA = {
    "name": "sst2-mask", "versions": ["1"], "platform": "deltaserve",
    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]},
               {"name": "text_pair", "datatype": "BYTES", "shape": [-1]}],
    "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "score", "datatype": "FP64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP64", "shape": [-1, 2]}],
    "parameters": {"task_type": "sequence-classification", "problem_type": "single_label",
                   "labels": ["negative", "positive"]},
}
INFER_REQUEST = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                             "data": ["a gripping, funny film", "a dull, tedious mess"]}]}
INFER_ANSWER = {"model_name": "sst2-mask", "model_version": "1", "outputs": [
    {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["positive", "negative"]},
    {"name": "score", "datatype": "FP64", "shape": [2], "data": [0.983586439759063, 0.974872677214752]},
    {"name": "probabilities", "datatype": "FP64", "shape": [2, 2],
     "data": [0.016413560240936893, 0.983586439759063, 0.974872677214752, 0.025127322785248013]},
]}
NER_INFER_ANSWER = {"model_name": "conll-ner", "model_version": "1", "outputs": [
    {"name": "entities", "datatype": "BYTES", "shape": [1], "data": [
        '[{"text": "Angela Merkel", "label": "PER", "start": 0, "end": 13, "score": 0.9962224788135008}, '
        '{"text": "Washington", "label": "LOC", "start": 22, "end": 32, "score": 0.9946845142962994}]']},
    {"name": "tokens", "datatype": "BYTES", "shape": [1], "data": [
        '[{"word": "Angela", "start": 0, "end": 6, "label": "B-PER", "score": 0.993542378960617}, ...]']},
]}
HF_TEXT_ANSWER = [[{"label": "positive", "score": 0.9835864513062588},
                   {"label": "negative", "score": 0.016413548693741196}]]
HF_TOKEN_ANSWER = [
    {"entity_group": "PER", "score": 0.9962224788135008, "word": "Angela Merkel", "start": 0, "end": 13},
    {"entity_group": "LOC", "score": 0.9946845142962994, "word": "Washington", "start": 22, "end": 32},
]
READY = {"name": "sst2-mask", "ready": True}

EXAMPLES.update({
    ("get", "/v2"): {"200": {"name": "deltaserve", "version": "1", "extensions": ["binary_tensor_data"]}},
    ("get", "/v2/health/live"): {"200": {"live": True}},
    ("get", "/v2/health/ready"): {"200": {"ready": True}},
    ("get", "/v2/models/{name}"): {"200": SST2_METADATA},
    ("get", "/v2/models/{name}/versions/{version}"): {"200": SST2_METADATA},
    ("get", "/v2/models/{name}/ready"): {"200": READY},
    ("get", "/v2/models/{name}/versions/{version}/ready"): {"200": READY},
    ("post", "/v2/models/{name}/infer"): {"request": INFER_REQUEST, "200": INFER_ANSWER},
    ("post", "/v2/models/{name}/versions/{version}/infer"): {"request": INFER_REQUEST, "200": INFER_ANSWER},
    ("post", "/models/{name}"): {"request": {"inputs": "a gripping, funny film"}, "200": HF_TEXT_ANSWER},
})

# Embeddings (server/api/openai_compat.py, server/api/tei.py): the packaged MiniLM's own answers. A vector
# has 384 numbers (the model's size, or an embedding task's projection); examples show its first four.
CAT = [0.130237, -0.015773, -0.036717, 0.057986]
CAT_2 = [0.099767, -0.012412, -0.031852, 0.072243]
EMBEDDINGS_REQUEST = {"model": "all-MiniLM-L6-v2", "input": ["The cat sat on the mat.", "A cat was sitting on a mat."],
                      "encoding_format": "float"}
EMBEDDINGS_ANSWER = {"object": "list", "model": "all-MiniLM-L6-v2",
                     "data": [{"object": "embedding", "index": 0, "embedding": CAT},
                              {"object": "embedding", "index": 1, "embedding": CAT_2}],
                     "usage": {"prompt_tokens": 19, "total_tokens": 19}}
MODEL_CARD = {"id": "all-MiniLM-L6-v2", "object": "model", "created": 0, "owned_by": "deltaserve"}
EMBEDDING_ANSWER = {"task": "retrieval", "version": 1, "predictions": [{"embedding": CAT}]}

EXAMPLES.update({
    ("post", "/v1/embeddings"): {"request": EMBEDDINGS_REQUEST, "200": EMBEDDINGS_ANSWER},
    ("get", "/v1/models"): {"200": {"object": "list", "data": [
        MODEL_CARD, {"id": "retrieval", "object": "model", "created": 1796119923, "owned_by": "deltaserve"}]}},
    ("get", "/v1/models/{name}"): {"200": MODEL_CARD},
    ("post", "/embed"): {"request": {"inputs": ["The cat sat on the mat.", "A cat was sitting on a mat."]},
                         "200": [CAT, CAT_2]},
})

# Named alternatives shown beside the main example (OpenAPI `examples`).
MORE = {
    ("post", "/tasks/{name}/predict", "request"): {
        "one text": {"value": {"inputs": "a gripping, funny film"}},
        "texts": {"value": {"inputs": ["a gripping, funny film", "a dull, tedious mess"]}},
        "pairs (sentence-pair tasks)": {"value": {"inputs": [["A man sleeps.", "Someone rests."]]}},
        "token classification": {"value": {"inputs": "Angela Merkel visited Washington."}},
    },
    ("post", "/v2/models/{name}/infer", "request"): {
        "texts": {"value": INFER_REQUEST},
        "a pair (sentence-pair tasks)": {"value": {"inputs": [
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["A man sleeps."]},
            {"name": "text_pair", "shape": [1], "datatype": "BYTES", "data": ["Someone rests."]}]}},
        "JSON outputs asked by name": {"value": {**INFER_REQUEST, "outputs": [{"name": "label"}]}},
    },
    ("post", "/v2/models/{name}/infer", "200"): {
        "sequence classification": {"value": INFER_ANSWER},
        "token classification (each element a JSON list)": {"value": NER_INFER_ANSWER},
        "embedding (FP32 [n, D]; D numbers a row, four shown)": {"value": {
            "model_name": "retrieval", "model_version": "1",
            "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [1, 384], "data": CAT}]}},
    },
    ("post", "/models/{name}", "request"): {
        "text classification": {"value": {"inputs": "a gripping, funny film"}},
        "top_k, function_to_apply": {"value": {"inputs": "a gripping, funny film",
                                               "parameters": {"top_k": 1, "function_to_apply": "sigmoid"}}},
        "a pair": {"value": {"inputs": {"text": "A man sleeps.", "text_pair": "Someone rests."}}},
        "token classification": {"value": {"inputs": "Angela Merkel visited Washington.",
                                           "parameters": {"aggregation_strategy": "simple",
                                                          "ignore_labels": ["O"]}}},
    },
    ("post", "/models/{name}", "200"): {
        "text classification": {"value": HF_TEXT_ANSWER},
        "token classification": {"value": HF_TOKEN_ANSWER},
        "feature extraction (an embedding task, one text)": {"value": CAT},
    },
    ("post", "/tasks/{name}/predict", "200"): {
        "sequence classification": {"value": SEQUENCE_ANSWER},
        "token classification": {"value": TOKEN_ANSWER},
        "regression": {"value": {"task": "stsb", "version": 3, "predictions": [{"value": 3.71}]}},
        "embedding (D numbers a vector, four shown)": {"value": EMBEDDING_ANSWER},
    },
    ("post", "/v1/embeddings", "request"): {
        "the bare backbone": {"value": EMBEDDINGS_REQUEST},
        "an embedding task, base64 (the openai client's default)": {"value": {
            "model": "retrieval", "input": "The cat sat on the mat.", "encoding_format": "base64"}},
    },
    ("post", "/v1/embeddings", "200"): {
        "float": {"value": EMBEDDINGS_ANSWER},
        "base64 (little-endian float32 bytes; four numbers shown)": {"value": {
            "object": "list", "model": "retrieval", "usage": {"prompt_tokens": 9, "total_tokens": 9},
            "data": [{"object": "embedding", "index": 0, "embedding": "5VwFPg42gbxIZBa9LINtPQ=="}]}},
    },
}

DESCRIPTIONS = {
    ("put", "/tasks/{name}", "200"): "Replaced: the task's new version",
    ("put", "/tasks/{name}", "201"): "Created: version 1 (or the next version after a delete)",
}

ERRORS = {
    "400": "unknown input 'sentence': this model takes 'text' (and 'text_pair')",
    "401": "this route needs 'Authorization: Bearer <admin token>'",
    "403": "tenant 'acme' has 20 tasks; its max_tasks quota is 20; nothing was stored",
    "404": "task 'sst2' not found",
    "409": f"backbone_fingerprint: delta was made for backbone 'sha256:0a1b…'; this server runs '{FINGERPRINT}'",
    "413": "70 inputs in one request; the limit is 64",
    "422": "inputs[1] is an empty text",
    "429": "the server is overloaded; retry after 1 s",
    "503": "the server is shutting down",
}


def _media_examples(content: dict[str, Any], example: Any, more: dict[str, Any] | None) -> None:
    for media in content.values():
        if "example" in media or "examples" in media or "example" in media.get("schema", {}):
            continue  # the route's own
        if more:
            media["examples"] = more
        else:
            media["example"] = example


def add_examples(app: FastAPI) -> None:
    """Make `app.openapi()` return the generated schema with the examples above filled in."""

    def fill_in(path: str, method: str, operation: dict[str, Any]) -> None:
        known = EXAMPLES.get((method, path), {})
        body = operation.get("requestBody", {}).get("content", {})
        if "request" in known:
            _media_examples({k: v for k, v in body.items() if "json" in k}, known["request"],
                            MORE.get((method, path, "request")))
        responses = operation.setdefault("responses", {})
        for status in sorted(known.keys() - responses.keys() - {"request"}):  # e.g. PUT's 200 "replaced"
            twin = next((r for s, r in responses.items() if s.startswith("2") and "content" in r), {})
            responses[status] = {"description": DESCRIPTIONS.get((method, path, status), "Successful Response"),
                                 "content": copy.deepcopy(twin.get("content", {}))}
        for status, response in responses.items():
            if status in known:
                content = response.setdefault("content", {})
                if isinstance(known[status], str):  # a text answer (/metrics)
                    content.pop("application/json", None)
                    content.setdefault("text/plain", {"schema": {"type": "string"}})
                elif not content:
                    content["application/json"] = {}
                _media_examples(content, known[status], MORE.get((method, path, status)))
            elif status in ERRORS and "content" in response:
                # in the protocol's own shape (OpenAI's, TEI's, {"error"}, {"detail"})
                _media_examples(response["content"], error_body(int(status), ERRORS[status], path)[1], None)

    edit_operations(app, fill_in)
