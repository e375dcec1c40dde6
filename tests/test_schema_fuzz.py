"""Schemathesis over the app's own OpenAPI schema, in-process: no 5xx, no status or shape the schema omits.

Bounded (a few dozen examples per operation), derandomized (a fixed seed: the same cases on every
run, so a failure reproduces), on a tiny backbone with one real task installed so that predict
reaches the engine.
"""

from __future__ import annotations

import pytest
import schemathesis
from conftest import make_tiny_backbone
from delta_builders import build_delta
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance
from transformers import AutoTokenizer

from adapters_store.local import LocalDeltaStore
from server.app import create_app
from server.backbone import packaged_model_path
from server.settings import Settings

EXAMPLES = 30


@pytest.fixture(scope="module")
def app_schema(tmp_path_factory):
    backbone = make_tiny_backbone(AutoTokenizer.from_pretrained(packaged_model_path()))
    store = tmp_path_factory.mktemp("fuzz-store")
    # A task whose name the generator may well produce ("0"), so that predict runs real forwards too.
    LocalDeltaStore(store, backbone.spec()).put("0", build_delta(backbone))
    app = create_app(Settings(store=store, demo=False, batch_wait_ms=1.0), backbone=backbone)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("app_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_keeps_its_schema(case):
    # Every check but "schema-valid data is accepted": a delta's validity (and a predict text's
    # length against --max-input-chars) is more than a schema says, so a schema-valid upload may
    # rightly be 422. The status must still be one the schema documents.
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
