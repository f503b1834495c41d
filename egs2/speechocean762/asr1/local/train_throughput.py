#!/usr/bin/env python3
"""Training throughput of ASR configs on real utterances, side by side in one process.

Builds each config's model with ESPnet's ``ASRTask.build_model`` and times full
training updates (frontend, SpecAugment, encoder, decoder, CTC, backward, Adam step)
on the same batches of real utterances (about ``--batch_seconds`` of audio each, as the
recipe's numel batches), one thread, rounds interleaved so that machine noise hits
every config alike. Prints utterances per second and the ratio to the first config,
and writes a Markdown table.

    python3 local/train_throughput.py \
        --configs old.yaml conf/tuning/train_asr_conformer.yaml \
        --data_dir data/train \
        --token_list exp_cpu/train_asr_conformer/token_list/char/tokens.txt \
        --output results/train_throughput.md
"""

import argparse
import statistics
import time
from pathlib import Path
from typing import List

import soundfile
import torch

from espnet_ext.bin.asr_pipeline import read_kaldi


def _batches(data_dir: Path, n_batches: int, batch_seconds: float) -> List[tuple]:
    """Consecutive utterances of ``data_dir`` grouped into batches of ~batch_seconds."""
    wavs, texts = read_kaldi(data_dir / "wav.scp"), read_kaldi(data_dir / "text")
    batches, cur, dur = [], [], 0.0
    for utt in sorted(wavs):
        wav, fs = soundfile.read(wavs[utt], dtype="float32")
        cur.append((wav, texts[utt]))
        dur += len(wav) / fs
        if dur >= batch_seconds:
            batches.append(cur)
            cur, dur = [], 0.0
            if len(batches) == n_batches:
                break
    return batches


def _tensors(batch, token_id):
    lens = torch.tensor([len(w) for w, _ in batch])
    speech = torch.zeros(len(batch), int(lens.max()))
    for i, (w, _) in enumerate(batch):
        speech[i, : len(w)] = torch.from_numpy(w)
    ids = [[token_id.get(c, 1) for c in _chars(t)] for _, t in batch]
    tlens = torch.tensor([len(x) for x in ids])
    text = torch.full((len(batch), int(tlens.max())), -1, dtype=torch.long)
    for i, x in enumerate(ids):
        text[i, : len(x)] = torch.tensor(x)
    return speech, lens, text, tlens


def _chars(text: str) -> List[str]:
    # ESPnet's char tokenizer: one token per character, "<space>" for a space.
    return ["<space>" if c == " " else c for c in text]


def _profile(model_opt, batch, top: int) -> List[str]:
    """Markdown rows: the ``top`` operators by self CPU time in one update."""
    model, opt = model_opt
    with torch.profiler.profile() as prof:
        model(*batch)[0].backward()
    opt.zero_grad()
    events = sorted(
        prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True
    )
    total = sum(e.self_cpu_time_total for e in events)
    rows = ["| operator | share of the update | calls |", "|---|---|---|"]
    for e in events[:top]:
        rows.append(
            f"| {e.key} | {100 * e.self_cpu_time_total / total:.1f}% | {e.count} |"
        )
    return rows


def _build(config: Path, token_list: Path):
    from espnet2.tasks.asr import ASRTask

    parser = ASRTask.get_parser()
    args = parser.parse_args(["--config", str(config), "--token_list", str(token_list)])
    args.normalize = None  # statistics files differ per frontend; cost is negligible
    model = ASRTask.build_model(args)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    return model.train(), opt


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", type=Path, nargs="+", required=True)
    p.add_argument("--data_dir", type=Path, required=True)
    p.add_argument("--token_list", type=Path, required=True)
    p.add_argument("--n_batches", type=int, default=6)
    p.add_argument("--batch_seconds", type=float, default=34.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", type=Path, default=None)
    p.add_argument(
        "--profile_top",
        type=int,
        default=6,
        help="also profile one update per config and list its N costliest operators",
    )
    args = p.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokens = args.token_list.read_text(encoding="utf-8").split()
    token_id = {t: i for i, t in enumerate(tokens)}
    batches = [
        _tensors(b, token_id)
        for b in _batches(args.data_dir, args.n_batches, args.batch_seconds)
    ]
    n_utts = sum(len(b[1]) for b in batches)
    audio = sum(float(b[1].sum()) for b in batches) / 16000
    models = {c: _build(c, args.token_list) for c in args.configs}
    seconds = {c: [] for c in args.configs}
    for r in range(args.rounds + 1):  # round 0 warms up
        order = (
            args.configs[r % len(args.configs) :]
            + args.configs[: r % len(args.configs)]
        )
        for c in order:
            model, opt = models[c]
            start = time.perf_counter()
            for speech, lens, text, tlens in batches:
                loss = model(speech, lens, text, tlens)[0]
                loss.backward()
                opt.step()
                opt.zero_grad()
            if r:
                seconds[c].append(time.perf_counter() - start)
    base = statistics.median(seconds[args.configs[0]])
    rows = [
        f"Training updates on {len(batches)} batches of real utterances ({n_utts} "
        f"utterances, {audio:.0f} s of audio), 1 thread, median of {args.rounds} "
        "interleaved rounds.",
        "",
        "| config | params (M) | s per update | utterances/s | speed-up |",
        "|---|---|---|---|---|",
    ]
    for c in args.configs:
        med = statistics.median(seconds[c])
        params = sum(p.numel() for p in models[c][0].parameters()) / 1e6
        rows.append(
            f"| {c} | {params:.2f} | {med / len(batches):.3f} | {n_utts / med:.1f} | "
            f"x{base / med:.2f} |"
        )
    for c in args.configs if args.profile_top else []:
        rows += ["", f"Costliest operators of one update of {c} (self CPU time):", ""]
        rows += _profile(models[c], batches[0], args.profile_top)
    text = "\n".join(rows)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
