"""The plugin template installs like any third-party package and works end to end."""
from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

TEMPLATE = Path(__file__).parent.parent / "tools" / "plugin-template"


def test_template_installs_lists_trains_and_passes_its_tests(tmp_path):
    template = tmp_path / "template"  # a copy, so the build leaves nothing in the repository
    shutil.copytree(TEMPLATE, template, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = str(env_dir / "bin" / "python")

    def run(*args, cwd=None):
        done = subprocess.run([python, *args], capture_output=True, text=True, cwd=cwd, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    # pip of the outer interpreter installs into the venv; no network: no deps, no build isolation
    done = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                           "--no-build-isolation", str(template)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    listing = run("-m", "ssltrain", "plugins")
    line = next(x for x in listing.splitlines() if x.startswith("entropy "))
    assert "ssltrain-entropy 0.1.0" in line and "ssl_unlabeled_loss" in line and "weight=0.1" in line
    out = run("-m", "ssltrain", "train", str(template / "configs" / "entropy.yaml"), "--set", "train.steps=20",
              "--set", "train.eval_every=10", "--out", str(tmp_path / "run"))
    assert "test accuracy" in out
    run("-m", "pytest", "-q", "-p", "no:cacheprovider", str(template / "tests"), cwd=tmp_path)
