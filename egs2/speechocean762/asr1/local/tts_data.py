#!/usr/bin/env python3
# Copyright 2026 espnet_ext authors
# Apache 2.0  (http://www.apache.org/licenses/LICENSE-2.0)
"""Synthesise extra training speech with Debian's offline TTS engines.

The recipe's models overfit their 2400 utterances (README, "Where the curve goes").
Two free synthesisers install offline from the Debian mirror (``apt-get install
espeak-ng flite``) and give speech of any text in many voices:

  * ``espeak-ng``: a formant synthesiser; every utterance draws an English accent
    (US, British, Scottish, Caribbean, ...), a voice variant (m1-m7, f1-f4), a speed
    (``--espeak_wpm``) and a pitch (``--espeak_pitch``);
  * ``flite``: statistical-parametric voices ``awb rms slt kal16`` at 16 kHz, with a
    drawn duration stretch (``--flite_stretch``).

Each utterance picks an engine at random (``--espeak_share``), is resampled to 16 kHz,
padded with 0.1-0.5 s of silence on each side (recordings of read speech have it) and
mixed with white noise at a drawn SNR (``--snr_db``), so no frame is digital zero.

The text comes from a Kaldi ``text`` file. ``--source train`` speaks the training
transcripts again (new voices, no new words); ``--source lm`` speaks sentences of the
language model's free English text (local/lm_text.py) that are not training
transcripts, ``--min_words`` to ``--max_words`` long (new words). Held-out sentences
never reach that file: lm_text.py drops every dev and test transcript.

Output, Kaldi style: ``<out_dir>/{wav.scp,text,utt2spk,spk2utt,utt2voice}`` and the
audio in ``<out_dir>/wav/*.flac``; every utterance is its own speaker (utterance-level
normalisation needs none). ``--combine data/train`` also writes ``<combined_dir>``:
the real training set plus the synthetic one. Counts and hours go to
``<out_dir>/tts_data.json``; synthesis is deterministic for a given ``--seed``, so a
second call with the same settings leaves the files as they are.

    python3 local/tts_data.py --text data/train/text --source train --num_utts 2400 \\
        --out_dir data/tts_train \\
        --combine data/train --combined_dir data/train_tts_train
"""

import argparse
import io
import json
import random
import shutil
import subprocess
import sys
from math import gcd
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from espnet_ext.bin.asr_pipeline import read_kaldi, write_kaldi

RATE = 16000
ESPEAK_ACCENTS = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
)
ESPEAK_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")
FLITE_VOICES = ("awb", "rms", "slt", "kal16")
KALDI_FILES = ("wav.scp", "text", "utt2spk")


def pick_sentences(
    text: Path,
    source: str,
    num_utts: int,
    seed: int,
    exclude: Optional[Path] = None,
    min_words: int = 3,
    max_words: int = 10,
) -> List[str]:
    """Draw ``num_utts`` sentences to speak.

    ``source=train`` cycles through the transcripts in a shuffled order (each
    transcript once before any twice); ``source=lm`` draws distinct sentences of
    ``min_words``-``max_words`` words that are not lines of ``exclude``.
    """
    rng = random.Random(seed)
    sentences = list(read_kaldi(text).values())
    if source == "train":
        order = sorted(set(sentences))
        rng.shuffle(order)
        if not order:
            raise ValueError(f"--text {text} has no sentences")
        return [order[i % len(order)] for i in range(num_utts)]
    if source != "lm":
        raise ValueError(f"--source must be 'train' or 'lm', got {source!r}")
    banned = set(read_kaldi(exclude).values()) if exclude else set()
    pool = sorted(
        {
            s
            for s in sentences
            if s not in banned and min_words <= len(s.split()) <= max_words
        }
    )
    if len(pool) < num_utts:
        raise ValueError(
            f"--text {text} has {len(pool)} usable sentences of {min_words}-"
            f"{max_words} words, fewer than --num_utts {num_utts}"
        )
    return rng.sample(pool, num_utts)


def _run(cmd: Sequence[str]) -> bytes:
    try:
        return subprocess.run(cmd, check=True, capture_output=True).stdout
    except FileNotFoundError as e:
        raise RuntimeError(
            f"{cmd[0]} is not installed: apt-get install espeak-ng flite"
        ) from e


def _to_rate(wav: np.ndarray, rate: int) -> np.ndarray:
    if rate == RATE:
        return wav
    g = gcd(rate, RATE)
    return resample_poly(wav, RATE // g, rate // g)


def synthesise(sentence: str, rng: random.Random, args) -> Tuple[np.ndarray, str]:
    """One utterance of ``sentence``: (16 kHz float waveform, voice description)."""
    # The engines read upper-case words as acronyms ("IT" -> "I T").
    words = sentence.lower()
    if rng.random() < args.espeak_share:
        voice = f"{rng.choice(ESPEAK_ACCENTS)}+{rng.choice(ESPEAK_VARIANTS)}"
        wpm = rng.randint(*args.espeak_wpm)
        pitch = rng.randint(*args.espeak_pitch)
        cmd = ["espeak-ng", "-v", voice, "-s", str(wpm), "-p", str(pitch)]
        raw = _run(cmd + ["--stdout", words])
        desc = f"espeak-ng {voice} s{wpm} p{pitch}"
    else:
        voice = rng.choice(FLITE_VOICES)
        stretch = round(rng.uniform(*args.flite_stretch), 2)
        cmd = ["flite", "-voice", voice, "--setf", f"duration_stretch={stretch}"]
        raw = _run(cmd + ["-t", words, "-o", "/dev/stdout"])
        desc = f"flite {voice} x{stretch}"
    wav, rate = sf.read(io.BytesIO(raw), dtype="float32")
    wav = _to_rate(wav, rate)
    pad = [np.zeros(int(rng.uniform(0.1, 0.5) * RATE), "float32") for _ in range(2)]
    wav = np.concatenate([pad[0], wav, pad[1]])
    speech_power = float(np.mean(wav**2)) + 1e-10
    snr = rng.uniform(*args.snr_db)
    noise = np.random.default_rng(rng.randrange(2**32)).standard_normal(len(wav))
    wav = wav + noise * np.sqrt(speech_power / 10 ** (snr / 10))
    peak = float(np.max(np.abs(wav)))
    if peak > 0.99:
        wav = wav * (0.99 / peak)
    return wav.astype("float32"), f"{desc} snr{snr:.0f}"


def write_dir(out_dir: Path, rows: Dict[str, Dict[str, str]]) -> None:
    """``rows[name][utt] = value`` for wav.scp, text, utt2spk; spk2utt from utt2spk."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, table in rows.items():
        write_kaldi(out_dir / name, table)
    spk2utt: Dict[str, List[str]] = {}
    for utt in sorted(rows["utt2spk"]):
        spk2utt.setdefault(rows["utt2spk"][utt], []).append(utt)
    write_kaldi(out_dir / "spk2utt", {s: " ".join(u) for s, u in spk2utt.items()})


def read_dir(data_dir: Path) -> Dict[str, Dict[str, str]]:
    return {name: read_kaldi(data_dir / name) for name in KALDI_FILES}


def combine(real: Path, synthetic: Path, out_dir: Path) -> int:
    """Write ``out_dir``: the utterances of both Kaldi dirs (ids must not clash)."""
    a, b = read_dir(real), read_dir(synthetic)
    clash = set(a["text"]) & set(b["text"])
    if clash:
        raise ValueError(
            f"{real} and {synthetic} share utterance ids: {sorted(clash)[:3]}"
        )
    write_dir(out_dir, {k: {**a[k], **b[k]} for k in KALDI_FILES})
    return len(a["text"]) + len(b["text"])


def synthesise_set(args) -> Dict[str, object]:
    """Speak ``args.num_utts`` sentences into ``args.out_dir``; return its counts."""
    sentences = pick_sentences(
        args.text,
        args.source,
        args.num_utts,
        args.seed,
        exclude=args.exclude,
        min_words=args.min_words,
        max_words=args.max_words,
    )
    wav_dir = args.out_dir / "wav"
    if wav_dir.exists():
        shutil.rmtree(wav_dir)
    wav_dir.mkdir(parents=True)
    rng = random.Random(args.seed + 1)
    rows: Dict[str, Dict[str, str]] = {name: {} for name in KALDI_FILES}
    voices, seconds = {}, 0.0
    for i, sentence in enumerate(sentences):
        utt = f"tts{args.source}{i:05d}"
        wav, voices[utt] = synthesise(sentence, rng, args)
        path = (wav_dir / f"{utt}.flac").resolve()
        sf.write(path, wav, RATE)
        seconds += len(wav) / RATE
        rows["wav.scp"][utt] = str(path)
        rows["text"][utt] = sentence
        rows["utt2spk"][utt] = utt
        if (i + 1) % 500 == 0:
            print(f"{args.out_dir}: {i + 1}/{len(sentences)} utterances", flush=True)
    write_dir(args.out_dir, rows)
    write_kaldi(args.out_dir / "utt2voice", voices)
    return {
        "source": args.source,
        "utterances": len(sentences),
        "distinct_sentences": len(set(sentences)),
        "hours": round(seconds / 3600, 3),
        "espeak_ng": sum(v.startswith("espeak-ng") for v in voices.values()),
        "flite": sum(v.startswith("flite") for v in voices.values()),
    }


def main(argv: List[str] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", type=Path, required=True, help="Kaldi text to speak from")
    p.add_argument("--source", choices=("train", "lm"), required=True)
    p.add_argument("--exclude", type=Path, help="(lm) sentences never to speak")
    p.add_argument("--num_utts", type=int, default=2400)
    p.add_argument("--out_dir", type=Path, required=True)
    p.add_argument("--combine", type=Path, help="real training dir to add to")
    p.add_argument("--combined_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min_words", type=int, default=3)
    p.add_argument("--max_words", type=int, default=10)
    p.add_argument("--espeak_share", type=float, default=0.5)
    p.add_argument("--espeak_wpm", type=int, nargs=2, default=(120, 175))
    p.add_argument("--espeak_pitch", type=int, nargs=2, default=(30, 70))
    p.add_argument("--flite_stretch", type=float, nargs=2, default=(0.9, 1.3))
    p.add_argument("--snr_db", type=float, nargs=2, default=(20.0, 40.0))
    args = p.parse_args(argv)
    if args.num_utts < 1:
        p.error(f"--num_utts must be positive, got {args.num_utts}")
    if bool(args.combine) != bool(args.combined_dir):
        p.error("--combine and --combined_dir go together")

    settings = {k: str(v) for k, v in sorted(vars(args).items())}
    done = args.out_dir / "tts_data.json"
    stats = json.loads(done.read_text()) if done.exists() else {}
    if stats.get("settings") == settings:
        # run_cpu.sh prepares data before every stage list; synthesis is
        # deterministic, so the same settings mean the same files.
        print(f"{args.out_dir}: up to date ({done})")
    else:
        stats = {**synthesise_set(args), "settings": settings}
    if args.combine:
        stats["combined_utterances"] = combine(
            args.combine, args.out_dir, args.combined_dir
        )
    done.write_text(json.dumps(stats, indent=2) + "\n")
    print(f"{args.out_dir}: {json.dumps(stats)}")
    return stats


if __name__ == "__main__":
    main(sys.argv[1:])
