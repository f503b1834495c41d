"""The I3D benchmark runs on real speech and writes its table (speed is never
asserted in tests)."""

from conftest import REPO

from espnet_ext.bench import i3d


def test_half_closed_pattern_closes_half_of_every_kind():
    slots = [
        (b, a, k)
        for b in range(4)
        for a, k in (("self_attn", "attn"), ("conv_module", "conv"), ("ff", "ffn"))
    ]
    pattern = i3d.half_closed_pattern(slots)
    for kind in ("attn", "conv", "ffn"):
        opened = [p for p, s in zip(pattern, slots) if s[2] == kind]
        assert sum(opened) == len(opened) // 2


def test_gated_fraction_removes_the_time_no_gate_can_skip():
    # front end 0.3 of all open; gated modules 0.7, of which half run: 0.35
    single = {"all closed": {"ratio": 0.3}, "half closed": {"ratio": 0.65}}
    assert abs(i3d.gated_fraction(single) - 0.5) < 1e-12


def test_i3d_benchmark_writes_single_and_batched_tables(speechocean, tmp_path):
    out = tmp_path / "i3d.md"
    i3d.main(
        [
            "--configs",
            str(REPO / "tests/conf/tiny_i3d_conformer.yaml"),
            "--repeats",
            "1",
            "--utterances",
            "2",
            "--batch_size",
            "2",
            "--devices",
            "cpu",
            "--corpus",
            str(speechocean),
            "--out",
            str(out),
        ]
    )
    text = out.read_text()
    for row in ("| plain |", "| all open |", "| half closed |", "| all closed |"):
        assert row in text
    assert "| predicted, ~half open |" in text and "Half closed / all open" in text
    assert "The gated part alone" in text
