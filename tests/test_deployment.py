"""What the image needs to build and run anywhere, checked without a Docker engine: the healthchecks
of the Dockerfile and the compose file run for real against a server on a port that is not 8000; the
constraints file pins every runtime dependency within pyproject's ranges; and `serve` warns when it
listens beyond loopback without an admin token."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from http_helpers import free_port, live_server, settings
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from server.app import create_app
from server.cli import exposure_warning
from server.cli import main as cli_main
from server.settings import Settings

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")


def healthchecks() -> dict[str, str]:
    """The Python code of each healthcheck: the Dockerfile's HEALTHCHECK and compose's `test`."""
    dockerfile = (REPO / "Dockerfile").read_text()
    cmd = re.search(r'HEALTHCHECK[^\n]*\\\n\s*CMD python -c "([^"]+)"', dockerfile)
    compose = re.search(r'test: (\[.*\])', (REPO / "docker-compose.yml").read_text())
    assert cmd and compose, "a healthcheck is missing"
    test = json.loads(compose.group(1))
    assert test[:3] == ["CMD", "python", "-c"]
    return {"Dockerfile": cmd.group(1), "docker-compose.yml": test[3]}


def test_healthchecks_follow_the_port(tiny_backbone, tmp_path):
    with live_server(create_app(settings(tmp_path), backbone=tiny_backbone)) as url:
        port = url.rsplit(":", 1)[1]
        assert port != "8000"
        for where, code in healthchecks().items():
            run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DELTASERVE_PORT": port},
                                 capture_output=True, timeout=30)
            assert run.returncode == 0, (where, run.stderr)
    # The server gone, the same check fails: it tests something.
    for where, code in healthchecks().items():
        run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DELTASERVE_PORT": port},
                             capture_output=True, timeout=30)
        assert run.returncode != 0, where


def constraints() -> list[Requirement]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("python", ["3.10", "3.11", "3.12", "3.13"])
def test_constraints_pin_every_runtime_dependency(python):
    """For each Python the project supports: one exact pin per package, inside pyproject's range."""
    env = {"python_version": python, "python_full_version": f"{python}.0", "extra": ""}
    pins: dict[str, str] = {}
    for req in constraints():
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name not in pins, f"{name} pinned twice for Python {python}"
        (spec,) = req.specifier
        assert spec.operator == "==", f"{req} is not an exact pin"
        pins[name] = spec.version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in ("torch", "triton") or (req.marker and not req.marker.evaluate(env)):
            continue  # torch is pinned by its own install step (CPU or CUDA index); a CUDA torch pins its triton
        assert name in pins, f"{name} is not in constraints.txt for Python {python}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"
    assert Marker(f'python_version >= "{project["requires-python"].removeprefix(">=")}"').evaluate(env)


def test_image_and_ci_install_under_the_constraints():
    dockerfile, ci = ("\n".join(line for line in (REPO / name).read_text().splitlines()
                                 if not line.lstrip().startswith("#")) for name in ("Dockerfile", ".ci/run"))
    # Dependencies from the project's metadata alone (a layer that a source edit leaves), then the code.
    assert "COPY pyproject.toml README.md LICENSE constraints.txt ./" in dockerfile
    assert "pip install -c constraints.txt '.[s3]'" in dockerfile and "pip install --no-deps -e ." in dockerfile
    assert "triton" not in dockerfile.replace("no triton", "")  # the CPU image never imports it
    # Torch from its index alone (no other index to fall back on: PyPI's CUDA wheel was taken silently when
    # the CPU index could not be reached), and the installed build must be the index's variant.
    torch_step = next(line for line in dockerfile.splitlines() if '"torch==${TORCH_VERSION}"' in line)
    assert '--no-deps "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in torch_step
    assert "extra-index-url" not in dockerfile and "find-links" not in dockerfile
    assert 'installed.endswith("+" + variant)' in dockerfile
    assert "test_command" in ci and "README.md" in ci
    assert "tomllib" not in dockerfile  # Python 3.10 bases (Ubuntu 22.04) have none
    assert "python3 -m venv /opt/venv" in dockerfile and "venv --help" not in dockerfile


@pytest.mark.parametrize(("host", "token", "warns"), [
    ("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False), ("127.0.0.2", None, False),
    ("0.0.0.0", None, True), ("::", None, True), ("192.168.1.20", None, True), ("myhost.example", None, True),
    ("0.0.0.0", "s3cret", False),
])
def test_exposure_warning(host, token, warns):
    warning = exposure_warning(Settings(host=host, admin_token=token, port=8123))
    assert (warning is not None) == warns
    if warns:
        assert host in warning and "8123" in warning and "DELTASERVE_ADMIN_TOKEN" in warning


def test_serve_logs_the_warning(tmp_path, caplog, monkeypatch):
    """Through `deltaserve serve` itself: the warning comes before the backbone loads (here it cannot)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DELTASERVE_ADMIN_TOKEN", raising=False)
    (tmp_path / "no-model").mkdir()
    handler = signal.getsignal(signal.SIGTERM)
    args = ["serve", "--host", "0.0.0.0", "--port", str(free_port()), "--store", str(tmp_path / "store"),
            "--backbone", str(tmp_path / "no-model"), "--no-demo", "--log-level", "warning"]
    try:
        with caplog.at_level(logging.WARNING, logger="deltaserve"), pytest.raises(SystemExit):
            cli_main(args)
        assert any("without an admin token" in r.getMessage() for r in caplog.records if r.name == "deltaserve")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deltaserve"), pytest.raises(SystemExit):
            cli_main([*args, "--admin-token", "s3cret"])
        assert not any("without an admin token" in r.getMessage() for r in caplog.records)
    finally:
        signal.signal(signal.SIGTERM, handler)


def test_compose_follows_the_port():
    from test_cli_compose import compose_command

    command = compose_command()
    if command is None:
        pytest.skip("no compose tool here (apt-get install docker-compose, or the docker compose plugin)")
    env = {**os.environ, "DELTASERVE_ADMIN_TOKEN": "t0ken", "DELTASERVE_PORT": "9001"}
    config = subprocess.run([*command, "-f", str(REPO / "docker-compose.yml"), "config"], capture_output=True,
                            text=True, env=env, cwd=REPO, timeout=60)
    assert config.returncode == 0, config.stderr
    assert "DELTASERVE_PORT: '9001'" in config.stdout or 'DELTASERVE_PORT: "9001"' in config.stdout
    assert re.search(r"published: ['\"]?9001", config.stdout) and re.search(r"target: 9001", config.stdout)
    assert "stop_grace_period: 60s" in config.stdout or "stop_grace_period: 1m0s" in config.stdout


def torch_variant_check() -> str:
    """The Dockerfile's check that torch came from TORCH_INDEX_URL, as the shell gets it (continuations joined)."""
    joined = (REPO / "Dockerfile").read_text().replace("\\\n", "")
    match = re.search(r"python -c '([^']*version\(\"torch\"\)[^']*)'", joined)
    assert match, "the torch variant check is missing"
    return match.group(1)


@pytest.mark.parametrize(("version", "index", "ok"), [
    ("2.13.0+cpu", "https://download.pytorch.org/whl/cpu", True),
    ("2.13.0+cu126", "https://download.pytorch.org/whl/cu126/", True),
    ("2.13.0", "https://download.pytorch.org/whl/cpu", False),  # PyPI's CUDA build: the index was unreachable
    ("2.13.0+cu126", "https://download.pytorch.org/whl/cpu", False),
])
def test_the_image_refuses_a_torch_from_another_index(version, index, ok, tmp_path):
    """Run with a stand-in torch distribution (its metadata alone: the step runs before torch's dependencies
    are installed, so it cannot import torch): the build fails unless the installed build is the index's."""
    info = tmp_path / f"torch-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    run = subprocess.run([sys.executable, "-c", torch_variant_check(), index], env={"PYTHONPATH": str(tmp_path)},
                         capture_output=True, text=True, timeout=30)
    assert (run.returncode == 0) == ok, run.stderr
    if not ok:
        assert "refusing it" in run.stderr and version in run.stderr


def test_the_smoke_scripts_request_cap_is_the_servers_default(monkeypatch):
    """deploy/smoke.py sizes its in-flight requests up to the server's `max_inputs`, a constant there (it
    runs without the project): beyond the server's real default its requests would get 413."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("smoke", REPO / "deploy" / "smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "smoke", smoke)  # its dataclasses look their module up
    spec.loader.exec_module(smoke)
    assert Settings.model_fields["max_inputs"].default == smoke.MAX_INPUTS
