"""Shared fixtures: the real-speech corpus and fresh-interpreter helpers."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "ESPNET_EXT_SHARED_DATA"


def shared_data_root() -> Path:
    return Path(os.environ.get(DATA_ENV, REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def speechocean() -> Path:
    """The speechocean762 corpus (Kaldi lists + FLAC); skip (CI: fail) if absent."""
    corpus = shared_data_root() / "speechocean762"
    if not (corpus / "train" / "wav.scp").exists():
        reason = (
            f"real speech not found at {corpus} (set {DATA_ENV} to the shared data dir)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"CI must not skip: {reason}")
        pytest.skip(reason)
    return corpus


def run_python(code: str, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    """Run ``code`` as a script in a fresh interpreter, as ESPnet's entry points run.

    A real file (not ``-c``) so that ``spawn`` children can re-import ``__main__``.
    """
    env = dict(os.environ)
    env.pop("ESPNET_EXT_DISABLE", None)
    env.update(env_extra or {})
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "script.py"
        script.write_text(code)
        proc = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            cwd=tmp,
        )
    assert (
        proc.returncode == 0
    ), f"subprocess failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc
