"""Which engine backend serves: decided once, at start, in one place.

`start_engine` builds the engine for the backbone's backend (`Backbone.backend`, from
`--backend`: `auto` = `triton` on CUDA when Triton is installed, else `cpu`). On CUDA the Triton
backend must first pass its start-up check (`selfcheck.check_triton`: warm-up, then a mixed batch
against the torch path); if it does not, `auto` serves with the `cpu` backend (the torch path,
on the same GPU) and logs why, while `--backend triton` fails the start with the reason.
"""

from __future__ import annotations

import logging

from server.backends.selfcheck import BackendCheckFailed, BackendChoice, check_triton

log = logging.getLogger("deltaserve")


def start_engine(backbone, requested: str | None, check: bool | None = None):
    """The serving engine and why its backend was chosen; raises `BackendCheckFailed` when
    `requested` is `triton` and the kernels fail their check. `check` defaults to "on CUDA"
    (tests force it in Triton's interpreter)."""
    from server.engine import Engine

    name = backbone.backend
    engine = Engine(backbone, name)
    why = "requested" if requested in ("cpu", "triton") else f"auto on {backbone.device.type}"
    if check is None:
        check = backbone.device.type == "cuda"
    if name != "triton" or not check:
        return engine, BackendChoice(name, why)
    try:
        check_triton(backbone, engine, lambda backend: Engine(backbone, backend))
    except BackendCheckFailed as failure:
        if requested == "triton":
            raise
        log.warning("triton backend failed its start-up check (%s): serving with the torch path instead", failure)
        engine.detach()
        backbone.backend = "cpu"
        return Engine(backbone, "cpu"), BackendChoice("cpu", f"triton failed its start-up check: {failure}")
    return engine, BackendChoice("triton", f"{why}; passed the start-up check against the torch path")
