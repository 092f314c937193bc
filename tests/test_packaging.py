"""`pip install .`: the wheel pyproject.toml builds holds the library, its toy world and the kernel (not the
tests), requires exactly requirements.txt, and imports from outside the checkout. (The README's `pip install
-e .` reads the same pyproject.toml; .ci/run installs that way, so CI runs it, this test does not.)"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_the_package_and_imports_outside_the_checkout(tmp_path):
    pytest.importorskip("setuptools")  # the build backend; pip provides it in a fresh environment
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".ci", ".venv", "weights", "tests", "tutorial",
                                                                "__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("tinyavl-*.whl")))
    names = set(wheel.namelist())
    expected = {str(p.relative_to(REPO)) for folder in ("tinyavl", "kernels") for p in (REPO / folder).rglob("*.py")}
    assert expected <= names and not any(n.startswith("tests/") for n in names)
    metadata = wheel.read(next(n for n in names if n.endswith("/METADATA"))).decode()
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    runtime = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert requires == runtime

    wheel.extractall(tmp_path / "site")
    probe = ("import tinyavl, kernels.sparse_attention, tinyavl.toy.train; print(tinyavl.__file__); "
             "print(sorted(tinyavl.POLICIES))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, timeout=300).stdout.splitlines()
    assert out[0].startswith(str(tmp_path / "site")) and "avl" in out[1]
