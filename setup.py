"""Packaging hook: the demo deltas of demo/ go into the wheel as `server/demo/`, package data of `server`.

Everything else is in pyproject.toml. The demo deltas stay at the repository's top (where the trainer
writes them and the docs point); a wheel has no repository, so the server looks for them in its own
package first (server/service.py, demo_dir). setuptools' package-data cannot reach outside a package's
folder, hence this copy at build time.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

DEMO = Path(__file__).resolve().parent / "demo"


class BuildWithDemo(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install finds demo/ in the checkout itself
            return
        target = Path(self.build_lib) / "server" / "demo"
        target.mkdir(parents=True, exist_ok=True)
        for delta in sorted(DEMO.glob("*.safetensors")):
            shutil.copy2(delta, target / delta.name)


setup(cmdclass={"build_py": BuildWithDemo})
