"""Ray Serve: two engine replicas behind Ray's HTTP proxy on one local Ray instance, sharing an S3 store.

Every kind of delta part answers exactly as the single-process server does; requests of different
tasks are merged into one forward by `@serve.batch`; an upload answered by one replica is served
by both; `/memory` says which replica answered and what it holds.
"""

from __future__ import annotations

import concurrent.futures
import re
import time
import uuid
from pathlib import Path

import httpx
import pytest
from delta_builders import build_delta
from http_helpers import ADMIN, assert_close, free_port, served
from test_http_lifecycle import save_backbone

from server.settings import Settings

serve = pytest.importorskip("ray.serve")
ray = pytest.importorskip("ray")
from server.ray_app import REPLICA_HEADER, application  # noqa: E402 (needs ray)

REPO = Path(__file__).resolve().parents[1]
NER = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@pytest.fixture(scope="module")
def cluster(ray_instance, tokenizer, tmp_path_factory):
    """(proxy URL, backbone) of a Ray Serve app with two replicas, on the suite's one Ray instance."""
    folder = tmp_path_factory.mktemp("ray")
    backbone = save_backbone(tokenizer, folder / "backbone")
    settings = Settings(store=f"s3://deltaserve-tests/ray-{uuid.uuid4().hex[:8]}", backbone=str(folder / "backbone"),
                        replicas=2, store_poll_s=0.3, threads=1, demo=False, admin_token="s3cret",
                        batch_wait_ms=50, host="127.0.0.1", port=free_port(), ray_replica_cpus=0.5)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(application(settings), name="deltaserve", route_prefix="/")
        yield f"http://{settings.host}:{settings.port}", backbone
    finally:
        serve.shutdown()


def deltas(backbone) -> dict[str, tuple[bytes, list]]:
    """One task per kind of part (and per task type), with inputs that suit it."""
    texts = ["a gripping, funny film", "dull and far too long", "Paris in the spring"]
    pairs = [["A man sleeps.", "Someone rests."], ["It rains.", "The sun is out."]]
    return {
        "lora-keep": (build_delta(backbone, parts=("lora", "keep"), seed=1), texts),
        "sparse-heads": (build_delta(backbone, parts=("sparse", "head_keep"), method="mask", seed=2), texts),
        "pasta": (build_delta(backbone, parts=("pasta",), method="pasta", seed=3), pairs),
        "regression": (build_delta(backbone, parts=("lora",), labels=["score"], problem_type="regression",
                                   seed=4), texts),
        "ner": (build_delta(backbone, parts=("lora", "sparse"), task_type="token-classification", labels=NER,
                            seed=5), ["Anna flew to Paris", "no names here"]),
    }


def test_replicas_answer_as_the_single_process_server(cluster, tmp_path):
    url, backbone = cluster
    tasks = deltas(backbone)
    expected = {}
    with served(backbone, tmp_path / "single") as single:
        for name, (data, inputs) in tasks.items():
            assert single.put(f"/tasks/{name}", content=data, headers=ADMIN).status_code == 201
            expected[name] = single.post(f"/tasks/{name}/predict", json={"inputs": inputs}).json()["predictions"]
    for name, (data, _) in tasks.items():
        response = httpx.put(f"{url}/tasks/{name}", content=data, headers=ADMIN, timeout=60)
        assert response.status_code == 201, response.text
    # The proxy may route the next requests to the replica that did not take the upload.
    deadline = time.monotonic() + 10
    for name in tasks:
        while httpx.get(f"{url}/tasks/{name}", timeout=10).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)

    def ask(name: str) -> tuple[str, str, dict]:
        response = httpx.post(f"{url}/tasks/{name}/predict", json={"inputs": tasks[name][1]}, timeout=60)
        return name, response.headers.get(REPLICA_HEADER, ""), response.json()

    # All at once, several times over: each replica's @serve.batch gets requests of different tasks.
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(ask, list(tasks) * 4))
    for name, _, body in answers:
        assert body["task"] == name and body["version"] == 1, body
        assert_close(body["predictions"], expected[name], where=name)

    mixed = 0
    for text in replica_views(url, "/metrics", lambda r: r.text).values():
        total = float(re.search(r"^deltaserve_batch_tasks_sum (\S+)", text, re.M).group(1))
        count = float(re.search(r"^deltaserve_batch_tasks_count (\S+)", text, re.M).group(1))
        mixed += total > count  # some forward held more than one task
    assert mixed >= 1


def replica_views(url: str, path: str, read, timeout_s: float = 20) -> dict[str, object]:
    """`path` as each of the two replicas answers it (asked until both have answered)."""
    seen: dict[str, object] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < 2 and time.monotonic() < deadline:
        response = httpx.get(f"{url}{path}", timeout=10)
        seen[response.headers[REPLICA_HEADER]] = read(response)
    assert len(seen) == 2, f"only replicas {list(seen)} answered {path}"
    return seen


def test_an_upload_is_served_by_both_replicas(cluster):
    url, backbone = cluster
    data = build_delta(backbone, parts=("lora", "keep", "sparse"), seed=9)
    put = httpx.put(f"{url}/tasks/fresh", content=data, headers=ADMIN, timeout=60)
    assert put.status_code == 201, put.text
    served_by: dict[str, int] = {}
    deadline = time.monotonic() + 20
    while len(served_by) < 2 and time.monotonic() < deadline:
        response = httpx.post(f"{url}/tasks/fresh/predict", json={"inputs": "hello"}, timeout=30)
        if response.status_code == 200:
            served_by[response.headers[REPLICA_HEADER]] = response.json()["version"]
    assert served_by and list(served_by.values()) == [1] * len(served_by) and len(served_by) == 2
    memory = replica_views(url, "/memory", lambda r: r.json())
    for replica, report in memory.items():
        assert report["replica"] == replica
        assert {"name": "fresh", "version": 1} in [{k: e[k] for k in ("name", "version")} for e in report["resident"]]
        assert report["resident_delta_bytes"] == sum(e["bytes"] for e in report["resident"]) > 0
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["status"] == "ok"


def test_several_replicas_need_a_shared_store(tmp_path):
    from server.cli import main

    with pytest.raises(SystemExit, match="s3://bucket/prefix"):
        main(["serve", "--ray", "--replicas", "2", "--store", str(tmp_path / "folder")])


def test_serve_config_file_is_valid_and_builds():
    """deploy/serve_config.yaml parses as Ray Serve's config schema, and its builder makes the application."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from server.ray_app import app_builder

    config = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    (app,) = schema.applications
    assert app.import_path == "server.ray_app:app_builder" and app.route_prefix == "/"
    assert isinstance(app_builder(app.args), serve.Application)


def test_flags_ray_leaves_unused_are_named(tmp_path, monkeypatch):
    from server.ray_app import deployment_options, ignored_under_ray

    monkeypatch.setenv("DELTASERVE_MALLOC_THRESHOLD", "0")
    settings = Settings(store=str(tmp_path), max_batch_tokens=512, max_queue=9, shutdown_grace_s=12)
    assert ignored_under_ray(settings) == ["--max-batch-tokens", "--malloc-threshold"]
    assert ignored_under_ray(Settings(store=str(tmp_path))) == ["--malloc-threshold"]
    options = deployment_options(settings)
    assert options["max_ongoing_requests"] == 9 and options["graceful_shutdown_timeout_s"] == 12
