#!/usr/bin/env python3
"""Write Kaldi data dirs data/{train,dev,test} for speechocean762 (stdlib only).

Accepts both layouts of the corpus root:
  * the original release (OpenSLR 101): ``train/`` and ``test/``, audio in
    ``WAVE/*/*.WAV``;
  * the ASR preparation we read from ``../shared/data``: ``train/`` and ``dev/`` (a
    subset of the official test speakers), audio as FLAC.
Both list audio paths relative to the corpus root; we write absolute paths, as asr.sh
needs.

Splits (speakers never cross splits):
  * ``train``: the official train set minus the held-out speakers below;
  * ``dev``:   every ``--dev_every``-th train speaker (sorted by id), used for
    validation and checkpoint selection;
  * ``test``:  the test speakers of the root (``test/`` if present, else ``dev/``).

``--fast`` writes ``{train,dev,test}_fast`` instead: a few speakers each, for smoke
runs.
"""

import argparse
import sys
from pathlib import Path
from typing import Dict, List


def read_table(path: Path) -> Dict[str, str]:
    table = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if not value:
            sys.exit(f"{path}:{n}: expected '<id> <value>', got {line!r}")
        table[key] = value.strip()
    return table


def write_table(path: Path, table: Dict[str, str]) -> None:
    # Kaldi sorts with LC_ALL=C, i.e. by bytes: Python's str sort on ASCII ids agrees.
    path.write_text(
        "".join(f"{k} {table[k]}\n" for k in sorted(table)), encoding="utf-8"
    )


def load_split(root: Path, name: str) -> Dict[str, Dict[str, str]]:
    """Per-utterance {wav, text, spk} of ``root/name``, with absolute audio paths."""
    d = root / name
    wav, text, utt2spk = (read_table(d / f) for f in ("wav.scp", "text", "utt2spk"))
    for other, label in ((text, "text"), (utt2spk, "utt2spk")):
        if set(other) != set(wav):
            diff = sorted(set(other) ^ set(wav))
            sys.exit(
                f"{d}: wav.scp and {label} disagree on utterance ids, e.g. {diff[:3]}"
            )
    utts = {}
    for utt, rel in wav.items():
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        if not path.is_file():
            sys.exit(f"{d}/wav.scp: audio of {utt} not found: {path}")
        utts[utt] = {"wav": str(path.resolve()), "text": text[utt], "spk": utt2spk[utt]}
    return utts


def write_dir(out: Path, utts: Dict[str, Dict[str, str]], keep: List[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sel = {u: utts[u] for u in keep}
    write_table(out / "wav.scp", {u: v["wav"] for u, v in sel.items()})
    write_table(out / "text", {u: v["text"] for u, v in sel.items()})
    write_table(out / "utt2spk", {u: v["spk"] for u, v in sel.items()})
    spk2utt: Dict[str, List[str]] = {}
    for u in sorted(sel):
        spk2utt.setdefault(sel[u]["spk"], []).append(u)
    write_table(out / "spk2utt", {s: " ".join(us) for s, us in spk2utt.items()})
    print(f"{out}: {len(sel)} utterances, {len(spk2utt)} speakers")


def by_speaker(utts: Dict[str, Dict[str, str]]) -> Dict[str, List[str]]:
    spk: Dict[str, List[str]] = {}
    for u in sorted(utts):
        spk.setdefault(utts[u]["spk"], []).append(u)
    return dict(sorted(spk.items()))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "corpus", type=Path, help="speechocean762 root (holds train/ and test/ or dev/)"
    )
    p.add_argument(
        "data_dir", type=Path, help="where to write the Kaldi dirs (usually data/)"
    )
    p.add_argument(
        "--dev_every",
        type=int,
        default=25,
        help="hold out every N-th train speaker as dev (25 -> 5 of 125 speakers)",
    )
    p.add_argument(
        "--fast",
        action="store_true",
        help="write {train,dev,test}_fast: 4 train speakers, 10 dev and 10 test "
        "utterances",
    )
    args = p.parse_args()

    root = args.corpus
    if not (root / "train").is_dir():
        sys.exit(
            f"{root}: no train/ dir; set SPEECHOCEAN762 in db.sh to the corpus root"
        )
    test_name = next((n for n in ("test", "dev") if (root / n).is_dir()), None)
    if test_name is None:
        sys.exit(f"{root}: neither test/ nor dev/ found next to train/")
    if args.dev_every < 2:
        sys.exit(f"--dev_every must be >= 2, got {args.dev_every}")

    train = load_split(root, "train")
    test = load_split(root, test_name)
    spk = by_speaker(train)
    dev_spk = set(list(spk)[:: args.dev_every])
    dev_utts = [u for s in dev_spk for u in spk[s]]
    train_utts = [u for s in spk if s not in dev_spk for u in spk[s]]
    test_utts = sorted(test)
    suffix = ""
    if args.fast:
        suffix = "_fast"
        train_spk = [s for s in spk if s not in dev_spk][:4]
        train_utts = [u for s in train_spk for u in spk[s]]
        dev_utts = sorted(dev_utts)[:10]
        test_utts = test_utts[:10]
    write_dir(args.data_dir / f"train{suffix}", train, train_utts)
    write_dir(args.data_dir / f"dev{suffix}", train, dev_utts)
    write_dir(args.data_dir / f"test{suffix}", test, test_utts)


if __name__ == "__main__":
    main()
