#!/usr/bin/env python3
# Copyright 2026 espnet_ext authors
# Apache 2.0  (http://www.apache.org/licenses/LICENSE-2.0)
"""Write the language model's training text from free English text (stdlib only).

The recipe's transcripts are 2400 unique sentences: a language model of them alone
knows ~1850 words. Two Debian packages hold everyday English under free licences and
install offline from the Debian mirror (``apt-get install wordnet-base fortunes``):

  * ``wordnet-base``: the ~48k example phrases of WordNet's glosses
    (``/usr/share/wordnet/data.*``, the quoted parts after ``|``), short sentences
    such as "he's a miracle worker";
  * ``fortunes``: the fortune-cookie files (``/usr/share/games/fortunes``), split into
    sentences.

Each sentence is written in the transcripts' alphabet: upper case, letters, apostrophes
and single spaces; hyphens and slashes become spaces, other punctuation goes. Sentences
with digits or other letters (é...) are dropped rather than guessed at, as are
attributions ("-- James F.") and sentences of fewer than ``--min_words`` or more than
``--max_words`` words (the transcripts have at most 10; a few fortunes run to hundreds).

Held-out text stays held out: a sentence equal to a transcript of a ``--exclude``
set (dev and test) is dropped, and the count is printed and written to
``<out_dir>/lm_text.json``. The training transcripts are appended ``--train_repeat``
times (in-domain text). Output: ``<out_dir>/text`` (Kaldi ``<id> <sentence>``).

    python3 local/lm_text.py --train_text data/train/text \\
        --exclude data/dev/text data/test/text --out_dir data/lm_train
"""

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, Iterator, List

WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
_ALLOWED = re.compile(r"[A-Z' ]+")


def normalise(sentence: str) -> str:
    """Map a sentence to the transcripts' alphabet; '' when it cannot be."""
    s = sentence.upper().replace("\u2019", "'")
    s = re.sub(r"[-/_]+", " ", s)
    s = re.sub(r"[^\w' ]+", " ", s)  # punctuation goes; digits and letters stay
    s = " ".join(w.strip("'") for w in s.split())
    s = " ".join(s.split())
    return s if _ALLOWED.fullmatch(s) else ""


def wordnet_examples(root: Path) -> Iterator[str]:
    """The quoted example phrases of WordNet's glosses."""
    files = sorted(root.glob("data.*"))
    if not files:
        sys.exit(f"{root}: no WordNet data.* files (apt-get install wordnet-base)")
    for f in files:
        for line in f.read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header
            yield from re.findall(r'"([^"]+)"', line.split("|", 1)[1])


def fortune_sentences(root: Path) -> Iterator[str]:
    """Sentences of the fortune files (entries separated by '%' lines)."""
    files = sorted(p for p in root.iterdir() if p.is_file() and "." not in p.name)
    if not files:
        sys.exit(f"{root}: no fortune files (apt-get install fortunes)")
    for f in files:
        for entry in f.read_text(encoding="latin-1").split("\n%\n"):
            for sent in re.split(r"(?<=[.!?])\s+", " ".join(entry.split())):
                if not sent.lstrip().startswith("--"):  # attributions
                    yield sent


def read_text(path: Path) -> Dict[str, str]:
    table = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            table[key] = value.strip()
    return table


def main(argv: List[str] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--train_text", type=Path, required=True)
    p.add_argument("--exclude", type=Path, nargs="*", default=[])
    p.add_argument("--out_dir", type=Path, required=True)
    p.add_argument("--wordnet", type=Path, default=WORDNET)
    p.add_argument("--fortunes", type=Path, default=FORTUNES)
    p.add_argument("--min_words", type=int, default=2)
    p.add_argument("--max_words", type=int, default=30)
    p.add_argument("--train_repeat", type=int, default=1)
    p.add_argument(
        "--max_sentences", type=int, default=None, help="per source (smoke runs)"
    )
    args = p.parse_args(argv)

    held_out = {v for f in args.exclude for v in read_text(f).values()}
    stats: Dict[str, object] = {}
    lines: List[str] = []
    seen = set()
    for name, source in (
        ("wordnet", wordnet_examples(args.wordnet)),
        ("fortunes", fortune_sentences(args.fortunes)),
    ):
        raw = kept = dropped_held_out = 0
        for sent in source:
            if args.max_sentences is not None and kept >= args.max_sentences:
                break
            raw += 1
            s = normalise(sent)
            n_words = len(s.split())
            if not args.min_words <= n_words <= args.max_words or s in seen:
                continue
            if s in held_out:
                dropped_held_out += 1
                continue
            seen.add(s)
            lines.append(s)
            kept += 1
        stats[name] = dict(raw=raw, kept=kept, dropped_held_out=dropped_held_out)
    train = list(read_text(args.train_text).values())
    lines += train * args.train_repeat
    stats["train_transcripts"] = len(train) * args.train_repeat
    stats["sentences"] = len(lines)
    stats["characters"] = sum(len(s) + 1 for s in lines)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    width = len(str(len(lines)))
    (args.out_dir / "text").write_text(
        "".join(f"lm{i:0{width}d} {s}\n" for i, s in enumerate(lines)),
        encoding="utf-8",
    )
    (args.out_dir / "lm_text.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
