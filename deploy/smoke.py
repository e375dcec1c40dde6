"""Build the image and run both compose files for real, checking what the deployment docs promise.

The unit tests check the deployment files without a Docker engine; this script is the real run (issue 23,
item 8): it builds the image, starts `docker-compose.yml` and `docker-compose.cluster.yml` with a real
dockerd and compose, checks each promise with a real HTTP client, prints one line per check and removes
what it started (its own compose project names, their containers and volumes). Exit status 1 when a check
failed. It takes several minutes and most of the machine's CPU while the image builds.

    python deploy/smoke.py      # python:3.11-slim, PyTorch's CPU index, Docker Hub's nginx and SeaweedFS
    python deploy/smoke.py --offline deltaserve-base:bookworm --torch-wheels /opt/wheels
        # no registry: the base from deploy/offline/base-image.sh, nginx and SeaweedFS stand-ins built on it,
        # torch's CPU wheel from a local folder served as the torch index (see docs/deployment.md)

The checks:
  image     build time and size; no triton; the torch build is the CPU index's; the layers from the source
            copy on are small (a source edit rebuilds only them); a torch index that cannot be reached fails
            the build; a bind mount the image's user cannot write stops the server with one line naming
            `chown -R 10001`, no traceback
  single    health (and docker's healthcheck), a prediction from every demo task, the admin token on uploads,
            the store volume across `down` and `up`, a graceful `stop` with requests in flight (each answered)
  cluster   nginx round robin over two replicas on one SeaweedFS store, an upload seen through both, one
            replica stopped while requests keep coming (statuses and latencies through the stop and after),
            the replica back in rotation, and each service's exit code on `stop`
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import secrets
import shutil
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
IMAGE = "deltaserve:latest"  # the name both compose files give the image they build
SINGLE_PROJECT, CLUSTER_PROJECT = "deltaserve-smoke", "deltaserve-smoke-cluster"
POSITIVE = "A gripping, beautifully acted film: the best I have seen this year."
NER_TEXT = "Angela Merkel met Barack Obama in Washington."
# A graceful stop is checked with requests that are still waiting when SIGTERM comes: 32 requests, sent
# 2 s before the stop. Their size comes from a timed request on the running container: enough sentences
# that the work outlasts the 2 s by INFLIGHT_SPARE_S (32 one-sentence requests were all answered before
# the stop on a quiet machine, proving nothing), and no more, so that it fits the server's shutdown grace
# (45 s) where the containers get a sliver of the CPU (one sentence each was the size there).
INFLIGHT_REQUESTS, INFLIGHT_SETTLE_S, INFLIGHT_SPARE_S = 32, 2.0, 4.0
# The server's default `max_inputs` (server/settings.py; the compose files keep it): a bigger request is a
# 413. Written here, not imported: this script checks the image from outside, as a client, without the project.
MAX_INPUTS = 64


@dataclass
class Report:
    """One line per check, PASS or FAIL, and the figures worth recording."""

    failures: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        print(f"{'PASS' if ok else 'FAIL'}  {name}{': ' + detail if detail else ''}", flush=True)
        if not ok:
            self.failures.append(name)
        return ok

    def note(self, text: str) -> None:
        print(f"      {text}", flush=True)


def run(*args: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 1800,
        capture: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=capture, text=True, env=env, cwd=REPO, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def compose_command() -> list[str]:
    """docker-compose (1.x, as on the machine the docs' figures come from), else the docker compose plugin."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if run("docker", "compose", "version", check=False).returncode == 0:
        return ["docker", "compose"]
    sys.exit("smoke: neither docker-compose nor the docker compose plugin is installed")


@contextlib.contextmanager
def wheel_index(folder: Path, port: int) -> Iterator[str]:
    """Serve a folder holding torch's CPU wheel as a one-package index on 127.0.0.1, named .../whl/cpu so
    that the Dockerfile's check of the torch build's variant applies as to PyTorch's own index. The port is
    fixed: the index's URL is a build argument, and a new one would rebuild every layer after it."""
    wheels = sorted(folder.glob("torch-*+cpu-*.whl"))
    if not wheels:
        sys.exit(f"smoke: no torch-*+cpu-*.whl in {folder}")
    root = Path(tempfile.mkdtemp(prefix="deltaserve-torch-index."))
    (root / "whl" / "cpu" / "torch").mkdir(parents=True)
    for wheel in wheels:
        (root / "whl" / "cpu" / "torch" / wheel.name).symlink_to(wheel.resolve())

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args) -> None:
            pass

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/whl/cpu"
    finally:
        server.shutdown()
        shutil.rmtree(root)


def layer_sizes(image: str) -> list[tuple[int, str]]:
    """(bytes, instruction) of each layer, oldest first."""
    out = run("docker", "history", "--no-trunc", "--human=false", "--format", "{{.Size}}\t{{.CreatedBy}}", image)
    rows = [line.split("\t", 1) for line in out.stdout.splitlines()]
    return [(int(size), created) for size, created in reversed(rows)]


def build_args(args: argparse.Namespace, torch_index: str) -> list[str]:
    flags = ["--build-arg", f"BASE_IMAGE={args.base_image}", "--build-arg", f"TORCH_INDEX_URL={torch_index}"]
    if os.environ.get("PIP_INDEX_URL"):
        flags += ["--build-arg", f"PIP_INDEX_URL={os.environ['PIP_INDEX_URL']}"]
    if args.build_network:
        flags += ["--network", args.build_network]
    return flags


def check_image(args: argparse.Namespace, report: Report, torch_index: str) -> None:
    if not args.skip_build:
        started = time.monotonic()
        build = run("docker", "build", "--force-rm", "-t", IMAGE, *build_args(args, torch_index),
                    *(["--no-cache"] if args.no_cache else []), ".", check=False)
        seconds = time.monotonic() - started
        cached = build.stdout.count("Using cache")
        if not report.check("image builds", build.returncode == 0,
                            f"{seconds:.0f} s ({cached} steps from the cache; base {args.base_image})"):
            print(build.stdout[-3000:], build.stderr[-3000:])
            raise SystemExit(1)
    size = int(run("docker", "image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    report.note(f"image {IMAGE}: {size / 1e9:.2f} GB")
    layers = layer_sizes(IMAGE)
    for nbytes, created in layers:
        if nbytes > 1_000_000:
            report.note(f"layer {nbytes / 1e6:8.1f} MB  {created.removeprefix('/bin/sh -c ')[:90]}")
    source_copy = next(i for i, (_, created) in enumerate(layers) if "COPY dir:" in created)
    after = sum(nbytes for nbytes, _ in layers[source_copy:])
    report.check("a source edit rebuilds only small layers", after < 50_000_000,
                 f"the source copy and the layers after it: {after / 1e6:.1f} MB")
    packages = run("docker", "run", "--rm", "--entrypoint", "pip", IMAGE, "list", "--format=freeze").stdout
    torch = next((line for line in packages.splitlines() if line.lower().startswith("torch==")), "none")
    report.check("no triton in the CPU image", "triton" not in packages.lower())
    report.check("torch is the CPU build", torch.endswith("+cpu"), torch)

    started = time.monotonic()
    unreachable = run("docker", "build", "--force-rm", "-t", "deltaserve:smoke-unreachable",
                      *build_args(args, "http://127.0.0.1:9/whl/cpu"), ".", check=False)
    output = unreachable.stdout + unreachable.stderr
    report.check("an unreachable torch index fails the build", unreachable.returncode != 0
                 and "No matching distribution found for torch" in output,
                 f"exit {unreachable.returncode} after {time.monotonic() - started:.0f} s")
    run("docker", "image", "rm", "deltaserve:smoke-unreachable", check=False)

    with tempfile.TemporaryDirectory(prefix="deltaserve-bind.") as folder:
        os.chmod(folder, 0o755)  # the host user's (root's) folder: uid 10001 may read it, not write it
        started = time.monotonic()
        bad = run("docker", "run", "--rm", "-v", f"{folder}:/data", "-e", "DELTASERVE_ADMIN_TOKEN=x", IMAGE,
                  check=False, timeout=600)
        lines = [line for line in (bad.stdout + bad.stderr).splitlines() if line.strip()]
        hint = [line for line in lines if "chown -R 10001" in line]
        report.check("a bind mount uid 10001 cannot write: one line with the fix, no traceback",
                     bad.returncode == 3 and len(hint) == 1 and "Traceback" not in bad.stdout + bad.stderr,
                     f"exit {bad.returncode} after {time.monotonic() - started:.0f} s")
        for line in hint:
            report.note(line[:400])


def wait_healthy(url: str, seconds: float = 1800) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=5).status_code == 200:
                return time.monotonic() - started
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy within {seconds:.0f} s")


def wait_inside(container_id: str, seconds: float = 1800) -> bool:
    """The server's /health from inside its container (a replica publishes no port)."""
    probe = "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=60)"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if run("docker", "exec", container_id, "python", "-c", probe, check=False, timeout=300).returncode == 0:
            return True
        time.sleep(5)
    return False


def container(project: str, service: str) -> str:
    return run("docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}",
               "--filter", f"label=com.docker.compose.service={service}").stdout.split()[0]


def docker_health(container_id: str, seconds: float = 1800) -> str:
    """Docker's own healthcheck status, once `healthy` (a slow start may pass through `unhealthy`: the
    first success makes it healthy), or the last one seen when the time is up."""
    deadline = time.monotonic() + seconds
    status = "starting"
    while time.monotonic() < deadline:
        status = run("docker", "inspect", "--format", "{{.State.Health.Status}}", container_id).stdout.strip()
        if status == "healthy":
            break
        time.sleep(2)
    return status


def predict_every_task(base: str, report: Report, headers: dict[str, str]) -> list[str]:
    tasks = httpx.get(f"{base}/tasks", headers=headers, timeout=30).json()["tasks"]
    names = [task["name"] for task in tasks]
    for task in tasks:
        token_task = task["task_type"] == "token-classification"
        text = NER_TEXT if token_task else POSITIVE
        answer = httpx.post(f"{base}/tasks/{task['name']}/predict", json={"inputs": [text]}, headers=headers,
                            timeout=300)
        if answer.status_code != 200:
            report.check(f"predict {task['name']}", False, f"{answer.status_code} {answer.text[:200]}")
            continue
        prediction = answer.json()["predictions"][0]
        if token_task:
            entities = {(e["text"], e["label"]) for e in prediction["entities"]}
            report.check(f"predict {task['name']}", ("Angela Merkel", "PER") in entities,
                         ", ".join(f"{text}/{label}" for text, label in sorted(entities)))
        else:
            report.check(f"predict {task['name']}", prediction["label"] == "positive",
                         f"{prediction['label']} {prediction['score']:.3f}")
    return names


def check_single(args: argparse.Namespace, report: Report, compose: list[str]) -> None:
    token = secrets.token_urlsafe(16)
    env = {**os.environ, "DELTASERVE_ADMIN_TOKEN": token, "DELTASERVE_PORT": str(args.port)}
    project = [*compose, "-p", SINGLE_PROJECT, "-f", "docker-compose.yml"]
    base = f"http://127.0.0.1:{args.port}"
    try:
        run(*project, "up", "-d", "--no-build", env=env)
        report.check("single: /health answers 200", True, f"{wait_healthy(f'{base}/health'):.0f} s after `up`")
        health = docker_health(container(SINGLE_PROJECT, "deltaserve"))
        report.check("single: docker's healthcheck", health == "healthy", health)
        names = predict_every_task(base, report, {})
        report.note(f"tasks: {', '.join(names)}")

        delta = (REPO / "demo" / "sst2-mask.safetensors").read_bytes()
        url = f"{base}/tasks/smoke-upload"
        anonymous = httpx.put(url, content=delta, timeout=60).status_code
        wrong = httpx.put(url, content=delta, headers={"Authorization": "Bearer not-the-token"}, timeout=60).status_code
        right = httpx.put(url, content=delta, headers={"Authorization": f"Bearer {token}"}, timeout=120)
        report.check("single: uploads need the admin token", (anonymous, wrong, right.status_code) == (401, 401, 201),
                     f"none {anonymous}, wrong {wrong}, right {right.status_code}")
        uploaded = right.json() if right.status_code == 201 else {}

        run(*project, "down", env=env)  # the container goes; the named volume stays
        run(*project, "up", "-d", "--no-build", env=env)
        wait_healthy(f"{base}/health")
        again = httpx.get(url, timeout=30)
        report.check("single: the store volume survives down and up", again.status_code == 200
                     and again.json().get("sha256") == uploaded.get("sha256"),
                     f"{again.status_code}, version {again.json().get('version') if again.status_code == 200 else '-'}")

        graceful_stop(report, project, env, base)
    finally:
        run(*project, "down", "-v", env=env, check=False)


def inflight_request_size(base: str) -> int:
    """Sentences per in-flight request so that the 32 outlast the settle time by INFLIGHT_SPARE_S on this
    machine, from the time of one warm 16-sentence request (the engine batches them alike)."""
    body = {"inputs": [f"{POSITIVE} ({row})" for row in range(16)]}
    httpx.post(f"{base}/tasks/sst2-mask/predict", json=body, timeout=120)  # warm
    started = time.monotonic()
    httpx.post(f"{base}/tasks/sst2-mask/predict", json=body, timeout=120).raise_for_status()
    per_sentence = (time.monotonic() - started) / 16
    wanted = (INFLIGHT_SETTLE_S + INFLIGHT_SPARE_S) / per_sentence / INFLIGHT_REQUESTS
    return max(1, min(MAX_INPUTS, round(wanted)))


def graceful_stop(report: Report, project: list[str], env: dict[str, str], base: str) -> None:
    """32 requests in flight, then compose's stop (SIGTERM; stop_grace_period 60 s): every one answered 200,
    the container exits 0 by itself."""
    sent = threading.Barrier(INFLIGHT_REQUESTS + 1)
    results: list[tuple[int, float, str]] = []
    size = inflight_request_size(base)

    def one(number: int) -> None:
        with httpx.Client(timeout=120) as client:
            client.get(f"{base}/health")  # connected before the stop: a new connection is refused after it
            sent.wait()
            inputs = [f"{POSITIVE} ({number}.{row})" for row in range(size)]
            try:
                answer = client.post(f"{base}/tasks/sst2-mask/predict", json={"inputs": inputs})
                status, detail = answer.status_code, "" if answer.status_code == 200 else answer.text[:160]
            except httpx.HTTPError as err:
                status, detail = 0, repr(err)
            results.append((status, time.monotonic(), detail))

    cid = container(SINGLE_PROJECT, "deltaserve")
    with ThreadPoolExecutor(INFLIGHT_REQUESTS) as pool:
        futures = [pool.submit(one, i) for i in range(INFLIGHT_REQUESTS)]
        sent.wait()
        time.sleep(INFLIGHT_SETTLE_S)  # the requests have reached the server
        signal_at = time.monotonic()
        run(*project, "stop", env=env, timeout=300)
        stopped_after = time.monotonic() - signal_at
        for future in futures:
            future.result()
    answered = sum(1 for status, _, _ in results if status == 200)
    after_signal = sum(1 for status, at, _ in results if status == 200 and at > signal_at)
    exit_code = run("docker", "inspect", "--format", "{{.State.ExitCode}}", cid).stdout.strip()
    ok = report.check("single: graceful stop answers every request in flight",
                      answered == INFLIGHT_REQUESTS and after_signal > 0 and exit_code == "0",
                      f"{answered} of {INFLIGHT_REQUESTS} requests of {size} sentences answered 200 "
                      f"({after_signal} after SIGTERM), stop took "
                      f"{stopped_after:.1f} s, exit code {exit_code}")
    refused = sorted((r for r in results if r[0] != 200), key=lambda r: r[1])
    for status, at, detail in refused[:5]:  # what the first refusals said, and when
        report.note(f"{status} at {at - signal_at:+.1f} s from SIGTERM: {detail}")
    if not ok:
        report.note(run("docker", "logs", "--tail", "15", cid, check=False).stderr[-3000:])


@dataclass
class Sample:
    at: float
    seconds: float
    status: int
    upstream: str


def traffic(base: str, stop: threading.Event, samples: list[Sample]) -> None:
    """Sequential predicts through nginx, one client, until stopped (what a user of the cluster sees)."""
    with httpx.Client(timeout=90) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                answer = client.post(f"{base}/tasks/sst2-mask/predict", json={"inputs": POSITIVE})
                status, upstream = answer.status_code, answer.headers.get("x-deltaserve-upstream", "")
            except httpx.HTTPError:
                status, upstream = 0, ""
            samples.append(Sample(started, time.monotonic() - started, status, upstream))
            time.sleep(0.1)


def describe(samples: list[Sample]) -> str:
    if not samples:
        return "no requests"
    times = sorted(s.seconds for s in samples)
    bad = [s.status for s in samples if s.status != 200]
    return (f"{len(samples)} requests, {len(samples) - len(bad)} answered 200 (others: {sorted(set(bad)) or '-'}); "
            f"latency median {statistics.median(times) * 1000:.0f} ms, max {times[-1] * 1000:.0f} ms, "
            f"{sum(t > 1 for t in times)} over 1 s")


def check_cluster(args: argparse.Namespace, report: Report, compose: list[str]) -> None:
    token = os.environ.get("DELTASERVE_ADMIN_TOKEN") or secrets.token_urlsafe(16)
    env = {**os.environ, "DELTASERVE_ADMIN_TOKEN": token, "DELTASERVE_PORT": str(args.port)}
    if args.nginx_image:
        env["NGINX_IMAGE"] = args.nginx_image
    if args.seaweedfs_image:
        env["SEAWEEDFS_IMAGE"] = args.seaweedfs_image
    project = [*compose, "-p", CLUSTER_PROJECT, "-f", "docker-compose.cluster.yml"]
    base = f"http://127.0.0.1:{args.port}"
    try:
        started = time.monotonic()
        # The replicas first, then nginx: compose's `up` gives up on nginx when a replica it depends on is
        # reported unhealthy, as a start slower than the healthcheck's start period is, or a healthcheck
        # that cannot start its Python within its timeout on a starved machine.
        run(*project, "up", "-d", "--no-build", "replica-a", "replica-b", env=env, timeout=1800)
        for service in ("replica-a", "replica-b"):
            report.check(f"cluster: {service} answers /health", wait_inside(container(CLUSTER_PROJECT, service)),
                         f"{time.monotonic() - started:.0f} s after `up`")
        whole = run(*project, "up", "-d", "--no-build", env=env, timeout=1800, check=False)
        if not report.check("cluster: compose starts nginx once the replicas are healthy", whole.returncode == 0,
                            whole.stderr.strip().splitlines()[-1] if whole.returncode else ""):
            run(*project, "up", "-d", "--no-build", "--no-deps", "nginx", env=env)  # to check the rest anyway
        wait_healthy(f"{base}/health")
        report.check("cluster: up, nginx answers /health", True, f"{time.monotonic() - started:.0f} s after `up`")
        names = predict_every_task(base, report, {})
        report.note(f"tasks: {', '.join(names)}")
        replicas = {service: run("docker", "inspect", "--format",
                                 "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                                 container(CLUSTER_PROJECT, service)).stdout.strip() + ":8000"
                    for service in ("replica-a", "replica-b")}
        name_of = {address: service for service, address in replicas.items()}

        def upstreams(count: int, task: str = "sst2-mask") -> dict[str, int]:
            seen: dict[str, int] = {}
            for _ in range(count):
                answer = httpx.post(f"{base}/tasks/{task}/predict", json={"inputs": POSITIVE}, timeout=300)
                key = name_of.get(answer.headers.get("x-deltaserve-upstream", ""), "?") \
                    if answer.status_code == 200 else str(answer.status_code)
                seen[key] = seen.get(key, 0) + 1
            return seen

        spread = upstreams(10)
        report.check("cluster: nginx spreads requests over both replicas", set(spread) == set(replicas), str(spread))
        put = httpx.put(f"{base}/tasks/smoke-shared", content=(REPO / "demo" / "sst2-mask.safetensors").read_bytes(),
                        headers={"Authorization": f"Bearer {token}"}, timeout=120)
        time.sleep(2)  # the other replica follows the S3 manifest within --store-poll-s (1 s)
        shared = upstreams(10, "smoke-shared")
        report.check("cluster: an upload through one replica is served by both", put.status_code == 201
                     and set(shared) == set(replicas), f"PUT {put.status_code}, then {shared}")

        # One replica stopped while a client keeps sending: its drain (503 -> the other replica), then its
        # absence (connections time out -> the other replica, and it is out of rotation for fail_timeout).
        samples: list[Sample] = []
        stop = threading.Event()
        client = threading.Thread(target=traffic, args=(base, stop, samples))
        client.start()
        time.sleep(5)
        stop_at = time.monotonic()
        run(*project, "stop", "replica-a", env=env, timeout=120)
        gone_at = time.monotonic()
        time.sleep(args.failover_s)
        stop.set()
        client.join()
        before = [s for s in samples if s.at < stop_at]
        during = [s for s in samples if stop_at <= s.at < gone_at]
        after = [s for s in samples if s.at >= gone_at]
        report.note(f"before the stop: {describe(before)}")
        report.note(f"while replica-a stopped ({gone_at - stop_at:.1f} s): {describe(during)}")
        report.note(f"replica-a gone, {args.failover_s:.0f} s: {describe(after)}")
        # A request may pay nginx's proxy_connect_timeout (2 s) once before the other replica answers it;
        # never nginx's default 60 s.
        limit = 2 + max((s.seconds for s in before), default=0) + 1
        slowest = max((s.seconds for s in during + after), default=0)
        report.check("cluster: with a replica stopped every request is answered, none waits past the connect "
                     "timeout", all(s.status == 200 for s in during + after) and slowest < limit and len(after) > 3,
                     f"slowest {slowest * 1000:.0f} ms (limit {limit * 1000:.0f} ms: 2 s + the slowest before + 1 s)")

        run(*project, "start", "replica-a", env=env)
        report.check("cluster: replica-a answers /health again", wait_inside(container(CLUSTER_PROJECT, "replica-a")))
        time.sleep(12)  # nginx's fail_timeout for the replica it had taken out
        spread = upstreams(10)
        report.check("cluster: replica-a back in rotation", set(spread) == set(replicas), str(spread))

        services = ("nginx", "replica-a", "replica-b", "seaweedfs")
        ids = {service: container(CLUSTER_PROJECT, service) for service in services}
        started = time.monotonic()
        run(*project, "stop", env=env, timeout=300)
        codes = {service: run("docker", "inspect", "--format", "{{.State.ExitCode}}", cid).stdout.strip()
                 for service, cid in ids.items()}
        report.check("cluster: every service stops by itself (exit 0, none killed)",
                     all(code == "0" for code in codes.values()),
                     f"{codes}, {time.monotonic() - started:.1f} s")
    finally:
        run(*project, "down", "-v", env=env, check=False)


def build_stand_ins(base: str, report: Report) -> tuple[str, str]:
    """nginx and SeaweedFS images on the offline base (deploy/offline/*.Dockerfile)."""
    images = {"nginx": "deltaserve-offline/nginx:bookworm", "seaweedfs": "deltaserve-offline/seaweedfs:4.48"}
    for name, tag in images.items():
        started = time.monotonic()
        run("docker", "build", "-t", tag, "--build-arg", f"BASE_IMAGE={base}",
            "-f", f"deploy/offline/{name}.Dockerfile", "deploy/offline")
        report.check(f"offline stand-in {tag} builds", True, f"{time.monotonic() - started:.0f} s")
    return images["nginx"], images["seaweedfs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-image", default=os.environ.get("DELTASERVE_BASE_IMAGE", "python:3.11-slim"))
    parser.add_argument("--torch-index-url", default=os.environ.get("DELTASERVE_TORCH_INDEX_URL",
                                                                    "https://download.pytorch.org/whl/cpu"))
    parser.add_argument("--torch-wheels", type=Path, help="a folder with torch's CPU wheel, served as the torch index "
                        "(the build then uses the host's network to reach it)")
    parser.add_argument("--torch-wheels-port", type=int, default=8765)
    parser.add_argument("--offline", metavar="BASE", help="no registry: BASE (deploy/offline/base-image.sh) is the "
                        "image's base, and nginx and SeaweedFS stand-ins are built on it")
    parser.add_argument("--build-network", help="docker build --network (host: the build sees the host's network)")
    parser.add_argument("--nginx-image", default=os.environ.get("NGINX_IMAGE"))
    parser.add_argument("--seaweedfs-image", default=os.environ.get("SEAWEEDFS_IMAGE"))
    parser.add_argument("--port", type=int, default=18080, help="the host port of the server (and of nginx)")
    parser.add_argument("--failover-s", type=float, default=30, help="seconds of traffic after a replica is gone")
    parser.add_argument("--skip-build", action="store_true", help=f"use the {IMAGE} already built")
    parser.add_argument("--no-cache", action="store_true", help="build every layer again (a cold build's time)")
    parser.add_argument("--only", choices=["image", "single", "cluster"], action="append")
    args = parser.parse_args()
    parts = args.only or ["image", "single", "cluster"]
    report, compose = Report(), compose_command()
    server = run("docker", "version", "--format", "docker {{.Server.Version}}").stdout.strip()
    compose_version = run(*compose, "version", "--short", check=False).stdout.strip() or compose[0]
    print(f"smoke: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.uname().nodename}, "
          f"{os.cpu_count()} CPUs; {server}, compose {compose_version}", flush=True)
    if args.offline:
        args.base_image = args.offline
        if "cluster" in parts:
            args.nginx_image, args.seaweedfs_image = build_stand_ins(args.offline, report)
    with contextlib.ExitStack() as stack:
        torch_index = args.torch_index_url
        if args.torch_wheels:
            torch_index = stack.enter_context(wheel_index(args.torch_wheels, args.torch_wheels_port))
            args.build_network = args.build_network or "host"
        if "image" in parts:
            check_image(args, report, torch_index)
    if "single" in parts:
        check_single(args, report, compose)
    if "cluster" in parts:
        check_cluster(args, report, compose)
    failed = ", ".join(report.failures)
    print(f"smoke: {len(report.failures)} check(s) failed{': ' + failed if failed else ''}")
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
