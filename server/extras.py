"""What is installed: the optional features' packages (and the pip extras that bring them, so that a missing one
is named, not traced), and deltaserve's own release.

A plain `pip install deltaserve` stays lean (issue 23): triton (~1 GB installed) only for `--backend
triton`, boto3 only for `--store s3://...`, ray only for `--ray`. Using a feature without its package
must say which extra to install, once, before anything starts, instead of an ImportError's traceback
from deep inside the start-up.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

from server.settings import Settings

# The package each extra of pyproject.toml brings, by the module that the feature imports.
EXTRA_OF_MODULE = {"triton": "gpu", "boto3": "s3", "ray": "cluster"}


class MissingExtra(RuntimeError):
    """A feature was asked for whose optional package is not installed."""


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(module: str, feature: str) -> None:
    """Raise `MissingExtra` naming the pip command when `module` (one of EXTRA_OF_MODULE) is missing."""
    if not is_installed(module):
        raise MissingExtra(f"{feature} needs the {module} package, which is not installed: "
                           f"pip install 'deltaserve[{EXTRA_OF_MODULE[module]}]'")


def package_version() -> str:
    """The installed distribution's version (pyproject.toml's), or "unknown" when run from a bare checkout."""
    try:
        return importlib.metadata.version("deltaserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def check_settings(settings: Settings) -> None:
    """Every optional package the settings ask for, checked before the backbone loads."""
    if settings.store.startswith("s3://"):
        require("boto3", f"the S3 store (--store {settings.store})")
    if settings.ray:
        require("ray", "--ray (Ray Serve)")
    if settings.backend == "triton":
        require("triton", "--backend triton")
