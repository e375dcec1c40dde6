"""Shared fixtures: tiny random-weight backbones of every family, on the real MiniLM tokenizer.

Tiny models keep the suite fast; the tokenizer is the packaged one so tokenisation, special
tokens and offsets are real. `make_tiny_model` is importable for tests that need a private copy.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    MPNetConfig,
    MPNetModel,
    PreTrainedModel,
    RobertaConfig,
    RobertaModel,
)

from server.backbone import Backbone, packaged_model_path

torch.set_num_threads(int(os.environ.get("DELTASERVE_TEST_THREADS", "2")))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FAMILIES = ("bert", "roberta", "distilbert", "mpnet")
VOCAB = 30522


def make_tiny_model(family: str = "bert", seed: int = 0, pooler: bool = True) -> PreTrainedModel:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, pad_token_id=0)
    if family == "bert":
        config = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=128, **common)
        model = BertModel(config, add_pooling_layer=pooler)
    elif family == "roberta":
        config = RobertaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=130, type_vocab_size=1, **common)
        model = RobertaModel(config, add_pooling_layer=pooler)
    elif family == "distilbert":
        config = DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=64, max_position_embeddings=128,
                                  **common)
        model = DistilBertModel(config)
    elif family == "mpnet":
        config = MPNetConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=130, **common)
        model = MPNetModel(config, add_pooling_layer=pooler)
    else:
        raise ValueError(family)
    # Random init gives near-zero biases; make every parameter matter for the comparisons.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(packaged_model_path())


def make_tiny_backbone(tokenizer, family: str = "bert", seed: int = 0, pooler: bool = True) -> Backbone:
    return Backbone(make_tiny_model(family, seed, pooler), tokenizer, f"tiny-{family}", device="cpu")


@pytest.fixture
def tiny_backbone(tokenizer) -> Backbone:
    return make_tiny_backbone(tokenizer)


@pytest.fixture(scope="session")
def minilm() -> Backbone:
    return Backbone.load(device="cpu")


def shared_data_or_skip(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> str:
    """A real S3 server (SeaweedFS) for the whole session; the AWS variables point boto3 at it."""
    from bench.seaweedfs import CREDENTIALS, weed_server

    with weed_server(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        saved = {key: os.environ.get(key) for key in (*CREDENTIALS, "AWS_ENDPOINT_URL")}
        os.environ.update({**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint})
        try:
            yield endpoint
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="session")
def ray_instance(s3_endpoint):
    """One local Ray for the whole suite (each start costs seconds, and on a loaded machine Ray's own 5 s
    readiness check of its HTTP proxy failed): modules deploy on it with `serve.start`/`serve.shutdown`.
    Its processes see the S3 server and this checkout; the proxy checks wait up to 60 s."""
    ray = pytest.importorskip("ray")
    checkout = str(Path(__file__).resolve().parents[1])
    env = {key: os.environ[key] for key in os.environ if key.startswith("AWS_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (checkout, os.environ.get("PYTHONPATH", "")) if p)
    patience = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}
    saved = {key: os.environ.get(key) for key in patience}
    os.environ.update(patience)  # Ray's processes inherit the driver's environment
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {**env, **patience}})
    try:
        yield ray
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
