"""The residual benchmark runs on real speech and writes its table (speed is never
asserted in tests)."""

from conftest import REPO

from espnet_ext.bench import residual


def test_residual_benchmark_writes_sizes_formula_and_rtf(speechocean, tmp_path):
    out = tmp_path / "residual.md"
    residual.main(
        [
            "--configs",
            str(REPO / "tests/conf/tiny_residual_conformer.yaml"),
            "--repeats",
            "1",
            "--utterances",
            "1",
            "--corpus",
            str(speechocean),
            "--out",
            str(out),
        ]
    )
    text = out.read_text()
    for row in (
        "| dense conformer |",
        "| residual, merged (decoding) |",
        "| residual, unmerged (auto_merge off) |",
        "Parameter formula (checked against the count)",
    ):
        assert row in text
