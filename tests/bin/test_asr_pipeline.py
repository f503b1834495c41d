"""espnet_ext.bin.asr_pipeline builds asr.sh's commands; these tests record them."""

import stat
from pathlib import Path

import pytest

from espnet_ext.bin import asr_pipeline


def _recorded_train_args(tmp_path: Path, *extra: str) -> list:
    """Run the ``train`` stage with a fake interpreter that records its arguments."""
    record = tmp_path / "argv"
    fake = tmp_path / "fake_python"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    asr_pipeline.main(
        [
            "--train_dir", str(tmp_path / "train"),
            "--valid_dir", str(tmp_path / "dev"),
            "--asr_config", "conf.yaml",
            "--exp_dir", str(tmp_path / "exp"),
            "--stages", "train",
            "--python", str(fake),
            *extra,
        ]
    )  # fmt: skip
    return record.read_text().split("\n")


def _option(argv: list, name: str) -> list:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def test_global_mvn_trains_with_the_training_set_statistics(tmp_path):
    argv = _recorded_train_args(tmp_path)
    assert _option(argv, "--normalize") == ["global_mvn"]
    (conf,) = _option(argv, "--normalize_conf")
    assert conf.startswith("stats_file=") and conf.endswith("train/feats_stats.npz")


def test_utterance_mvn_needs_no_statistics_file(tmp_path):
    argv = _recorded_train_args(tmp_path, "--feats_normalize", "utterance_mvn")
    assert _option(argv, "--normalize") == ["utterance_mvn"]
    assert _option(argv, "--normalize_conf") == []


def test_unknown_normalisation_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        _recorded_train_args(tmp_path, "--feats_normalize", "global")
