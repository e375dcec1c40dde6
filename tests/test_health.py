"""Readiness (issue 23 item 6): `/health` and `/v2/health/ready` answer 503 while the service loads (as `serve`
runs it: the port open at once), when the batcher has stopped, and when the store cannot be used; liveness
(`/v2/health/live`) stays 200. Draining after SIGTERM is tests/test_drain.py's."""

from __future__ import annotations

import asyncio
import shutil
import threading

from fastapi.testclient import TestClient
from http_helpers import served, served_async, server_of, settings

from server.app import create_app
from server.service import Server


def test_probes_answer_503_while_loading_then_200(tiny_backbone, tmp_path, monkeypatch):
    release = threading.Event()
    build = Server.build

    def slow_build(*args, **kwargs):
        assert release.wait(60)
        return build(*args, **kwargs)

    monkeypatch.setattr(Server, "build", slow_build)
    failures: list[BaseException] = []
    app = create_app(settings(tmp_path), backbone=tiny_backbone, on_load_failure=failures.append)
    with TestClient(app) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        assert health.headers["retry-after"] == "5"
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v2/health/live").status_code == 200
        tasks = client.get("/tasks")  # any other route: 503 with a reason, not a 500
        assert tasks.status_code == 503 and "loading" in tasks.json()["detail"]
        release.set()
        for _ in range(600):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert client.get("/health").json()["status"] == "ok"
        assert client.get("/v2/health/ready").json() == {"ready": True}
        assert client.get("/tasks").status_code == 200
    assert not failures


def test_a_failed_load_is_reported(tmp_path, monkeypatch):
    def broken_build(*args, **kwargs):
        raise OSError("no such backbone")

    monkeypatch.setattr(Server, "build", broken_build)
    failures: list[BaseException] = []
    app = create_app(settings(tmp_path), on_load_failure=failures.append)
    with TestClient(app) as client:
        for _ in range(200):
            if failures:
                break
            threading.Event().wait(0.05)
        assert client.get("/health").status_code == 503
    assert len(failures) == 1 and "no such backbone" in str(failures[0])


def test_a_store_folder_gone_makes_the_server_unready(tiny_backbone, tmp_path):
    store = tmp_path / "store"
    with served(tiny_backbone, store) as client:
        assert client.get("/health").status_code == 200
        moved = tmp_path / "elsewhere"
        shutil.move(store, moved)  # an unmounted volume
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert "store folder" in health.json()["problem"]
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v2/health/live").status_code == 200
        shutil.move(moved, store)
        assert client.get("/health").status_code == 200


def test_a_stopped_batcher_makes_the_server_unready(tiny_backbone, tmp_path):
    async def scenario() -> tuple[int, dict, int]:
        async with served_async(tiny_backbone, tmp_path) as (client, app):
            before = (await client.get("/health")).status_code
            loop_task = server_of(app).batcher._loop_task
            loop_task.cancel()  # as if the loop had died
            await asyncio.gather(loop_task, return_exceptions=True)
            after = await client.get("/health")
            ready = await client.get("/v2/health/ready")
            return before, {**after.json(), "code": after.status_code}, ready.status_code

    before, after, ready = asyncio.run(scenario())
    assert before == 200 and after["code"] == 503 and "batcher has stopped" in after["problem"] and ready == 503


def test_a_store_folder_of_another_owner_is_said_with_the_fix(tiny_backbone, tmp_path, monkeypatch, caplog):
    """The image's uid 10001 and a bind mount owned by someone else: one log line naming `chown -R`, no traceback.
    (Simulated: the tests may run as root, whom file permissions do not stop.)"""
    import server.service

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/data/store/manifest.json")

    monkeypatch.setattr(server.service, "open_store", denied)
    failures: list[BaseException] = []
    app = create_app(settings(tmp_path), backbone=tiny_backbone, on_load_failure=failures.append)
    with TestClient(app) as client:
        for _ in range(200):
            if failures:
                break
            threading.Event().wait(0.05)
        assert client.get("/health").status_code == 503
    (error,) = failures
    assert "chown -R" in str(error) and "/data/store/manifest.json" in str(error)
    lines = [r for r in caplog.records if "could not start" in r.getMessage()]
    assert lines and all(r.exc_info is None for r in lines)
