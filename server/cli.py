"""The `deltaserve` command (also `python -m server`): serve, inspect, push, and the trainer's commands.

`serve` has one flag per `Settings` field, generated from the settings model so that the
flags, the `DELTASERVE_*` variables, the config file's keys and the defaults can never drift
apart; a flag given on the command line wins over the environment, which wins over `--config`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError
from safetensors import safe_open

from adapters_store.format import (
    DEFAULT_POOLING,
    EMBEDDING_KEYS,
    NORM_SUFFIXES,
    InvalidDelta,
    module_part_of_suffix,
    parse_delta,
    read_metadata,
)
from server.extras import MissingExtra, check_settings, package_version
from server.logs import configure_logging
from server.settings import ConfigFileError, Settings, add_token_flags, client_token, unknown_variables
from training.cli import add_parsers


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


def command() -> typing.NoReturn:
    """The `deltaserve` command (and `python -m server`): `main()`, then exit without the interpreter's
    final garbage collection. Measured on a 2-core machine: after a drain, a served MiniLM process spent
    29 s tearing down its object graph (torch, transformers) before it exited, and in a container the
    orchestrator's kill came first, so a clean stop looked like a crash. By then nothing is left to do:
    the store commits before it answers, the atexit handlers run, the logs and streams are flushed.
    Tests call `main()` in-process; only the command exits this way."""
    try:
        code = main()
    except SystemExit as stop:  # argparse's 2, a failed start's 3, a graceful SIGTERM's 0
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaserve", description="Multi-task inference on one frozen encoder.")
    parser.add_argument("--version", action="version", version=f"deltaserve {package_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP server",
                                description="Run the HTTP server. Every flag also reads DELTASERVE_<FLAG>, and "
                                            "the config file's key <flag>; a flag wins over its variable, which "
                                            "wins over the file.")
    serve.add_argument("--config", type=Path, default=os.environ.get("DELTASERVE_CONFIG"), metavar="FILE",
                       help="settings from a TOML or YAML file, one key per flag: max_batch_tokens = 2048 "
                            "(env DELTASERVE_CONFIG)")
    _add_settings_flags(serve)
    serve.set_defaults(func=run_serve)

    inspect = commands.add_parser("inspect", help="show a delta file's metadata, parts and bytes")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--backbone", help="validate against this backbone folder (or 'packaged' for MiniLM)")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=run_inspect)

    push = commands.add_parser("push", help="upload a delta file to a running server")
    push.add_argument("file", type=Path)
    push.add_argument("--name", required=True, help="task name")
    push.add_argument("--url", default=os.environ.get("DELTASERVE_URL", "http://127.0.0.1:8000"),
                      help="the server (env DELTASERVE_URL; default http://127.0.0.1:8000)")
    add_token_flags(push)
    push.set_defaults(func=run_push)

    add_parsers(commands)
    return parser


# --------------------------------------------------------------------------- serve


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        base = _base_type(field.annotation)
        help_text = f"{field.description or ''} (env DELTASERVE_{name.upper()}; default {field.default})".strip()
        if base is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            # Values are checked by the settings model (the same check as a variable's or the file's), so a
            # Literal's choices are shown, not enforced twice.
            choices = typing.get_args(_without_none(field.annotation))
            metavar = "{" + ",".join(choices) + "}" if typing.get_origin(_without_none(field.annotation)) is \
                typing.Literal else None
            parser.add_argument(flag, dest=name, type=base if base in (int, float) else str, default=None,
                                metavar=metavar, help=help_text)


def _without_none(annotation: object) -> object:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _base_type(annotation: object) -> type:
    annotation = _without_none(annotation)
    return annotation if isinstance(annotation, type) else str


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The flags given, over the `DELTASERVE_*` variables, over `--config`'s file, over the defaults."""
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    return Settings.load(given, getattr(args, "config", None))


def run_serve(args: argparse.Namespace) -> int:

    from server.app import create_app
    from server.http_server import serve

    try:
        settings = settings_from_args(args)
    except ConfigFileError as err:
        print(f"deltaserve serve: {err}", file=sys.stderr)
        return 2
    except ValidationError as err:
        # Only the messages: pydantic's own text repeats the input, which may be a token.
        for problem in err.errors(include_url=False, include_input=False):
            where = ".".join(str(x) for x in problem["loc"])
            message = str(problem["msg"]).removeprefix("Value error, ")
            print(f"deltaserve serve: {where + ': ' if where else ''}{message}", file=sys.stderr)
        return 2
    try:
        check_settings(settings)
    except MissingExtra as err:
        print(f"deltaserve serve: {err}", file=sys.stderr)
        return 2
    uvicorn_log_config = configure_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("deltaserve")
    for problem in unknown_variables():
        log.warning(problem)
    warning = exposure_warning(settings)
    if warning:
        log.warning(warning)
    if settings.ray:
        from server.ray_app import run  # Ray only when asked for: `pip install deltaserve[cluster]`

        return run(settings, settings.log_level)
    steady_malloc(settings.malloc_threshold, settings.malloc_trim_s)
    # On SIGTERM the app stops admitting at once (503, readiness down; server.http_server.DrainingServer),
    # uvicorn stops accepting, lets accepted requests finish within the grace (what is cut answers 503),
    # then runs the app's shutdown, where the batcher drains. Afterwards it re-raises the signal with the
    # handler it found installed: this one, so that a graceful stop exits 0 rather than "killed by SIGTERM".
    # The port opens at once and the probes answer 503 `loading` until the backbone and store are ready; a
    # load that fails stops the server the same way (the error is logged) and `serve` exits 3, as uvicorn
    # does when a start-up fails.
    failed: list[BaseException] = []

    def stop_after_failure(error: BaseException) -> None:
        failed.append(error)
        signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: the same graceful stop, no traceback
            serve(create_app(settings, on_load_failure=stop_after_failure), settings, log_config=uvicorn_log_config)
    except SystemExit:
        if not failed:
            raise
    if failed:
        raise SystemExit(3)
    return 0


def exposure_warning(settings: Settings) -> str | None:
    """A sentence when `serve` would listen beyond this machine with uploads and deletes open to anyone.

    The image binds 0.0.0.0 so that a published port works; without a token every client that can
    reach it may replace a task. Loopback needs no token: only this machine can connect.
    """
    if settings.admin_token or is_loopback(settings.host):
        return None
    return (f"listening on {settings.host or 'every address'}:{settings.port} without an admin token: anyone "
            "who can reach this port can upload, replace and delete tasks; set --admin-token or "
            "DELTASERVE_ADMIN_TOKEN")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name (or "" for every address): it may resolve anywhere
        return False


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def steady_malloc(threshold: int = 2 * 1024 * 1024, trim_every_s: float = 1.0) -> bool:
    """Keep the server's RSS flat under steady load (glibc only; returns whether it applied).

    Measured (BENCHMARKS.md, soak): with glibc's defaults RSS climbed without end under mixed load
    (743 -> 1,040 MB over 2,000 requests; 471 -> 1,135 MB over 30,000 in issue 8) while the delta
    cache held a few MB: every batch allocates tensors of a new shape from several threads, glibc
    raises its mmap threshold after large frees so later large buffers land in per-thread heaps,
    and those fragment and are never given back. A fixed mmap threshold (large buffers are mapped
    and unmapped whole), a trim threshold that returns free heap tops, and two arenas instead of
    8 per core keep it flat (632-642 MB over the same run). Done here, before the server's threads
    start; the same as MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=T MALLOC_TRIM_THRESHOLD_=T.

    T (`--malloc-threshold`) is 2 MiB: measured on the served mixed workload and the soak in the
    same half hour (BENCHMARKS.md), 128 KiB kept RSS flat but cost a third of served throughput
    (0.41× vs 0.54× of dense: every mid-sized activation mapped and faulted in anew each forward);
    2 MiB keeps RSS flat within 5 % (+4.1 %, 703 -> 709 MB after warm-up over 4,000 requests) at
    0.54×; 8 MiB (0.63×) and 32 MiB (0.56×) let it climb again (+8 %, +14 %).

    Over 10,000 requests 2 MiB alone was not flat (issue 24: 663 -> 710 MB, +7.1 %) although the
    server's Python objects stayed constant (a census every 1,000 requests, with replacements):
    what creeps is free memory stranded inside the heaps, below live chunks, which the trim
    threshold (heap tops only) never returns. `malloc_trim(0)` also gives back the free pages
    inside a heap; a thread calls it every `trim_every_s` (`--malloc-trim-s`), so the hot path pays
    no page faults of its own (a second's worth of reuse at most is faulted in again).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if threshold <= 0:  # --malloc-threshold 0: glibc's own defaults, untouched
        return False
    applied = [mallopt(_M_ARENA_MAX, 2), mallopt(_M_MMAP_THRESHOLD, threshold),
               mallopt(_M_TRIM_THRESHOLD, threshold)]
    if trim_every_s > 0:
        start_malloc_trimmer(libc, trim_every_s)
    return all(applied)


def start_malloc_trimmer(libc: ctypes.CDLL, every_s: float) -> threading.Thread:
    """A daemon thread giving glibc's free heap pages back to the system every `every_s` seconds."""
    malloc_trim = libc.malloc_trim
    malloc_trim.argtypes = [ctypes.c_size_t]

    def trim() -> None:
        while True:
            time.sleep(every_s)
            malloc_trim(0)

    thread = threading.Thread(target=trim, name="deltaserve-malloc-trim", daemon=True)
    thread.start()
    return thread


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


# --------------------------------------------------------------------------- inspect


def run_inspect(args: argparse.Namespace) -> int:
    data = args.file.read_bytes()
    try:
        metadata = read_metadata(data)
        head = head_summary(args.file)
        if args.backbone:
            from server.backbone import Backbone

            backbone = Backbone.load(None if args.backbone == "packaged" else args.backbone, device="cpu")
            delta = parse_delta(data, backbone.spec())
            parts, validated = delta.bytes_by_part(), f"valid for backbone {backbone.name}"
        else:
            parts, validated = _parts_without_backbone(args.file), "not validated (pass --backbone to validate)"
    except InvalidDelta as err:
        print(f"invalid delta: {err}", file=sys.stderr)
        return 1
    report = {"file": str(args.file), "file_bytes": len(data), "metadata": metadata, "head": head,
              "bytes_by_part": parts, "tensor_bytes": sum(parts.values()), "validation": validated}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.file}  ({len(data):,} bytes; {validated})")
    for key, value in metadata.items():
        print(f"  {key:22} {value}")
    print(f"  {'head':22} " + ", ".join(f"{key} {value}" for key, value in head.items() if key != "task_type"))
    print("  parts:")
    for part, size in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"    {part:20} {size:>12,} bytes")
    print(f"    {'total':20} {report['tensor_bytes']:>12,} bytes")
    return 0


def head_summary(path: Path) -> dict[str, object]:
    """What the head computes (task-delta.md, Head), from the metadata and the head's tensor shapes.

    The pooling is resolved (a file that names none gets its task type's default), so a reader
    sees whether the first token or the mean is read without knowing the defaults.
    """
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()  # noqa: SIM118
                  if key.startswith("head.")}
    task_type = metadata.get("task_type", "")
    summary: dict[str, object] = {"task_type": task_type}
    if task_type in DEFAULT_POOLING:
        summary["pooling"] = metadata.get("pooling", DEFAULT_POOLING[task_type])
    if task_type == "embedding":
        summary["normalize"] = metadata.get("normalize", "true") == "true"
        if "head.projection.weight" in shapes:
            summary["projection"] = list(shapes["head.projection.weight"])
    elif "head.classifier.weight" in shapes:
        summary["classifier"] = list(shapes["head.classifier.weight"])
    if "head.pooler.weight" in shapes:
        summary["own_pooler"] = True
    return summary


def _parts_without_backbone(path: Path) -> dict[str, int]:
    totals: dict[str, int] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensor = handle.get_tensor(key)
            if key.startswith("head."):
                part = "TaskHead"
            elif key == "pasta.vectors":
                part = "PastaVectors"
            elif key.endswith(".head_keep"):
                part = "HeadKeep"
            elif key in EMBEDDING_KEYS:
                part = "EmbeddingShift"
            elif key.rpartition(".")[2] in NORM_SUFFIXES:
                part = "NormDelta"
            else:  # the registry knows which part owns each module suffix
                owner = module_part_of_suffix(key.rpartition(".")[2])
                part = owner.__name__ if owner is not None else "unknown"
            totals[part] = totals.get(part, 0) + tensor.numel() * tensor.element_size()
    return totals


# --------------------------------------------------------------------------- push


def run_push(args: argparse.Namespace) -> int:
    import httpx

    headers = {"Content-Type": "application/octet-stream"}
    try:
        token = client_token(args.token, args.token_file)
    except ValueError as err:
        print(f"deltaserve push: {err}", file=sys.stderr)
        return 2
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = f"{args.url.rstrip('/')}/tasks/{args.name}"
    try:
        response = httpx.put(url, content=args.file.read_bytes(), headers=headers, timeout=120)
    except httpx.HTTPError as err:
        print(f"cannot reach {url}: {err}", file=sys.stderr)
        return 1
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text}
    print(json.dumps(body, indent=2))
    return 0 if response.is_success else 1
