"""The streaming benchmark's report (its timed runs are not part of the tests)."""

from espnet_ext.bench import streaming


def test_report_gives_each_models_streaming_over_full_ratio_and_the_ffn_table():
    rows = [
        ("dense", "full", 0.020, 3.0, 0.05),
        ("dense", "stream", 0.026, 1.1, 0.01),
        ("moe", "full", 0.030, 3.0, 0.08),
        ("moe", "stream", 0.045, 1.1, 0.02),
    ]
    ffn = [(16, 0.0002, 0.002), (50, 0.0004, 0.003)]
    text = streaming.render(
        rows, {"dense": 5.0, "moe": 26.0}, 24.5, ffn, 8, 3, 16, 4, "cpu"
    )
    assert "- dense: streaming RTF / full-context RTF = 1.30" in text
    assert "- moe: streaming RTF / full-context RTF = 1.50" in text
    assert "| 16 (one chunk) | 0.200 | 2.000 | 10.0 |" in text
    assert "| 50 (a mean-length utterance) | 0.400 | 3.000 | 7.5 |" in text
