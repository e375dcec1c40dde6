"""Every `curl` example of README.md and docs/*.md, run with the real curl against a live `deltaserve serve` with
the packaged MiniLM and the demo tasks: each must answer 2xx, and every JSON key that the documented answer
below it shows (`# {"task": ..., ...}`) must be in the live answer (issue 23 item 7: the README showed an
answer the server no longer gave).

A ```json block under a heading "### `GET /path`" is the documented answer of `curl -s localhost:8000/path`;
those run first, on the server with the four demo tasks, each asked once, and their top-level values must match
too. Then the curl lines run in the order the documents give them (README first), in a folder holding
`my-task.safetensors` (a copy of a demo delta), with `$TOKEN` the server's admin token. A live key that the
document does not show is a problem unless the document marks a cut with "..." or "…".
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from http_helpers import free_port

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOKEN = "s3cret"
FENCE = re.compile(r"^```(?:bash|sh|shell|console)?\s*$")
# A documented answer under a heading "### `GET /path`" (docs/http-api.md) is checked as `curl -s` of the path.
GET_HEADING = re.compile(r"^#+ `GET (/[^`{}\s]*)`\s*$")
# Top-level values that depend on what the server did before (the device cache), not on the code.
VOLATILE = {"resident_delta_bytes", "queue_depth"}

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("curl") is None, reason="no curl here")]


@dataclass
class Example:
    where: str  # file:line
    command: str
    documented: str  # the comment lines under it: the answer the document shows, if any
    from_heading: bool = False  # a ```json block under "### `GET /path`", not a curl line


def examples() -> list[Example]:
    found: list[Example] = []
    for path in DOCUMENTS:
        lines = path.read_text().splitlines()
        in_fence = inside = False  # in a fenced block; in a shell one
        get_path: str | None = None  # the route of the last "### `GET /path`" heading
        i = 0
        while i < len(lines):
            line = lines[i]
            if not in_fence and line.startswith("#"):
                match = GET_HEADING.match(line)
                get_path = match.group(1) if match else None
            if line.startswith("```json") and not in_fence and get_path:
                end = lines.index("```", i + 1)
                found.append(Example(f"{path.relative_to(REPO)}:{i + 1}", f"curl -s localhost:8000{get_path}",
                                     "\n".join(lines[i + 1:end]), from_heading=True))
                get_path = None
                i = end + 1
                continue
            if line.startswith("```"):
                in_fence = not in_fence
                inside = in_fence and bool(FENCE.match(line))
                i += 1
                continue
            if inside and line.lstrip().startswith("curl ") and "localhost:8000" in line:
                start = i
                command = line
                while command.rstrip().endswith("\\") or command.count("'") % 2:  # continued, or a quote open
                    i += 1
                    command = command.rstrip().removesuffix("\\") + "\n" + lines[i]
                answer = []
                while i + 1 < len(lines) and lines[i + 1].lstrip().startswith("# ") \
                        and not lines[i + 1].lstrip().startswith("# curl"):
                    i += 1
                    answer.append(lines[i].lstrip()[2:])
                found.append(Example(f"{path.relative_to(REPO)}:{start + 1}", command, "\n".join(answer)))
            i += 1
    return found


def keys_of(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in keys_of(v)}
    if isinstance(value, list):
        return {k for v in value for k in keys_of(v)}
    return set()


@pytest.fixture(scope="module")
def live_url(tmp_path_factory) -> str:
    store = tmp_path_factory.mktemp("docs") / "store"
    port = free_port()
    env = {**os.environ, "DELTASERVE_ADMIN_TOKEN": TOKEN}
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--port", str(port), "--store", str(store), "--demo",
         "--threads", "2", "--log-level", "warning"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.communicate(timeout=60)


def test_the_documents_have_curl_examples():
    found = examples()
    assert len(found) >= 10 and any(e.documented for e in found)
    assert {e.where.split(":")[0] for e in found} >= {"README.md", "docs/http-api.md", "docs/protocols.md"}


def test_every_curl_example_answers_as_documented(live_url, tmp_path):
    shutil.copy(REPO / "demo" / "sst2-pasta.safetensors", tmp_path / "my-task.safetensors")
    port = live_url.rsplit(":", 1)[1]
    for task in ("sst2-mask", "sst2-pasta", "sst2-dsee", "conll-ner"):  # the answers shown are of a server in use
        assert httpx.post(f"{live_url}/tasks/{task}/predict", json={"inputs": "warm"}, timeout=60).status_code == 200
    problems: list[str] = []
    # The documented answers of GET routes first, on the server with the demo tasks, each asked once, then the
    # curl examples in the documents' order (they upload and delete `my-task`).
    for example in sorted(examples(), key=lambda e: not e.from_heading):
        args = [arg.replace("$TOKEN", TOKEN).replace("localhost:8000", f"127.0.0.1:{port}")
                for arg in shlex.split(example.command, comments=True)]
        run = subprocess.run([*args, "--max-time", "60", "--write-out", "\n%{http_code}"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        body, _, status = run.stdout.rpartition("\n")
        if run.returncode != 0 or not status.startswith("2"):
            problems.append(f"{example.where}: curl exit {run.returncode}, HTTP {status}: {body[:300]}")
            continue
        documented_keys = set(re.findall(r'"([A-Za-z_][A-Za-z0-9_]*)":', example.documented))
        if not documented_keys:
            continue
        try:
            answer = json.loads(body)
        except ValueError:
            problems.append(f"{example.where}: the document shows JSON, the server answered {body[:200]!r}")
            continue
        missing = documented_keys - keys_of(answer)
        if missing:
            problems.append(f"{example.where}: documented keys not in the live answer: {sorted(missing)}")
        # Keys the live answer has and the document leaves out: only where it marks a cut ("...", "…"),
        # not counting a number cut short (0.9907...).
        if not re.search(r"(?<![0-9])(\.\.\.|…)", example.documented):
            unshown = keys_of(answer) - documented_keys
            if unshown:
                problems.append(f"{example.where}: the live answer has keys the document does not show (nor "
                                f"marks as left out with ...): {sorted(unshown)}")
        if isinstance(answer, dict):
            for key, shown in re.findall(r'"([A-Za-z_]+)": ("[^"…]*"|-?[0-9][0-9.]*)(?=[,}\s])', example.documented):
                live = answer.get(key)
                if key in VOLATILE or isinstance(live, (dict, list)) or key not in answer or shown.endswith("..."):
                    continue
                value = json.loads(shown)
                digits = len(shown.partition(".")[2]) if isinstance(value, float) else 0
                same = round(live, digits) == value if isinstance(value, float) and isinstance(live, float) \
                    else live == value
                if not same:
                    problems.append(f"{example.where}: the document shows {key} = {shown}, the server {live!r}")
    assert not problems, "\n".join(problems)
