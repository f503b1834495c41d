#!/usr/bin/env python3
# Copyright 2026 espnet_ext authors
# Apache 2.0  (http://www.apache.org/licenses/LICENSE-2.0)
"""Tune the joint CTC/attention decoding of a trained model on the dev set.

Decodes ``<exp_dir>/data/dev`` (never test) with ESPnet's ``Speech2Text`` for every
``--ctc_weights`` x ``--penalties`` pair (the decode YAML's ``ctc_weight`` and
``penalty``: a length bonus per output token, against the early ends of a weak
attention decoder), and with ``--lm_exp_dir`` for every ``--lm_weights`` too (shallow
fusion with a language model trained by the pipeline's ``lm`` stage), each
combination decoded as asr_inference decodes with it, and scores
CER and WER as asr.sh does (``espnet_ext.bin.scoring.align``). Writes
``<exp_dir>/tune_decoding.json`` (or ``--out``) and prints the best pair. The recipe's
``conf/decode_asr.yaml`` is then set from the best pair (once, for every architecture:
the RESULTS protocol has one decoding).

    python3 local/tune_decoding.py --exp_dir exp_cpu/train_asr_conformer
    python3 local/tune_decoding.py --exp_dir exp_cpu/train_asr_conformer_interctc \
        --lm_exp_dir exp_cpu/lm_train_lm_rnn --lm_weights 0.1 0.3 0.5 \
        --ctc_weights 0.3 --penalties 0.5 --out exp_cpu/tune_lm.json
"""

import argparse
import json
import sys
import time
from pathlib import Path


def best_text(results) -> str:
    """The best hypothesis' text from ``Speech2Text``'s output: a list of n-best
    ``(text, tokens, token_ids, hyp)``, or for a model with intermediate CTC a pair
    ``(that list, intermediate outputs)``, as asr_inference unpacks it."""
    if isinstance(results, tuple):
        results = results[0]
    return results[0][0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--exp_dir", type=Path, required=True)
    p.add_argument("--model", default="valid.acc.ave.pth")
    p.add_argument("--set", default="dev", help="a set of <exp_dir>/data (not test)")
    p.add_argument("--ctc_weights", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--penalties", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--lm_exp_dir", type=Path, default=None, help="an lm stage's dir")
    p.add_argument("--lm_file", default="valid.loss.ave.pth")
    p.add_argument("--lm_weights", type=float, nargs="+", default=[0.0])
    p.add_argument("--beam_size", type=int, default=10)
    p.add_argument("--max_utts", type=int, default=None)
    p.add_argument(
        "--out", type=Path, default=None, help="<exp_dir>/tune_decoding.json"
    )
    args = p.parse_args(argv)
    if args.set == "test":
        sys.exit("tune on dev: test must not take part in model selection")

    import soundfile as sf
    import torch
    from espnet2.bin.asr_inference import Speech2Text

    from espnet_ext.bin.scoring import Counts, align, asr_sh_tokens

    torch.set_num_threads(1)
    asr_dir = args.exp_dir / "asr_train"
    data = args.exp_dir / "data" / args.set
    wavs = [ln.split(maxsplit=1) for ln in (data / "wav.scp").read_text().splitlines()]
    wavs = wavs[: args.max_utts]
    refs = dict(ln.split(" ", 1) for ln in (data / "text").read_text().splitlines())
    model = asr_dir / args.model
    if not model.exists() and (asr_dir / "latest.pth").exists():
        model = asr_dir / "latest.pth"  # a 1-epoch run may have no averaged model
    audio = {k: sf.read(path, dtype="float32")[0] for k, path in wavs}
    rows = []
    if args.lm_exp_dir is None and args.lm_weights != [0.0]:
        sys.exit("--lm_weights needs --lm_exp_dir")
    lm = {}
    if args.lm_exp_dir is not None:
        lm = dict(
            lm_train_config=str(args.lm_exp_dir / "config.yaml"),
            lm_file=str(args.lm_exp_dir / args.lm_file),
        )
    grid = [
        (w, b, lw)
        for w in args.ctc_weights
        for b in args.penalties
        for lw in args.lm_weights
    ]
    for i, (ctc_weight, penalty, lm_weight) in enumerate(grid, 1):
        # One Speech2Text per pair, as asr_inference builds it: ESPnet's beam search
        # drops scorers whose weight is 0 when it is built, so changing the weights
        # of an existing one would silently ignore a new length bonus.
        s2t = Speech2Text(
            str(asr_dir / "config.yaml"),
            str(model),
            beam_size=args.beam_size,
            ctc_weight=ctc_weight,
            penalty=penalty,
            nbest=1,
            lm_weight=lm_weight,
            **(lm if lm_weight else {}),
        )
        start = time.perf_counter()
        chars, words = Counts(0, 0, 0, 0, 0), Counts(0, 0, 0, 0, 0)
        for key, _ in wavs:
            hyp = best_text(s2t(audio[key]))
            ref_line, hyp_line = f"{key} {refs[key]}", f"{key} {hyp}"
            chars += align(
                asr_sh_tokens(ref_line, "char"), asr_sh_tokens(hyp_line, "char")
            )
            words += align(
                asr_sh_tokens(ref_line, "word"), asr_sh_tokens(hyp_line, "word")
            )
        rows.append(
            dict(
                ctc_weight=ctc_weight,
                penalty=penalty,
                lm_weight=lm_weight,
                cer=chars.rate,
                wer=words.rate,
                deletions=chars.dele,
                insertions=chars.ins,
            )
        )
        print(
            f"[{i}/{len(grid)}] ctc_weight {ctc_weight} penalty {penalty} "
            f"lm_weight {lm_weight}: "
            f"CER {chars.rate:.1f} WER {words.rate:.1f} "
            f"(del {chars.dele}, ins {chars.ins}; {time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    rows.sort(key=lambda r: r["cer"])
    out = args.out or args.exp_dir / "tune_decoding.json"
    head = {
        "model": f"{args.exp_dir} ({model.name})",
        "lm": f"{args.lm_exp_dir} ({args.lm_file})" if args.lm_exp_dir else None,
        "set": args.set,
        "utts": len(wavs),
        "command": " ".join(
            [
                "python3 local/tune_decoding.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
    }
    out.write_text(json.dumps({**head, "rows": rows}, indent=2) + "\n")
    print(f"best on {args.set}: {rows[0]} -> {out}")


if __name__ == "__main__":
    main()
