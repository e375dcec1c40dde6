"""Tenants (`--tenants-file`): each key sees and uses its own tasks only, on every route; names are global
(409 on another's); quotas (403 naming the quota, nothing stored); the file's errors name their line
(exit 2 at start; on reload the old tenants stay); SIGHUP and a change of the file reload it; the audit log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from delta_builders import build_delta
from fastapi.testclient import TestClient
from http_helpers import ADMIN, call_route, endpoints, free_port, served
from test_auth import OPEN

from server.tenants import key_hash, parse_tenants

REPO = Path(__file__).resolve().parents[1]
ACME, BETA = {"Authorization": "Bearer acme-key"}, {"Authorization": "Bearer beta-key"}


def tenants_toml(**extra: str) -> str:
    """acme (2 tasks at most) and beta (a small byte quota, weight 2); `extra` lines per tenant."""
    return (f'[tenants.acme]\nkeys = ["sha256:{key_hash("acme-key")}"]\nmax_tasks = 2\n{extra.get("acme", "")}\n'
            f'[tenants.beta]\nkeys = ["sha256:{key_hash("beta-key")}"]\nmax_delta_bytes = 10000\nweight = 2\n'
            f'{extra.get("beta", "")}\n')


@pytest.fixture
def tenants_file(tmp_path) -> Path:
    path = tmp_path / "tenants.toml"
    path.write_text(tenants_toml())
    return path


@pytest.fixture
def client(tiny_backbone, tmp_path, tenants_file) -> Iterator[TestClient]:
    """A server with tenants acme and beta, the admin token, and an audit log; acme owns `seq`."""
    with served(tiny_backbone, tmp_path / "store", tenants_file=tenants_file,
                audit_log=str(tmp_path / "audit.jsonl")) as client:
        assert client.put("/tasks/seq", content=build_delta(tiny_backbone), headers=ACME).status_code == 201
        yield client


def audit_lines(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def test_another_tenants_task_is_absent_on_every_route(client, tiny_backbone):
    absent = client.get("/tasks/nowhere", headers=BETA)
    assert absent.status_code == 404
    for method, template in sorted(endpoints(client.app.routes)):
        if "{name}" not in template:
            continue
        response = call_route(client, method, template, BETA)
        expected = 409 if method == "PUT" else 404  # a name is global: taken, whoever has it
        assert response.status_code == expected, (method, template, response.text)
        if method != "PUT":  # the very answer a task that does not exist gets
            twin = call_route(client, method, template, BETA, name="nowhere")
            assert response.json() == json.loads(twin.text.replace("nowhere", "seq")), template
    put = client.put("/tasks/seq", content=build_delta(tiny_backbone, seed=4), headers=BETA)
    assert put.status_code == 409 and "taken" in put.json()["detail"]
    info = client.get("/tasks/seq", headers=ACME).json()
    assert info["version"] == 1 and info["owner"] == "acme"  # nothing changed
    assert client.post("/tasks/seq/predict", json={"inputs": "hi"}, headers=ACME).status_code == 200


def test_each_tenant_lists_its_own_tasks_and_the_operator_all(client, tiny_backbone):
    assert client.put("/tasks/bseq", content=build_delta(tiny_backbone, seed=2), headers=BETA).status_code == 201
    assert client.put("/tasks/ops", content=build_delta(tiny_backbone, seed=3), headers=ADMIN).status_code == 201
    names = {who: [t["name"] for t in client.get("/tasks", headers=headers).json()["tasks"]]
             for who, headers in (("acme", ACME), ("beta", BETA), ("admin", ADMIN))}
    assert names == {"acme": ["seq"], "beta": ["bseq"], "admin": ["bseq", "ops", "seq"]}
    assert client.get("/tasks/ops", headers=ACME).status_code == 404  # the operator's tasks are no tenant's

    memory = client.get("/memory", headers=BETA).json()
    assert [t["name"] for t in memory["tasks"]] == ["bseq"] and memory["num_tasks"] == 1
    beta_bytes = client.get("/tasks/bseq", headers=BETA).json()["delta_bytes"]
    assert memory["tenants"] == [{"name": "beta", "tasks": 1, "delta_bytes": beta_bytes, "max_tasks": None,
                                  "max_delta_bytes": 10000, "weight": 2.0}]
    usage = {t["name"]: t["tasks"] for t in client.get("/memory", headers=ADMIN).json()["tenants"]}
    assert usage == {"acme": 1, "beta": 1}

    # /metrics names every task: the operator's only.
    assert client.get("/metrics", headers=BETA).status_code == 401
    assert client.get("/metrics", headers=ADMIN).status_code == 200

    # The operator may replace and delete a tenant's task; the owner stays.
    replaced = client.put("/tasks/seq", content=build_delta(tiny_backbone, seed=5), headers=ADMIN).json()
    assert replaced["owner"] == "acme" and replaced["version"] == 2
    assert client.delete("/tasks/bseq", headers=ACME).status_code == 404  # not acme's: absent
    assert client.delete("/tasks/bseq", headers=BETA).status_code == 204


def test_every_key_needs_to_be_a_tenants_and_a_wrong_one_reads_as_a_missing_one(client):
    for method, template in sorted(set(endpoints(client.app.routes)) - OPEN):  # the route walk, with tenants
        assert call_route(client, method, template).status_code == 401, (method, template)
    answers = set()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Bearer "},
                    {"Authorization": "Basic YWNtZS1rZXk="}, {"Authorization": "acme-key"}):
        response = client.get("/tasks", headers=headers)
        assert response.status_code == 401
        answers.add(response.text)
    assert len(answers) == 1 and "tenant" not in answers.pop()
    assert client.put("/tasks/x", content=b"x").status_code == 401


def test_quotas_refuse_with_403_naming_the_quota_and_store_nothing(client, tiny_backbone, tmp_path):
    assert client.put("/tasks/two", content=build_delta(tiny_backbone, seed=2), headers=ACME).status_code == 201
    third = client.put("/tasks/three", content=build_delta(tiny_backbone, seed=3), headers=ACME)
    assert third.status_code == 403 and "max_tasks" in third.json()["detail"]
    # A replace is no new task: within the quota.
    assert client.put("/tasks/two", content=build_delta(tiny_backbone, seed=4), headers=ACME).status_code == 200

    small = build_delta(tiny_backbone, seed=2)
    big = build_delta(tiny_backbone, parts=("lora", "sparse", "keep"), seed=2)
    assert len(small) < 10000 < len(small) + len(big)
    assert client.put("/tasks/b1", content=small, headers=BETA).status_code == 201
    over = client.put("/tasks/b2", content=big, headers=BETA)
    assert over.status_code == 403 and "max_delta_bytes" in over.json()["detail"]
    listing = {t["name"] for t in client.get("/tasks", headers=ADMIN).json()["tasks"]}
    assert listing == {"seq", "two", "b1"}
    stored = sorted(p.parent.name for p in (tmp_path / "store" / "deltas").glob("*/*.safetensors"))
    assert stored == ["b1", "seq", "two"]  # nothing of the refused uploads on disk

    quota_lines = [line for line in audit_lines(tmp_path) if "QuotaExceeded" in line["outcome"]]
    assert [(line["tenant"], line["task"]) for line in quota_lines] == [("acme", "three"), ("beta", "b2")]


def test_the_audit_log_names_tenant_key_id_route_task_version_outcome(client, tiny_backbone, tmp_path):
    client.get("/tasks", headers={"Authorization": "Bearer wrong-key"})
    client.delete("/tasks/seq", headers=ACME)
    lines = audit_lines(tmp_path)
    assert [(line["route"], line["tenant"], line["task"], line["version"], line["outcome"][:9]) for line in lines] == [
        ("PUT /tasks/{name}", "acme", "seq", 1, "created"),
        ("GET /tasks", None, None, None, "401 refus"),
        ("DELETE /tasks/{name}", "acme", "seq", 1, "deleted"),
    ]
    assert [line["key_id"] for line in lines] == [key_hash("acme-key")[:8], key_hash("wrong-key")[:8],
                                                 key_hash("acme-key")[:8]]
    text = (tmp_path / "audit.jsonl").read_text()
    assert "acme-key" not in text and "wrong-key" not in text and key_hash("acme-key") not in text
    assert all(line["time"].endswith("Z") for line in lines)


def test_a_changed_file_is_reloaded_and_a_broken_one_keeps_the_old(client, tenants_file, caplog):
    gamma = {"Authorization": "Bearer gamma-key"}
    assert client.get("/tasks", headers=gamma).status_code == 401
    tenants_file.write_text(tenants_toml() + f'[tenants.gamma]\nkeys = ["sha256:{key_hash("gamma-key")}"]\n')
    wait_until(lambda: client.get("/tasks", headers=gamma).status_code == 200)
    tenants_file.write_text(tenants_toml(acme="colour = 'red'"))  # unknown field: refused
    wait_until(lambda: "not reloaded" in caplog.text)
    assert "tenants.toml:4" in caplog.text and "colour" in caplog.text
    assert client.get("/tasks", headers=gamma).status_code == 200  # the previous tenants stay in force


def wait_until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize("body, line, words", [
    ('[tenants.acme]\nkeys = ["acme-key"]\n', 2, "sha256"),
    ('[tenants.acme]\nkeys = ["sha256:' + "a" * 64 + '"]\nmax_tasks = -3\n', 3, "max_tasks"),
    ('[tenants.acme]\nkeys = ["sha256:' + "a" * 64 + '"]\n\n[tenants.beta]\nkeys = ["sha256:' + "a" * 64 + '"]\n', 5,
     "tenant 'acme' has too"),
    ('[tenants.acme]\nkeys = ["sha256:' + "a" * 64 + '"]\nmax_task = 1\n', 3, "unknown field 'max_task'"),
    ('[tenants.acme\n', 1, "TOML"),
])
def test_the_files_errors_name_their_line(body, line, words):
    with pytest.raises(ValueError) as err:
        parse_tenants(body, "t.toml")
    assert str(err.value).startswith(f"t.toml:{line}:") or f"line {line}" in str(err.value)
    assert words in str(err.value) and "acme-key" not in str(err.value)


def test_serve_refuses_an_invalid_file_with_exit_2_naming_the_line(tmp_path):
    bad = tmp_path / "tenants.toml"
    bad.write_text('[tenants.acme]\nkeys = ["sha256:' + "a" * 64 + '"]\nweight = -1\n')
    result = subprocess.run([sys.executable, "-m", "server", "serve", "--tenants-file", str(bad),
                             "--store", str(tmp_path / "store")], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "DELTASERVE_TENANTS_FILE": ""})
    assert result.returncode == 2, result.stderr
    assert f"{bad}:3:" in result.stderr and "weight" in result.stderr


def test_sighup_reloads_the_file(tokenizer, tmp_path):
    """A real server process: the file is rewritten with its size and times kept (the watcher cannot see
    it), and only SIGHUP makes the new key work."""
    from test_http_lifecycle import save_backbone

    save_backbone(tokenizer, tmp_path / "backbone")
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(tenants_toml())
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--backbone", str(tmp_path / "backbone"), "--port", str(port),
         "--threads", "1", "--log-level", "info", "--no-demo", "--store", str(tmp_path / "store")],
        cwd=REPO, env={**os.environ, "DELTASERVE_TENANTS_FILE": str(tenants)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            wait_until(lambda: _up(http), timeout=90)
            assert http.get("/tasks", headers=ACME).status_code == 200
            before = os.stat(tenants)
            swapped = tenants_toml().replace(key_hash("acme-key"), key_hash("acme-kez"))  # same size
            tenants.write_text(swapped)
            os.utime(tenants, ns=(before.st_atime_ns, before.st_mtime_ns))
            time.sleep(2.5)  # the watcher polls every second: it sees nothing to reload
            assert http.get("/tasks", headers=ACME).status_code == 200
            process.send_signal(signal.SIGHUP)
            kez = {"Authorization": "Bearer acme-kez"}
            wait_until(lambda: http.get("/tasks", headers=kez).status_code == 200)
            assert http.get("/tasks", headers=ACME).status_code == 401
    finally:
        process.terminate()
        process.wait(timeout=60)


def _up(http: httpx.Client) -> bool:
    try:
        return http.get("/health").status_code == 200
    except httpx.HTTPError:
        return False


def test_the_batcher_shares_by_the_files_weights_and_follows_a_reload(client, tenants_file, tiny_backbone, tmp_path):
    fair = client.app.state.server.batcher._fair
    assert fair is not None and fair.weight("beta") == 2.0 and fair.weight("acme") == 1.0 and fair.weight(None) == 1.0
    tenants_file.write_text(tenants_toml(acme="weight = 5"))
    wait_until(lambda: fair.weight("acme") == 5.0)
    with served(tiny_backbone, tmp_path / "plain") as plain:  # without tenants: first come, first served
        assert plain.app.state.server.batcher._fair is None
