"""Auth that no route can forget: every route of the assembled app, walked from `app.routes`, answers 401
without a credential, except the open ones listed here by hand (a new route is guarded, or listed).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from delta_builders import build_delta
from fastapi.testclient import TestClient
from http_helpers import ADMIN, call_route, endpoints, served

READER = {"Authorization": "Bearer reader"}

# (method, path template) that answer without a credential, each for a reason:
OPEN = {
    ("GET", "/health"),                # load balancers and orchestrators have no key
    ("GET", "/v2/health/live"),        # the OIP probes, likewise
    ("GET", "/v2/health/ready"),
    ("GET", "/"),                      # the dashboard page and its files: the page asks for the key
    ("GET", "/static/{file}"),
    ("GET", "/openapi.json"),          # the API's description, which names no task
    ("HEAD", "/openapi.json"),
    ("GET", "/docs"),
    ("HEAD", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("HEAD", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("HEAD", "/redoc"),
}
@pytest.fixture
def guarded(tiny_backbone, tmp_path) -> Iterator[TestClient]:
    """A server with an API key and an admin token, holding task `seq`."""
    with served(tiny_backbone, tmp_path, api_key="reader") as client:
        assert client.put("/tasks/seq", content=build_delta(tiny_backbone), headers=ADMIN).status_code == 201
        yield client


def test_every_route_but_the_open_ones_refuses_a_missing_or_wrong_credential(guarded):
    walked = set(endpoints(guarded.app.routes))
    assert walked >= OPEN, f"listed as open but no such route: {OPEN - walked}"
    guarded_routes = sorted(walked - OPEN)
    assert len(guarded_routes) >= 15  # the walk found the app's routes, not an empty list
    for method, template in guarded_routes:
        details = set()
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic cmVhZGVy"},
                        {"Authorization": "reader"}):
            response = call_route(guarded, method, template, headers)
            assert response.status_code == 401, (method, template, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            details.add(response.text)
        assert len(details) == 1, (method, template, details)  # the same answer, whatever was wrong
    for method, template in sorted(OPEN):
        assert call_route(guarded, method, template).status_code == 200, (method, template)


def test_the_admin_token_passes_every_guarded_route(guarded):
    for method, template in sorted(set(endpoints(guarded.app.routes)) - OPEN):
        if method in ("PUT", "DELETE"):
            continue  # they would replace or delete `seq`; test_http_errors covers them
        response = call_route(guarded, method, template, ADMIN)
        assert response.status_code != 401, (method, template, response.text)


def test_the_reader_key_reads_and_predicts_on_every_protocol_but_cannot_write(guarded):
    for method, path in (("POST", "/tasks/seq/predict"), ("POST", "/models/seq"), ("GET", "/v2/models/seq"),
                         ("GET", "/metrics"), ("GET", "/tasks")):
        assert call_route(guarded, method, path, READER).status_code == 200, path
    infer = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
    assert guarded.post("/v2/models/seq/infer", json=infer, headers=READER).status_code == 200
    assert guarded.post("/v2/models/seq/infer", json=infer).status_code == 401
    assert guarded.delete("/tasks/seq", headers=READER).status_code == 401
    assert guarded.get("/tasks/seq", headers=READER).status_code == 200


def test_openapi_declares_the_bearer_scheme_on_the_guarded_operations(guarded):
    schema = guarded.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": "the admin token, the API key, or a tenant's key"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            is_open = (method.upper(), path) in OPEN
            assert ("security" in operation) != is_open, (method, path)


@pytest.mark.parametrize("config", [{"api_key": "reader"}, {}, {"admin_token": None}])
def test_the_schema_says_which_operations_need_the_credential(tiny_backbone, tmp_path, config):
    """Required (401 without it) where the schema lists only the bearer scheme; optional (`{}` listed too)
    where the server answers without one."""
    with served(tiny_backbone, tmp_path, **config) as client:
        client.put("/tasks/seq", content=build_delta(tiny_backbone), headers=ADMIN)
        schema = client.get("/openapi.json").json()
        for method, template in sorted(set(endpoints(client.app.routes)) - OPEN):
            if method == "HEAD":
                continue
            security = schema["paths"][template][method.lower()]["security"]
            refused = call_route(client, method, template).status_code == 401
            assert refused == ({} not in security), (config, method, template, security)


def test_without_an_api_key_reading_stays_open_and_writing_needs_the_admin_token(tiny_backbone, tmp_path):
    with served(tiny_backbone, tmp_path) as client:
        assert client.put("/tasks/seq", content=build_delta(tiny_backbone)).status_code == 401
        assert client.put("/tasks/seq", content=build_delta(tiny_backbone), headers=ADMIN).status_code == 201
        for method, path in (("GET", "/tasks"), ("POST", "/models/seq"), ("GET", "/v2/models/seq"),
                             ("GET", "/metrics")):
            assert call_route(client, method, path).status_code == 200, path
