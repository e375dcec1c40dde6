"""Write constraints.txt: the exact releases of deltaserve's dependencies and of every extra's, so two builds agree.

    python .ci/constraints.py [--python310 PATH]   # rewrites constraints.txt at the repository root

CI installs the project under them (`pip install -c constraints.txt -e '.[dev]'`, the README's line)
and the image installs its part of them (`pip install -c constraints.txt '.[s3]'`): a constraints file
only holds back what is installed, so one file serves every extra. Torch is left out: it is pinned by
its own install step, from PyPI's CPU index or a CUDA index, and its CUDA packages (nvidia-*, triton,
cuda-*) depend on which one (a CUDA torch pins its own triton release; the image pins triton itself).

- Python >= 3.11: the releases installed where the test suite passed (this environment's
  `pip freeze`, kept to the dependencies, every extra's (`[dev]` holds all) and what they pull in).
- Python 3.10 (Ubuntu 22.04 CUDA bases): some of those releases need 3.11, so a Python 3.10's pip
  resolves the same requirements (`pip install --dry-run --report`), holding every pin that supports
  3.10. (A real 3.10 interpreter, not `--python-version 3.10`: pip does not check `Requires-Python`
  against the latter when an index leaves it out of its listing.)
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LEFT_OUT = ("torch", "triton", "nvidia-", "cuda-")
PY310 = "3.10.12"  # Ubuntu 22.04's


def left_out(name: str) -> bool:
    return any(name == prefix or (prefix.endswith("-") and name.startswith(prefix)) for prefix in LEFT_OUT)


def project_requirements() -> list[str]:
    """The runtime dependencies and every extra's, the project's own extras (`deltaserve[gpu,...]`) expanded."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    own = canonicalize_name(project["name"])
    found = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        found += [line for line in extra if canonicalize_name(Requirement(line).name) != own]
    return found


def installed_closure(requirements: list[str]) -> dict[str, md.Distribution]:
    """Every installed distribution the requirements pull in here (markers evaluated for this Python and
    for the extras asked for, so that `ray[serve]` brings in what `serve` needs)."""
    found: dict[str, md.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(Requirement(r).name, extra) for r in requirements
            if Requirement(r).marker is None or Requirement(r).marker.evaluate({"extra": ""})
            for extra in ("", *Requirement(r).extras)]
    while todo:
        name, extra = todo.pop()
        name = canonicalize_name(name)
        if (name, extra) in done:
            continue
        done.add((name, extra))
        dist = found.setdefault(name, md.distribution(name))
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, wanted) for wanted in ("", *req.extras)]
    return found


def resolve_for_310(python: str, requirements: list[str], prefer: dict[str, str]) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        reqs, cons, report = Path(tmp, "req.txt"), Path(tmp, "cons.txt"), Path(tmp, "report.json")
        # Torch in, at this environment's release, so that its own dependencies get 3.10 pins too.
        torch = md.version("torch").split("+")[0]
        reqs.write_text("\n".join(requirements))
        cons.write_text("\n".join([f"torch=={torch}", *(f"{name}=={version}" for name, version in prefer.items())]))
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--report", str(report), "-r", str(reqs), "-c", str(cons)], check=True)
        return {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}


def find_python310() -> str:
    # pyenv's own binaries before PATH: a pyenv shim on PATH may not run without pyenv set up.
    pyenv = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python")))
    for candidate in (*pyenv, shutil.which("python3.10")):
        if candidate:
            return candidate
    raise SystemExit("no Python 3.10 found: pass --python310 PATH")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python310", help="a Python 3.10 interpreter with pip (default: python3.10 or pyenv's)")
    args = parser.parse_args()
    requirements = project_requirements()
    dists = {name: dist for name, dist in installed_closure(requirements).items() if not left_out(name)}
    tested = {name: dist.version for name, dist in dists.items()}
    fits_310 = {name: version for name, version in tested.items()
                if PY310 in SpecifierSet(dists[name].metadata.get("Requires-Python") or "")}
    resolved = resolve_for_310(args.python310 or find_python310(), requirements, fits_310)
    for_310 = {name: version for name, version in resolved.items() if not left_out(name)}
    lines = []
    for name in sorted(set(tested) | set(for_310)):
        new, old = tested.get(name), for_310.get(name)
        if new == old:
            lines.append(f"{name}=={new}")
            continue
        if new:
            lines.append(f'{name}=={new} ; python_version >= "3.11"')
        if old:
            lines.append(f'{name}=={old} ; python_version < "3.11"')
    header = __doc__.split("\n\n", 2)[2].strip().replace("\n", "\n# ")
    (REPO / "constraints.txt").write_text(
        "# Generated by .ci/constraints.py; do not edit by hand. deltaserve's dependencies and its extras', "
        "torch apart.\n"
        f"# {header}\n" + "\n".join(lines) + "\n")
    print(f"constraints.txt: {len(lines)} pins ({len(tested)} tested here, {len(for_310)} resolved for 3.10)")


if __name__ == "__main__":
    main()
