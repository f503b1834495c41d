"""The MoE benchmark runs and writes its table (speed is never asserted in tests)."""

import pytest
import torch

from espnet_ext.bench import moe


def test_layer_benchmark_writes_a_table_with_every_size(tmp_path):
    out = tmp_path / "moe.md"
    moe.main(["--repeats", "1", "--skip_encoder", "--threads", "1", "--out", str(out)])
    text = out.read_text()
    for row in (
        "| inference | 16 |",
        "| inference | 256 |",
        "| inference | 2000 |",
        "| training | 2000 |",
    ):
        assert row in text


def test_layer_benchmark_refuses_a_baseline_that_computes_something_else():
    x = torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="'broken' differs from 'reference'"):
        moe._check_same_outputs(
            {"reference": lambda t: t, "broken": lambda t: 2 * t}, x
        )
