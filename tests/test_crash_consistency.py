"""Crash consistency: a server SIGKILLed during concurrent uploads restarts onto a consistent store.

After each kill: every listed version's sha256 is the sha256 of a file some client uploaded
under that name, no version is below one the server acknowledged, the files on disk are
exactly the listed versions (no temp files, no strays), and the tasks answer.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from delta_builders import build_delta
from http_helpers import free_port
from test_http_lifecycle import REPO, save_backbone

NAMES = ("alpha", "beta", "gamma")
TOKEN = "crash-test-token"


def start(backbone_dir: Path, store: Path, token_file: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "DELTASERVE_ADMIN_TOKEN_FILE": str(token_file)}
    env.pop("DELTASERVE_ADMIN_TOKEN", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--backbone", str(backbone_dir), "--port", str(port),
         "--store", str(store), "--no-demo", "--threads", "1", "--log-level", "warning"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)


def test_sigkill_during_uploads_leaves_a_consistent_store(tokenizer, tmp_path):
    backbone = save_backbone(tokenizer, tmp_path / "backbone")
    store = tmp_path / "store"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    uploaded: dict[str, set[str]] = {name: set() for name in NAMES}
    acknowledged: dict[str, int] = {}  # name -> highest version a 200/201 reported
    lock = threading.Lock()
    seeds = iter(range(10_000))

    def uploader(url: str, stop: threading.Event) -> None:
        with httpx.Client(base_url=url, timeout=30, headers=headers) as client:
            while not stop.is_set():
                with lock:
                    seed = next(seeds)
                name = NAMES[seed % len(NAMES)]
                data = build_delta(backbone, parts=("lora", "sparse"), seed=seed)
                with lock:
                    uploaded[name].add(hashlib.sha256(data).hexdigest())
                try:
                    response = client.put(f"/tasks/{name}", content=data)
                except httpx.HTTPError:
                    return  # the server died under us
                assert response.status_code in (200, 201), response.text
                with lock:
                    acknowledged[name] = max(acknowledged.get(name, 0), response.json()["version"])

    for round_ in range(1):  # one kill: each server start costs seconds of the suite's budget
        port = free_port()
        process = start(tmp_path / "backbone", store, token_file, port)
        url = f"http://127.0.0.1:{port}"
        try:
            stop = threading.Event()
            threads = [threading.Thread(target=uploader, args=(url, stop)) for _ in range(6)]
            for thread in threads:
                thread.start()
            time.sleep(1.5 + round_)  # uploads in full flow
            process.send_signal(signal.SIGKILL)
            process.wait(30)
            stop.set()
            for thread in threads:
                thread.join(30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert sum(len(v) for v in uploaded.values()) > 6, "too few uploads before the kill to test anything"

        process = start(tmp_path / "backbone", store, token_file, free_port())
        try:
            url = f"http://127.0.0.1:{process.args[process.args.index('--port') + 1]}"
            listed = httpx.get(f"{url}/tasks").json()["tasks"]
            for task in listed:
                assert task["sha256"] in uploaded[task["name"]], task
                assert task["version"] >= acknowledged.get(task["name"], 0), (task, acknowledged)
                answer = httpx.post(f"{url}/tasks/{task['name']}/predict", json={"inputs": "after the crash"})
                assert answer.status_code == 200 and answer.json()["version"] == task["version"]
            assert {t["name"] for t in listed} >= set(acknowledged)  # nothing acknowledged was lost
            on_disk = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())
            expected = sorted(["manifest.json"] + [f"deltas/{t['name']}/{t['version']}.safetensors" for t in listed])
            assert on_disk == expected, "temp files or stray versions left after restart"
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
