"""Beyond one process: cold load from S3 against a folder, and throughput with 1 and 2 Ray Serve replicas.

Cold load: the packaged MiniLM, one delta per method; each is stored in a folder store and in an
S3 store (a local SeaweedFS, `bench/seaweedfs.py`), then read (`read_bytes`, sha256 checked) and
prepared (`prepare_delta`) as a cache miss does; the median of `repeats` tries of each.

Throughput: `tasks` deltas (methods in turn) in one S3 store; `clients` concurrent httpx clients
send `requests` single-text predicts (tasks in turn), closed loop. Ray Serve with 1 replica (2
threads), then with 2 replicas (1 thread each), behind Ray's HTTP proxy, each measured in rounds
alternating with the single-process server (`deltaserve serve`, uvicorn, 2 torch threads, up the
whole time) as the baseline: a ratio from the same minutes. All on this machine's cores: more
replicas add processes, not cores.

    python -m bench.cluster [--requests 200] [--clients 16] [--tasks 8] [--repeats 7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from adapters_store import LocalDeltaStore, open_store
from bench.http import ServerProcess, _load, _percentile, free_port
from bench.seaweedfs import CREDENTIALS, weed_server
from bench.workload import METHODS, make_method_delta, sentences
from server.backbone import Backbone
from server.delta import prepare_delta

ROOT = Path(__file__).resolve().parents[1]


def cold_load(backbone: Backbone, s3_url: str, repeats: int) -> list[dict[str, object]]:
    spec = backbone.spec()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        stores = {"folder": LocalDeltaStore(folder, spec), "s3": open_store(s3_url, spec, poll_interval_s=0)}
        for method in METHODS:
            data = make_method_delta(backbone, method, seed=1).to_bytes()
            row: dict[str, object] = {"method": method, "delta_bytes": len(data)}
            for kind, store in stores.items():
                store.put(method, data)
                reads, totals = [], []
                for _ in range(repeats):
                    started = time.perf_counter()
                    raw = store.read_bytes(method)
                    read = time.perf_counter() - started
                    prepare_delta(raw, backbone, method, 1)
                    reads.append(read)
                    totals.append(time.perf_counter() - started)
                row[f"{kind}_read_ms"] = statistics.median(reads) * 1000
                row[f"{kind}_load_ms"] = statistics.median(totals) * 1000
            rows.append(row)
        stores["s3"].close()
    return rows


def measure(url: str, names: list[str], texts: list[str], clients: int, requests: int) -> dict[str, float]:
    asyncio.run(_load(url, names, texts, clients, clients * 4, 120.0))  # warm-up: every replica loads the deltas
    seconds, latencies, errors = asyncio.run(_load(url, names, texts, clients, requests, 120.0))
    return {"req_per_s": requests / seconds, "p50_ms": _percentile(latencies, 0.5) * 1000,
            "p99_ms": _percentile(latencies, 0.99) * 1000, "errors": errors}


def upload(url: str, deltas: dict[str, bytes]) -> None:
    for name, data in deltas.items():
        httpx.put(f"{url}/tasks/{name}", content=data, timeout=120).raise_for_status()


def throughput(backbone_name: str | None, s3_url: str, deltas: dict[str, bytes], clients: int,
               requests: int, rounds: int = 3) -> list[dict[str, object]]:
    """Each Ray Serve setup against the single process, measured in alternating rounds (same neighbours)."""
    import ray
    from ray import serve

    from server.ray_app import application
    from server.settings import Settings

    names, texts = list(deltas), sentences(64, seed=3)
    results = []
    single = ServerProcess(s3_url, threads=2)  # type: ignore[arg-type]  (it passes str(store) to --store)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "PYTHONPATH"))}})
    try:
        upload(single.url, deltas)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        for replicas, threads in ((1, 2), (2, 1)):
            settings = Settings(store=s3_url, backbone=backbone_name, replicas=replicas, threads=threads, demo=False,
                                port=port, ray_replica_cpus=2 / replicas)
            serve.delete("deltaserve")  # the previous replicas give their CPUs back before the new ones start
            started = time.perf_counter()
            serve.run(application(settings), name="deltaserve", route_prefix="/")
            ready_s = time.perf_counter() - started
            ray_runs, single_runs = [], []
            for r in range(rounds):  # alternating, order rotating: both sides see the same neighbours
                order = [(single_runs, single.url), (ray_runs, url)]
                for runs, target in order if r % 2 == 0 else order[::-1]:
                    runs.append(measure(target, names, texts, clients, requests))
            row = {"setup": f"Ray Serve, {replicas} replica{'s' * (replicas > 1)} × {threads} thread"
                            f"{'s' * (threads > 1)}", "deploy_s": ready_s, "rounds": rounds,
                   **{k: statistics.median(run[k] for run in ray_runs) for k in ("req_per_s", "p50_ms", "p99_ms")},
                   "errors": sum(run["errors"] for run in ray_runs),
                   "single_req_per_s": statistics.median(run["req_per_s"] for run in single_runs)}
            row["ratio"] = row["req_per_s"] / row["single_req_per_s"]
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        single.stop()
        serve.shutdown()
        ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    # A stop (timeout, kill) unwinds like Ctrl-C: Ray and SeaweedFS are shut down, not left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.update({**CREDENTIALS, "PYTHONPATH": str(ROOT)})
    backbone = Backbone.load(device="cpu")
    deltas = {f"task{i:02d}": make_method_delta(backbone, METHODS[i % len(METHODS)], seed=i).to_bytes()
              for i in range(args.tasks)}
    with tempfile.TemporaryDirectory() as data, weed_server(Path(data)) as endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        cold = cold_load(backbone, f"s3://bench/cold-{uuid.uuid4().hex[:6]}", args.repeats)
        print("| method | delta bytes | read: folder | read: S3 | read + prepare: folder | read + prepare: S3 |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in cold:
            print(f"| {r['method']} | {r['delta_bytes']:,} | {r['folder_read_ms']:.1f} ms | {r['s3_read_ms']:.1f} ms "
                  f"| {r['folder_load_ms']:.1f} ms | {r['s3_load_ms']:.1f} ms |", flush=True)
        runs = throughput(None, f"s3://bench/serve-{uuid.uuid4().hex[:6]}", deltas, args.clients, args.requests)
    print(f"\n{args.clients} clients, {args.requests} single-text predicts over {args.tasks} tasks, medians of "
          "rounds alternating with the single process (uvicorn, 2 threads)")
    print("| setup | req/s | 1 process, same rounds | ratio | p50 | p99 | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['setup']} | {r['req_per_s']:.1f} | {r['single_req_per_s']:.1f} | {r['ratio']:.2f}× "
              f"| {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms | {r['errors']} |")
    if args.json:
        args.json.write_text(json.dumps({"cold_load": cold, "throughput": runs}, indent=2))


if __name__ == "__main__":
    main()
