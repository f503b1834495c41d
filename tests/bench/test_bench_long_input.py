"""The long-input benchmark runs on real speech and writes its table (speed and memory
are never asserted in tests)."""

from conftest import REPO

from espnet_ext.bench import long_input


def test_long_input_benchmark_writes_time_and_memory_ratios(speechocean, tmp_path):
    out = tmp_path / "long_input.md"
    configs = [
        REPO / "tests/conf/tiny_residual_conformer.yaml",
        REPO / "tests/conf/tiny_moe_conformer.yaml",
    ]
    long_input.main(
        [
            "--configs",
            *map(str, configs),
            "--seconds",
            "1",
            "3",
            "--repeats",
            "1",
            "--corpus",
            str(speechocean),
            "--out",
            str(out),
        ]
    )
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| `tiny_")]
    assert len(rows) == 2
    cells = rows[1].strip("|").split("|")
    assert len(cells) == 9 and all(c.strip() for c in cells)
    assert cells[5].strip() != "n/a"  # peak memory measured (Linux)


def test_encoders_are_built_with_their_adapter(tmp_path):
    conf = (REPO / "tests/conf/tiny_residual_conformer.yaml").read_text()
    conf = conf.replace("encoder: residual_conformer", "encoder: conformer")
    conf = conf.replace("    share_group_size: 2\n    lowrank_rank: 4\n", "")
    conf += "use_adapter: true\nadapter: saml\nadapter_conf:\n    num_experts: 2\n"
    (tmp_path / "c.yaml").write_text(conf)
    encoder, frontend_conf = long_input.build_encoder(tmp_path / "c.yaml")
    assert frontend_conf["n_mels"] == 40
    assert any("saml_routers" in n for n, _ in encoder.named_parameters())
