"""A store client in a process of its own, for the tests of concurrent writers and of a killed upload.

usage: python store_worker.py LOCATION SPEC_JSON put NAME FILE...   (prints one JSON line per stored version)
       python store_worker.py LOCATION SPEC_JSON hang NAME FILE     (uploads, then stops just before the commit)
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from adapters_store import open_store
from adapters_store.format import BackboneSpec


def load_spec(path: str) -> BackboneSpec:
    raw = json.loads(Path(path).read_text())
    raw["linear_modules"] = {k: tuple(v) for k, v in raw["linear_modules"].items()}
    return BackboneSpec(**raw)


def main() -> None:
    location, spec_path, mode, name, *files = sys.argv[1:]
    store = open_store(location, load_spec(spec_path), poll_interval_s=0) if location.startswith("s3://") \
        else open_store(location, load_spec(spec_path))
    if mode == "hang":
        # The version's bytes are written; the commit (manifest write) never happens: the parent kills us here.
        def stop_here(*args: object, **kwargs: object) -> None:
            print("uploaded", flush=True)
            threading.Event().wait()

        setattr(store, "_commit" if location.startswith("s3://") else "_write_manifest", stop_here)
    for path in files:
        info, created = store.put(name, Path(path).read_bytes())
        print(json.dumps({"version": info.version, "sha256": info.sha256, "created": created}), flush=True)


if __name__ == "__main__":
    main()
