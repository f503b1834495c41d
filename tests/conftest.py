"""Shared fixtures: the real-speech corpus and fresh-interpreter helpers."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "egs2" / "speechocean762" / "asr1"
DATA_ENV = "ESPNET_EXT_SHARED_DATA"


def pytest_configure(config):
    """One thread per pytest-xdist worker (pyproject.toml runs one worker per core).

    Every worker would otherwise start one thread per core, and on 2 cores their
    OpenMP threads wait on each other. Fresh interpreters the tests start inherit it.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


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


def real_speech_batch(corpus: Path, n: int, space: str = " "):
    """The first ``n`` training utterances as an ESPnet model batch, character targets.

    Returns ``(tokens, batch, wav_paths)``: ``tokens`` is ``<blank>``, ``<unk>``, the
    word separator (``space``: the raw character or ESPnet's ``<space>``), the other
    characters of these transcripts sorted, ``<sos/eos>``; ``batch`` holds padded
    ``speech`` (B, S), ``speech_lengths`` (B,), ``text`` (B, L) padded with -1 and
    ``text_lengths`` (B,).
    """
    import soundfile as sf
    import torch

    lines = (corpus / "train/wav.scp").read_text().splitlines()[:n]
    wav = [ln.split() for ln in lines]
    text = dict(
        ln.split(" ", 1) for ln in (corpus / "train/text").read_text().splitlines()
    )
    used = {c for k, _ in wav for c in text[k]}
    tokens = ["<blank>", "<unk>"]
    if " " in used:
        tokens.append(space)
    tokens += [*sorted(used - {" "}), "<sos/eos>"]
    audio = [torch.tensor(sf.read(corpus / p, dtype="float32")[0]) for _, p in wav]
    ids = [
        torch.tensor([tokens.index(space if c == " " else c) for c in text[k]])
        for k, _ in wav
    ]
    pad = torch.nn.utils.rnn.pad_sequence
    batch = dict(
        speech=pad(audio, batch_first=True),
        speech_lengths=torch.tensor([len(a) for a in audio]),
        text=pad(ids, batch_first=True, padding_value=-1),
        text_lengths=torch.tensor([len(i) for i in ids]),
    )
    return tokens, batch, [corpus / p for _, p in wav]


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


def recipe_tool(name: str):
    """A script of the recipe's ``local/`` imported as a module (``results``, ...)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"speechocean762_{name}", RECIPE / "local" / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
