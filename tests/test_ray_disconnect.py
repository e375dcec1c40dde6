"""Ray Serve: a predict whose client goes away while it waits in a replica's queue never reaches the engine,
as on the plain server (tests/test_abandoned_requests.py), and is counted the same way.

One replica with a folder store, on the suite's one Ray instance (tests/conftest.py). Its
`@serve.batch` waits (almost) forever for a second request, so the first one is certainly still
queued when its client closes the connection; the batch formed next holds the abandoned
request's place and only the live rows are computed.
"""

from __future__ import annotations

import concurrent.futures
import re

import httpx
import pytest
from delta_builders import build_delta
from http_helpers import ADMIN, free_port
from test_abandoned_requests import send_predict, wait_until
from test_http_lifecycle import save_backbone

from server.settings import Settings

serve = pytest.importorskip("ray.serve")
from server.ray_app import application  # noqa: E402 (needs ray)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=ADMIN, timeout=30).text
    found = re.search(rf"^{name} (\S+)", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_request_abandoned_in_the_replica_queue_never_reaches_the_engine(ray_instance, tokenizer, tmp_path):
    backbone = save_backbone(tokenizer, tmp_path / "backbone")
    settings = Settings(store=str(tmp_path / "store"), backbone=str(tmp_path / "backbone"), replicas=1, threads=1,
                        demo=False, admin_token="s3cret", max_batch_requests=2, batch_wait_ms=600_000,
                        host="127.0.0.1", port=free_port(), ray_replica_cpus=0.5)
    url = f"http://{settings.host}:{settings.port}"
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(application(settings), name="deltaserve", route_prefix="/")
        assert httpx.put(f"{url}/tasks/t", content=build_delta(backbone), headers=ADMIN,
                         timeout=60).status_code == 201
        gone = send_predict(url, ["gone"])
        wait_until(lambda: metric(url, "deltaserve_queue_depth") == 1, "the request queued in the replica", 60)
        gone.close()  # the client goes away
        wait_until(lambda: metric(url, "deltaserve_queue_depth") == 0, "the abandoned request dropped", 60)
        assert metric(url, "deltaserve_abandoned_total") == 1

        # The next batch (two requests) takes the abandoned request's place and then a live one's: three live
        # requests fill it and one more, and only their rows are computed.
        def ask(text: str) -> httpx.Response:
            return httpx.post(f"{url}/tasks/t/predict", json={"inputs": [text]}, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(ask, ["alive 1", "alive 2", "alive 3"]))
        assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
        assert metric(url, "deltaserve_batch_rows_sum") == 3  # "gone" never reached the engine
        assert metric(url, "deltaserve_batch_requests_sum") == 3
    finally:
        serve.shutdown()
