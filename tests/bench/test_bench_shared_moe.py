"""The shared-experts benchmark runs on real speech and writes its table (speed is
never asserted in tests)."""

from conftest import REPO

from espnet_ext.bench import shared_moe


def test_shared_moe_benchmark_writes_sizes_formula_and_times(speechocean, tmp_path):
    out = tmp_path / "shared_moe.md"
    shared_moe.main(
        [
            "--configs",
            str(REPO / "tests/conf/tiny_shared_moe_conformer.yaml"),
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
    assert "| `tests/conf/tiny_shared_moe_conformer.yaml` (2 blocks, d=32" in text
    assert "Parameter formula (checked against the count)" in text
    assert "N_rest + G*(A + C + M*E*(2df+f+d))" in text
