"""Both kinds of install ship the start-up files (.pth and PEP 829 .start)."""

import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

EXPECTED = {
    "espnet_ext.pth": "import espnet_ext._autoregister as _m; _m.install()\n",
    "espnet_ext.start": "espnet_ext._autoregister:install\n",
}


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    dst = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dst / name)
    shutil.copytree(
        REPO / "espnet_ext",
        dst / "espnet_ext",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return dst


def _build(src, hook):
    # The PEP 517 hooks pip calls, run without isolation on the installed setuptools.
    code = f"from setuptools import build_meta as b; print(b.{hook}('dist'))"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=src, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = src / "dist" / proc.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as z:
        return {n: z.read(n).decode() for n in z.namelist() if n in EXPECTED}


@pytest.mark.parametrize("hook", ["build_wheel", "build_editable"])
def test_wheel_ships_startup_files(source_copy, hook):
    assert _build(source_copy, hook) == EXPECTED


def test_startup_benchmark_measures_the_shipped_pth_line():
    from espnet_ext.bench.startup import PTH_LINE

    assert PTH_LINE == EXPECTED["espnet_ext.pth"]


def test_start_file_names_a_callable():
    import pkgutil

    target = pkgutil.resolve_name(EXPECTED["espnet_ext.start"].strip())
    assert callable(target)


def test_this_environment_has_the_startup_files():
    import site
    from pathlib import Path

    dirs = [Path(d) for d in site.getsitepackages() + [site.getusersitepackages()]]
    found = [d for d in dirs if (d / "espnet_ext.pth").exists()]
    assert found, f"espnet_ext.pth in none of {dirs}"
    for name, text in EXPECTED.items():
        assert (found[0] / name).read_text() == text
