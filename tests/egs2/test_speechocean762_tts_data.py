"""``local/tts_data.py``: synthetic training speech, with fake TTS engines on PATH."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import RECIPE, recipe_tool

# Stand-ins for espeak-ng (22.05 kHz WAV on stdout) and flite (16 kHz WAV to -o):
# one second of a tone, and a line per call in $TTS_CALLS.
FAKE_ENGINE = """#!{python}
import os, sys
import numpy as np, soundfile as sf
rate = {rate}
with open(os.environ["TTS_CALLS"], "a") as f:
    f.write(" ".join(sys.argv) + "\\n")
tone = 0.5 * np.sin(np.arange(rate) * 2 * np.pi * 200 / rate)
out = sys.argv[sys.argv.index("-o") + 1] if "-o" in sys.argv else None
if out in (None, "/dev/stdout"):
    sf.write(sys.stdout.buffer, tone, rate, format="WAV")
else:
    sf.write(out, tone, rate)
"""


@pytest.fixture(scope="module")
def tool():
    return recipe_tool("tts_data")


@pytest.fixture
def engines(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, rate in (("espeak-ng", 22050), ("flite", 16000)):
        exe = bin_dir / name
        exe.write_text(FAKE_ENGINE.format(python=sys.executable, rate=rate))
        exe.chmod(0o755)
    calls = tmp_path / "calls"
    calls.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("TTS_CALLS", str(calls))
    return calls


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "text").write_text("a1 HELLO THERE\na2 GOOD MORNING\n")
    (tmp_path / "train" / "wav.scp").write_text("a1 /x/a1.flac\na2 /x/a2.flac\n")
    (tmp_path / "train" / "utt2spk").write_text("a1 s1\na2 s1\n")
    (tmp_path / "lm").write_text(
        "l1 THE CAT SAT DOWN\nl2 HELLO THERE\nl3 TOO SHORT\n"
        "l4 A DOG RAN AWAY\n"
        "l5 ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE TEN ELEVEN\n"
    )
    return tmp_path


def _synth(tool, corpus, *extra):
    return tool.main(
        [
            "--text",
            str(corpus / "train" / "text"),
            "--source",
            "train",
            "--num_utts",
            "3",
            "--out_dir",
            str(corpus / "tts"),
            *extra,
        ]
    )


def test_train_source_speaks_every_transcript_before_any_twice(tool, corpus):
    picked = tool.pick_sentences(corpus / "train" / "text", "train", 5, seed=0)
    assert sorted(picked[:2]) == ["GOOD MORNING", "HELLO THERE"]
    assert picked[2:4] == picked[:2] and len(picked) == 5


def test_lm_source_speaks_only_new_sentences_of_the_word_range(tool, corpus):
    picked = tool.pick_sentences(
        corpus / "lm", "lm", 2, seed=0, exclude=corpus / "train" / "text"
    )
    assert sorted(picked) == ["A DOG RAN AWAY", "THE CAT SAT DOWN"]


def test_lm_source_names_the_shortfall(tool, corpus):
    with pytest.raises(ValueError, match="2 usable sentences.*--num_utts 3"):
        tool.pick_sentences(
            corpus / "lm", "lm", 3, seed=0, exclude=corpus / "train" / "text"
        )


def test_synthetic_set_is_a_kaldi_dir_of_its_sentences(tool, corpus, engines):
    _synth(tool, corpus)
    out = corpus / "tts"
    scp = dict(ln.split(" ", 1) for ln in (out / "wav.scp").read_text().splitlines())
    text = dict(ln.split(" ", 1) for ln in (out / "text").read_text().splitlines())
    assert list(scp) == sorted(scp) == list(text)
    assert set(text.values()) == {"HELLO THERE", "GOOD MORNING"}
    assert (out / "utt2spk").read_text().split() == [u for u in scp for _ in (0, 1)]
    assert all(Path(p).is_file() for p in scp.values())


def test_audio_is_16khz_padded_and_never_digital_silence(tool, corpus, engines):
    _synth(tool, corpus)
    for line in (corpus / "tts" / "wav.scp").read_text().splitlines():
        wav, rate = sf.read(line.split(" ", 1)[1])
        assert rate == 16000
        # one second of speech (resampled from 22.05 kHz or not) + 0.2-1 s of padding
        assert 1.2 * rate <= len(wav) <= 2.0 * rate
        assert np.std(wav[:1600]) > 1e-3 and np.max(np.abs(wav)) <= 0.99


def test_both_engines_speak_and_the_voices_vary(tool, corpus, engines):
    stats = _synth(tool, corpus, "--num_utts", "40")
    assert stats["espeak_ng"] + stats["flite"] == 40
    assert min(stats["espeak_ng"], stats["flite"]) >= 10
    voices = (corpus / "tts" / "utt2voice").read_text().splitlines()
    assert len({v.split(" ", 1)[1] for v in voices}) == 40


def test_engines_read_words_not_acronyms(tool, corpus, engines):
    _synth(tool, corpus)
    assert "HELLO" not in engines.read_text()
    assert "hello there" in engines.read_text()


def test_same_settings_synthesise_nothing_again(tool, corpus, engines):
    first = _synth(tool, corpus)
    calls = engines.read_text()
    assert _synth(tool, corpus) == first
    assert engines.read_text() == calls


def test_combined_dir_holds_the_real_and_the_synthetic_utterances(
    tool, corpus, engines
):
    combined = corpus / "train_tts"
    stats = _synth(
        tool,
        corpus,
        "--combine",
        str(corpus / "train"),
        "--combined_dir",
        str(combined),
    )
    ids = (combined / "text").read_text().split("\n")[:-1]
    assert stats["combined_utterances"] == len(ids) == 5
    assert [i.split()[0] for i in ids][:2] == ["a1", "a2"]
    spk2utt = (combined / "spk2utt").read_text().splitlines()
    assert spk2utt[0] == "s1 a1 a2" and len(spk2utt) == 4


def test_a_missing_engine_says_what_to_install(tool, corpus, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng flite"):
        _synth(tool, corpus)


@pytest.mark.skipif(
    not (shutil.which("espeak-ng") and shutil.which("flite")),
    reason="espeak-ng and flite are not installed (apt-get install espeak-ng flite)",
)
def test_the_real_engines_speak_a_sentence(tool, corpus):
    _synth(tool, corpus, "--num_utts", "4", "--seed", "3")
    for line in (corpus / "tts" / "wav.scp").read_text().splitlines():
        wav, rate = sf.read(line.split(" ", 1)[1])
        assert rate == 16000 and len(wav) > rate  # two words take over a second


def test_data_sh_adds_synthetic_speech_to_the_training_set(
    speechocean, engines, tmp_path
):
    env = dict(os.environ, SPEECHOCEAN762=str(speechocean))
    cmd = ["bash", "local/data.sh", "--fast", "true", "--data_dir", str(tmp_path)]
    cmd += ["--tts", "train", "--tts_utts", "3"]
    subprocess.run(cmd, cwd=RECIPE, env=env, check=True, capture_output=True)
    real = (tmp_path / "train_fast" / "text").read_text().splitlines()
    combined = (tmp_path / "train_tts_train_fast" / "text").read_text().splitlines()
    assert len(combined) == len(real) + 3
    stats = json.loads((tmp_path / "tts_train_fast" / "tts_data.json").read_text())
    assert stats["utterances"] == 3


def test_data_sh_names_the_tts_choices(speechocean, tmp_path):
    env = dict(os.environ, SPEECHOCEAN762=str(speechocean))
    cmd = ["bash", "local/data.sh", "--data_dir", str(tmp_path), "--tts", "festival"]
    proc = subprocess.run(cmd, cwd=RECIPE, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "--tts must be none, train or lm" in proc.stdout
