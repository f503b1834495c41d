"""The start-up benchmark runs and writes its table (speed is never asserted here)."""

from espnet_ext.bench import startup


def test_startup_benchmark_writes_a_table_with_every_environment(tmp_path):
    out = tmp_path / "startup.md"
    startup.main(["--runs", "1", "--out", str(out)])
    text = out.read_text()
    for row in ("| bare venv |", "| with espnet_ext |", "ESPNET_EXT_DISABLE=1 |"):
        assert row in text
    assert "beyond a bare start (`-X importtime`): `espnet_ext`" in text
