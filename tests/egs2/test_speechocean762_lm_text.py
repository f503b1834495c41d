"""``local/lm_text.py``: the language model's text, on small fake Debian sources."""

import json

import pytest
from conftest import recipe_tool

# Two synsets as WordNet's data.* files store them: examples are the quoted parts
# after '|'; lines starting with two spaces are the licence header.
WORDNET = (
    "  1 This software and database is being provided\n"
    '00001740 03 n 01 entity 0 003 | that which exists; "he\'s a miracle worker"; '
    '"the inconclusive committee vote"\n'
    '00002137 03 n 01 thing 0 000 | a thing; "I saw 3 cats"; "a café"; "ok"\n'
)
FORTUNES = (
    "Is there a better way to die?  No matter how much you do, you never do "
    "enough.\n\t\t-- James F.\n%\nLook at Bob's T-shirt!\n%\n"
)


@pytest.fixture(scope="module")
def tool():
    return recipe_tool("lm_text")


@pytest.fixture
def sources(tmp_path):
    wordnet, fortunes = tmp_path / "wordnet", tmp_path / "fortunes"
    wordnet.mkdir()
    fortunes.mkdir()
    (wordnet / "data.noun").write_text(WORDNET, encoding="latin-1")
    (fortunes / "misc").write_text(FORTUNES, encoding="latin-1")
    (fortunes / "misc.dat").write_bytes(b"\x00\x01")  # strfile index: not text
    (tmp_path / "train").write_text("u1 HELLO THERE\nu2 GOOD MORNING\n")
    (tmp_path / "test").write_text("t1 LOOK AT BOB'S T SHIRT\n")
    return tmp_path


def _run(tool, d, *extra):
    stats = tool.main(
        [
            "--train_text", str(d / "train"),
            "--exclude", str(d / "test"),
            "--out_dir", str(d / "out"),
            "--wordnet", str(d / "wordnet"),
            "--fortunes", str(d / "fortunes"),
            *extra,
        ]
    )  # fmt: skip
    lines = (d / "out" / "text").read_text().splitlines()
    return stats, [line.split(" ", 1)[1] for line in lines]


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("he's a miracle worker", "HE'S A MIRACLE WORKER"),
        ("Look at Bob's T-shirt!", "LOOK AT BOB'S T SHIRT"),
        ("'quoted' words, and/or commas.", "QUOTED WORDS AND OR COMMAS"),
        ("I saw 3 cats", ""),
        ("a café", ""),
    ],
)
def test_sentences_are_written_in_the_transcripts_alphabet(tool, raw, expected):
    assert tool.normalise(raw) == expected


def test_examples_and_fortunes_come_before_the_training_transcripts(tool, sources):
    _, sentences = _run(tool, sources)
    assert sentences == [
        "HE'S A MIRACLE WORKER",
        "THE INCONCLUSIVE COMMITTEE VOTE",
        "IS THERE A BETTER WAY TO DIE",
        "NO MATTER HOW MUCH YOU DO YOU NEVER DO ENOUGH",
        "HELLO THERE",
        "GOOD MORNING",
    ]


def test_a_held_out_transcript_is_dropped_and_counted(tool, sources):
    stats, sentences = _run(tool, sources)
    assert "LOOK AT BOB'S T SHIRT" not in sentences
    assert stats["fortunes"]["dropped_held_out"] == 1
    assert json.loads((sources / "out" / "lm_text.json").read_text()) == stats


def test_sentences_outside_the_word_range_are_dropped(tool, sources):
    _, sentences = _run(tool, sources, "--min_words", "4", "--max_words", "4")
    # the training transcripts are kept whatever their length
    assert sentences == [
        "HE'S A MIRACLE WORKER",
        "THE INCONCLUSIVE COMMITTEE VOTE",
        "HELLO THERE",
        "GOOD MORNING",
    ]


def test_missing_sources_name_the_debian_package(tool, sources):
    (sources / "wordnet" / "data.noun").unlink()
    with pytest.raises(SystemExit, match="wordnet-base"):
        _run(tool, sources)
