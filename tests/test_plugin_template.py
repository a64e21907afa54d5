"""The plugin template installs like any third-party package and works end to end.

pip builds and installs the template into a fresh directory on PYTHONPATH, and every command runs
with this interpreter, so the ssltrain under test is the one that runs the template, inside a virtual
environment or not. The build needs setuptools with `bdist_wheel` (setuptools >= 70.1, or `wheel`):
when this interpreter has it the build runs offline, otherwise pip fetches setuptools from the
package index into an isolated build environment.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TEMPLATE = Path(__file__).parent.parent / "tools" / "plugin-template"
BUILDS_WHEELS_OFFLINE = "import setuptools.build_meta\ntry:\n    import setuptools.command.bdist_wheel\n" \
                        "except ImportError:\n    import wheel.bdist_wheel"


def test_template_installs_lists_trains_and_passes_its_tests(tmp_path):
    template = tmp_path / "template"  # a copy, so the build leaves nothing in the repository
    shutil.copytree(TEMPLATE, template, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}

    def run(*args, cwd=tmp_path):
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    offline = subprocess.run([sys.executable, "-c", BUILDS_WHEELS_OFFLINE], capture_output=True).returncode == 0
    run("-m", "pip", "install", "-q", "--no-deps", "--target", str(site), *(["--no-build-isolation"] if offline else []),
        str(template))
    listing = run("-m", "ssltrain", "plugins")
    line = next(x for x in listing.splitlines() if x.startswith("weakstrong "))
    assert "ssltrain-weakstrong 0.1.0" in line and "ssl_forward" in line and "threshold=0.95" in line
    out = run("-m", "ssltrain", "train", str(template / "configs" / "weakstrong.yaml"), "--set", "train.steps=20",
              "--set", "train.eval_every=10", "--out", str(tmp_path / "run"))
    assert "test accuracy" in out
    tests = run("-m", "pytest", "-p", "no:cacheprovider", str(template / "tests"))
    assert " 6 passed" in tests, tests[-2000:]
