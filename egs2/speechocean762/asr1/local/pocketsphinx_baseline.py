#!/usr/bin/env python3
"""Reference row of RESULTS: what a user gets without training anything.

Decodes a Kaldi data dir with pocketsphinx (PyPI ``pocketsphinx``, which ships a
pretrained US-English acoustic model, a 3-gram LM and CMUdict), writes the
hypotheses where ``asr_inference`` would (``<exp>/decode/<set>/1best_recog/text``),
scores them with the recipe's own scoring (``espnet_ext.bin.scoring.score_set``: WER
and CER exactly as asr.sh's stage 13 counts them) and writes ``<exp>/results.json`` in
the schema ``local/results.py`` reads.

    python3 local/pocketsphinx_baseline.py --data_dirs data/dev data/test \
        --exp_dir exp_cpu/pocketsphinx
"""

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import soundfile

from espnet_ext.bin.asr_pipeline import read_kaldi


def decode_dir(decoder, data_dir: Path, out_dir: Path) -> tuple:
    """Decode every utterance of ``data_dir``.

    Returns:
        (decoding seconds, audio seconds)
    """
    hyps, busy, audio = {}, 0.0, 0.0
    for utt, path in sorted(read_kaldi(data_dir / "wav.scp").items()):
        wav, fs = soundfile.read(path, dtype="int16")
        if fs != 16000:
            raise ValueError(f"{path}: pocketsphinx's model needs 16 kHz, got {fs}")
        start = time.perf_counter()
        decoder.start_utt()
        decoder.process_raw(np.ascontiguousarray(wav).tobytes(), full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
        busy += time.perf_counter() - start
        audio += len(wav) / fs
        # CMUdict words are lower case and alternative pronunciations end in "(2)".
        words = (hyp.hypstr if hyp else "").split()
        hyps[utt] = " ".join(w.split("(")[0].upper() for w in words)
    (out_dir / "1best_recog").mkdir(parents=True, exist_ok=True)
    (out_dir / "1best_recog" / "text").write_text(
        "".join(f"{k} {v}\n" for k, v in sorted(hyps.items())), encoding="utf-8"
    )
    return busy, audio


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data_dirs", type=Path, nargs="+", required=True)
    p.add_argument("--exp_dir", type=Path, required=True)
    args = p.parse_args()

    import pocketsphinx

    from espnet_ext.bin.scoring import score_set

    decoder = pocketsphinx.Decoder(samprate=16000, loglevel="FATAL")
    busy = audio = 0.0
    decode_root = args.exp_dir / "decode"
    for d in args.data_dirs:
        b, a = decode_dir(decoder, d, decode_root / d.name)
        busy, audio = busy + b, audio + a
        print(f"{d.name}: decoded {a:.0f} s of audio in {b:.0f} s", flush=True)
    sets = {
        d.name: score_set(
            d / "text",
            decode_root / d.name / "1best_recog" / "text",
            d / "utt2spk",
            decode_root / d.name,
        )
        for d in args.data_dirs
    }
    report = {
        "system": f"pocketsphinx {version('pocketsphinx')} (en-us model, 3-gram LM)",
        "reference": True,
        "script": "pocketsphinx_baseline.py --data_dirs data/dev data/test",
        "rtf": busy / audio,
        "rtf_threads": 1,
        "sets": sets,
    }
    (args.exp_dir / "results.json").write_text(json.dumps(report, indent=2))
    for name, r in sets.items():
        print(f"{name}: WER {r['wer']:.1f}%  CER {r['cer']:.1f}%")


if __name__ == "__main__":
    main()
