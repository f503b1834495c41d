"""Scoring: asr_pipeline's WER/CER are asr.sh's (ESPnet tokens, sclite's alignment)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from espnet_ext.bin.scoring import Counts, align, asr_sh_tokens, find_sclite, score_set

DATA = Path(__file__).parent / "data" / "scoring"

# asr.sh stage 13 for one set, with the same commands and options: ESPnet's
# tokenize_text CLI (ref with --cleaner none, hyp without), "(speaker-utt)" ids
# pasted on, then sclite. $1: dir with text, hyp and utt2spk; $2: output dir.
ASR_SH_SCORING = r"""
set -euo pipefail
d=$1; out=$2
"$PYTHON" - "$d" "$out" <<'PY'
import sys
from espnet2.bin.tokenize_text import main
d, out = sys.argv[1:]
for unit in ("word", "char"):
    for name, extra in (("text", ["--cleaner", "none"]), ("hyp", [])):
        main(["-f", "2-", "--input", f"{d}/{name}", "--output", f"{out}/{unit}.{name}",
              "--token_type", unit, "--non_linguistic_symbols", "none",
              "--remove_non_linguistic_symbols", "true", *extra])
PY
for unit in word char; do
    for name in text hyp; do
        paste "$out/$unit.$name" <(awk '{ print "(" $2 "-" $1 ")" }' "$d/utt2spk") \
            > "$out/$unit.$name.trn"
    done
    "$SCLITE" -r "$out/$unit.text.trn" trn -h "$out/$unit.hyp.trn" trn -i rm \
        -o all stdout > "$out/$unit.result.txt"
done
"""


def _sum_row(result: Path) -> list:
    """[N, C, S, D, I] from the raw ``| Sum |`` row of an sclite report."""
    for line in result.read_text().splitlines():
        cells = [c.split() for c in line.split("|")[1:-1]]
        if cells and cells[0] == ["Sum"]:
            return [int(cells[1][1]), *map(int, cells[2][:4])]
    raise AssertionError(f"no Sum row in {result}")


@pytest.fixture(scope="module")
def asr_sh(tmp_path_factory):
    """The fixture scored by asr.sh's own commands (needs sclite)."""
    sclite = find_sclite()
    if sclite is None:
        pytest.skip("sclite not installed (Debian: apt-get install sctk)")
    out = tmp_path_factory.mktemp("asr_sh")
    subprocess.run(
        ["bash", "-c", ASR_SH_SCORING, "asr_sh", str(DATA), str(out)],
        env={"PYTHON": sys.executable, "SCLITE": sclite, "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """The fixture scored by asr_pipeline's scorer without sclite."""
    out = tmp_path_factory.mktemp("ours")
    res = score_set(DATA / "text", DATA / "hyp", DATA / "utt2spk", out, sclite=None)
    return out, res


@pytest.mark.parametrize("metric, unit", [("wer", "word"), ("cer", "char")])
def test_python_scorer_counts_equal_asr_sh_with_sclite(asr_sh, ours, metric, unit):
    assert ours[1]["counts"][metric] == _sum_row(asr_sh / f"{unit}.result.txt")


@pytest.mark.parametrize("metric, unit", [("wer", "word"), ("cer", "char")])
def test_trn_files_equal_asr_sh_ones(asr_sh, ours, metric, unit):
    for ours_name, theirs in (("ref.trn", "text.trn"), ("hyp.trn", "hyp.trn")):
        assert (ours[0] / f"score_{metric}" / ours_name).read_text() == (
            asr_sh / f"{unit}.{theirs}"
        ).read_text()


def test_python_scorer_matches_the_recorded_sclite_counts(ours):
    # expected.json holds the Sum rows of ASR_SH_SCORING on this fixture, so the
    # Python path stays checked where sclite is not installed.
    expected = json.loads((DATA / "expected.json").read_text())
    assert ours[1]["counts"] == expected["counts"]
    assert ours[1]["wer"] == pytest.approx(expected["wer"], abs=0.05)
    assert ours[1]["cer"] == pytest.approx(expected["cer"], abs=0.05)


@pytest.mark.skipif(find_sclite() is None, reason="sclite not installed")
def test_score_set_with_sclite_equals_without(ours, tmp_path):
    res = score_set(DATA / "text", DATA / "hyp", DATA / "utt2spk", tmp_path)
    assert res["scorer"] == "sclite" and res["counts"] == ours[1]["counts"]


def test_a_space_is_a_character_token():
    assert asr_sh_tokens("u1  AB   C ", "char") == ["A", "B", "<space>", "C"]


def test_alignment_ties_break_as_sclite():
    # 3 substitutions cost as much as 2 insertions + 2 deletions (12); sclite
    # reports the alignment with the substitutions (4 errors, not 5).
    assert align("A A B A B".split(), "B B B A A A".split()) == Counts(5, 2, 3, 0, 1)


def test_tokens_compare_case_insensitively_as_in_sclite():
    assert align(["Hello", "WORLD"], ["hello", "world"]) == Counts(2, 2, 0, 0, 0)
