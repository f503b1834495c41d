"""WER and CER as ESPnet's asr.sh (stage 13) computes them, with or without sclite.

asr.sh scores each test set twice, words and characters, in the same way:

1. ``espnet2.bin.tokenize_text -f 2- --token_type word|char --non_linguistic_symbols
   <nlsyms> --remove_non_linguistic_symbols true`` on the reference ``text`` (plus
   ``--cleaner``) and on the hypotheses: the utterance id is dropped, the rest is
   re-joined with single spaces, and ESPnet's tokenizer splits it. Characters
   include the space, as the token ``<space>``: a missing or extra space is a
   character error.
2. One line per utterance, ``tokens<TAB>(speaker-utterance)``: ``ref.trn``,
   ``hyp.trn``.
3. ``sclite -r ref.trn trn -h hyp.trn trn -i rm -o all stdout > result.txt``: a
   weighted edit-distance alignment per utterance (substitution 4, insertion and
   deletion 3), tokens compared case-insensitively; WER/CER = (S + D + I) / N over
   the whole set.

:func:`score_set` does steps 1 and 2 with ESPnet's own tokenizer classes (no cleaner,
no non-linguistic symbols: what our pipeline trains with) and runs the real ``sclite``
for step 3 when one is installed (``PATH``, ``/usr/lib/sctk/bin``); otherwise
:func:`align` computes the same counts (sclite's weights and tie-breaking, checked
against sclite on a fixture in ``tests/bin``). One difference on purpose: a
hypothesis missing for an utterance counts as empty (asr.sh's ``paste`` would shift
every later line).
"""

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

__all__ = [
    "Counts",
    "asr_sh_tokens",
    "align",
    "find_sclite",
    "run_sclite",
    "score_set",
    "write_trn",
]

# sclite's default alignment costs (SCTK: "-w" weights): correct 0, sub 4, ins/del 3.
_SUB, _INS, _DEL = 4, 3, 3
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class Counts(NamedTuple):
    """Alignment counts of a set: reference tokens and correct/sub/del/ins."""

    ref: int
    cor: int
    sub: int
    dele: int
    ins: int

    @property
    def errors(self) -> int:
        return self.sub + self.dele + self.ins

    @property
    def rate(self) -> float:
        """(S + D + I) / N in percent, as sclite's ``Err`` column (0 for N = 0)."""
        return 100.0 * self.errors / self.ref if self.ref else 0.0

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(*(a + b for a, b in zip(self, other)))


def asr_sh_tokens(line: str, unit: str) -> List[str]:
    """Tokens of one ``text`` line as ``tokenize_text -f 2- --token_type <unit>`` gives.

    Args:
        line: ``"<utt-id> <transcript>"``.
        unit: ``"word"`` or ``"char"`` (spaces become ``<space>`` tokens).
    """
    # -f 2-: split on whitespace runs, drop the id, re-join with single spaces.
    return _tokenizer(unit).text2tokens(" ".join(line.rstrip().split()[1:]))


@functools.lru_cache(maxsize=None)
def _tokenizer(unit: str):
    # ESPnet's own classes, as build_tokenizer makes them for tokenize_text
    # (importing espnet2.bin.tokenize_text itself would load every g2p backend).
    from espnet2.text.char_tokenizer import CharTokenizer
    from espnet2.text.word_tokenizer import WordTokenizer

    if unit == "char":
        return CharTokenizer(
            non_linguistic_symbols=None, remove_non_linguistic_symbols=True
        )
    if unit == "word":
        return WordTokenizer(
            non_linguistic_symbols=None, remove_non_linguistic_symbols=True
        )
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")


def _same(a: str, b: str) -> bool:
    # sclite compares case-insensitively (its -s option makes it case-sensitive);
    # ASCII folding only, as its C library.
    return a == b or a.translate(_ASCII_LOWER) == b.translate(_ASCII_LOWER)


def align(ref: Sequence[str], hyp: Sequence[str]) -> Counts:
    """sclite's alignment counts of one utterance.

    Minimum-cost alignment with sclite's costs (substitution 4, insertion 3,
    deletion 3). Several alignments can share that cost with different error counts
    (3 substitutions cost as much as 2 insertions + 2 deletions), so the traceback
    breaks ties as sclite does: from the end, a match or substitution first, then an
    insertion, then a deletion.
    """
    n, m = len(ref), len(hyp)
    cost = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        cost[i][0] = i * _DEL
    for j in range(1, m + 1):
        cost[0][j] = j * _INS
    for i in range(1, n + 1):
        row, prev = cost[i], cost[i - 1]
        for j in range(1, m + 1):
            diag = prev[j - 1] + (0 if _same(ref[i - 1], hyp[j - 1]) else _SUB)
            row[j] = min(diag, prev[j] + _DEL, row[j - 1] + _INS)
    i, j = n, m
    cor = sub = dele = ins = 0
    while i > 0 or j > 0:
        if i > 0 and j > 0:
            same = _same(ref[i - 1], hyp[j - 1])
            if cost[i][j] == cost[i - 1][j - 1] + (0 if same else _SUB):
                cor, sub = cor + same, sub + (not same)
                i, j = i - 1, j - 1
                continue
        if j > 0 and cost[i][j] == cost[i][j - 1] + _INS:
            ins, j = ins + 1, j - 1
        else:
            dele, i = dele + 1, i - 1
    return Counts(n, cor, sub, dele, ins)


def write_trn(path: Path, tokens: Dict[str, List[str]], utt2spk: Dict[str, str]):
    """asr.sh's ``.trn``: ``tokens<TAB>(speaker-utterance)``, one line per utterance."""
    path.write_text(
        "".join(f"{' '.join(t)}\t({utt2spk[u]}-{u})\n" for u, t in tokens.items()),
        encoding="utf-8",
    )


def find_sclite() -> Optional[str]:
    """Path of an ``sclite`` binary: ``PATH``, then Debian's ``/usr/lib/sctk/bin``."""
    found = shutil.which("sclite")
    if found:
        return found
    debian = Path("/usr/lib/sctk/bin/sclite")
    return str(debian) if os.access(debian, os.X_OK) else None


_SUM_ROW = re.compile(r"^\s*\|\s*Sum\s*\|([\d\s]+)\|([\d\s]+)\|")


def run_sclite(sclite: str, ref_trn: Path, hyp_trn: Path, result: Path) -> Counts:
    """Run sclite exactly as asr.sh does; parse the raw ``Sum`` row of its report."""
    with open(result, "w", encoding="utf-8") as out:
        subprocess.run(
            [sclite, "-r", str(ref_trn), "trn", "-h", str(hyp_trn), "trn"]
            + ["-i", "rm", "-o", "all", "stdout"],
            stdout=out,
            check=True,
        )
    for line in result.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _SUM_ROW.match(line)
        if m:
            _, n_ref = map(int, m.group(1).split())
            cor, sub, dele, ins = map(int, m.group(2).split()[:4])
            return Counts(n_ref, cor, sub, dele, ins)
    raise RuntimeError(f"no 'Sum' row in sclite's report {result}")


def _read_lines(path: Path) -> Dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            out[line.split(maxsplit=1)[0]] = line
    return out


def score_set(
    ref_text: Path,
    hyp_text: Path,
    utt2spk: Path,
    out_dir: Path,
    sclite: Optional[str] = "auto",
) -> Dict[str, object]:
    """WER and CER of one decoded set, as asr.sh's stage 13.

    Writes ``out_dir/score_{wer,cer}/{ref,hyp}.trn`` (and sclite's ``result.txt``
    when sclite runs) as asr.sh does.

    Args:
        ref_text, hyp_text: Kaldi ``text`` files (``utt-id transcript``).
        utt2spk: ``utt-id speaker``; sclite reports per speaker, the totals are
            what is returned.
        out_dir: where the ``score_*`` directories go.
        sclite: path of sclite, ``"auto"`` (:func:`find_sclite`) or ``None`` (use
            :func:`align`).

    Returns:
        ``{"wer": %, "cer": %, "scorer": "sclite" | "python", "counts": {"wer":
        [N, C, S, D, I], "cer": [...]}}``.
    """
    if sclite == "auto":
        sclite = find_sclite()
    refs, hyps = _read_lines(ref_text), _read_lines(hyp_text)
    spk = {
        u: s.split()[1] if len(s.split()) > 1 else u
        for u, s in _read_lines(utt2spk).items()
    }
    missing = sorted(set(refs) - set(spk))
    if missing:
        raise ValueError(f"{utt2spk} has no speaker for {missing[:3]}")
    result: Dict[str, object] = {"scorer": "sclite" if sclite else "python"}
    counts = {}
    for metric, unit in (("wer", "word"), ("cer", "char")):
        ref_tok = {u: asr_sh_tokens(refs[u], unit) for u in refs}
        hyp_tok = {u: asr_sh_tokens(hyps.get(u, u), unit) for u in refs}
        score_dir = out_dir / f"score_{metric}"
        score_dir.mkdir(parents=True, exist_ok=True)
        write_trn(score_dir / "ref.trn", ref_tok, spk)
        write_trn(score_dir / "hyp.trn", hyp_tok, spk)
        if sclite:
            total = run_sclite(
                sclite,
                score_dir / "ref.trn",
                score_dir / "hyp.trn",
                score_dir / "result.txt",
            )
        else:
            total = Counts(0, 0, 0, 0, 0)
            for u in refs:
                total = total + align(ref_tok[u], hyp_tok[u])
            (score_dir / "result.json").write_text(json.dumps(total._asdict()))
        result[metric] = total.rate
        counts[metric] = list(total)
    result["counts"] = counts
    return result
