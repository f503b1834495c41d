"""espnet_ext.bin.asr_pipeline builds asr.sh's commands; these tests record them."""

import stat
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml

from espnet_ext.bin import asr_pipeline


def _recorded_args(tmp_path: Path, *extra: str, stage: str = "train") -> list:
    """Run one stage with a fake interpreter that records its arguments."""
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
            "--stages", stage,
            "--python", str(fake),
            *extra,
        ]
    )  # fmt: skip
    return record.read_text().split("\n")


def _run_bpe_tokens_stage(tmp_path: Path, text: str, nbpe: int) -> Path:
    """Run the real ``tokens`` stage on ``text`` (a Kaldi text file's content);
    returns the token directory."""
    train = tmp_path / "exp" / "data" / "train"
    train.mkdir(parents=True)
    (train / "text").write_text(text)
    asr_pipeline.main(
        [
            "--train_dir", str(tmp_path / "train"),
            "--valid_dir", str(tmp_path / "dev"),
            "--asr_config", "conf.yaml",
            "--exp_dir", str(tmp_path / "exp"),
            "--stages", "tokens",
            "--token_type", "bpe",
            "--nbpe", str(nbpe),
        ]
    )  # fmt: skip
    return tmp_path / "exp" / "token_list" / f"bpe_unigram{nbpe}"


def _option(argv: list, name: str) -> list:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def test_global_mvn_trains_with_the_training_set_statistics(tmp_path):
    argv = _recorded_args(tmp_path)
    assert _option(argv, "--normalize") == ["global_mvn"]
    (conf,) = _option(argv, "--normalize_conf")
    assert conf.startswith("stats_file=") and conf.endswith("train/feats_stats.npz")


def test_utterance_mvn_needs_no_statistics_file(tmp_path):
    argv = _recorded_args(tmp_path, "--feats_normalize", "utterance_mvn")
    assert _option(argv, "--normalize") == ["utterance_mvn"]
    assert _option(argv, "--normalize_conf") == []


def test_unknown_normalisation_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        _recorded_args(tmp_path, "--feats_normalize", "global")


def test_char_tokens_need_no_sentencepiece_model(tmp_path):
    argv = _recorded_args(tmp_path)
    assert _option(argv, "--token_type") == ["char"]
    assert _option(argv, "--bpemodel") == ["none"]


def test_bpe_trains_with_the_sentencepiece_model_and_its_token_list(tmp_path):
    argv = _recorded_args(tmp_path, "--token_type", "bpe", "--nbpe", "40")
    token_dir = tmp_path / "exp" / "token_list" / "bpe_unigram40"
    assert _option(argv, "--token_type") == ["bpe"]
    assert _option(argv, "--bpemodel") == [str(token_dir / "bpe.model")]
    assert _option(argv, "--token_list") == [str(token_dir / "tokens.txt")]
    shapes = _option(argv, "--train_shape_file") + _option(argv, "--valid_shape_file")
    assert [Path(s).name for s in shapes] == ["speech_shape", "text_shape.bpe"] * 2
    assert all("asr_stats_raw_bpe40" in s for s in shapes)


def test_the_packed_bpe_model_includes_its_sentencepiece_model(tmp_path):
    argv = _recorded_args(tmp_path, "--token_type", "bpe", "--nbpe", "40", stage="pack")
    bpemodel = tmp_path / "exp" / "token_list" / "bpe_unigram40" / "bpe.model"
    assert str(bpemodel) in _option(argv, "--option")


def test_a_bpe_vocabulary_below_one_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        _recorded_args(tmp_path, "--token_type", "bpe", "--nbpe", "0")


def test_bpe_tokens_stage_writes_asr_sh_s_model_and_token_list(tmp_path):
    """The real stage: sentencepiece on the training text, then ESPnet's
    tokenize_text with that model (asr.sh's stage 5 for --token_type bpe)."""
    import random

    import sentencepiece as spm

    words = "the cat sat on a mat while seven green birds sang over quiet hills"
    rng = random.Random(0)
    text = "".join(
        f"utt{i:03d} {' '.join(rng.choices(words.upper().split(), k=6))}\n"
        for i in range(200)
    )
    token_dir = _run_bpe_tokens_stage(tmp_path, text, nbpe=30)
    model = spm.SentencePieceProcessor(model_file=str(token_dir / "bpe.model"))
    assert model.get_piece_size() == 30
    tokens = (token_dir / "tokens.txt").read_text().splitlines()
    assert tokens[:2] == ["<blank>", "<unk>"] and tokens[-1] == "<sos/eos>"
    # tokenize_text's vocabulary: the pieces the model cuts the training text into
    pieces = {p for line in (token_dir / "train.txt").read_text().splitlines()
              for p in model.encode(line, out_type=str)}  # fmt: skip
    assert set(tokens[2:-1]) == pieces


def test_a_sentencepiece_failure_names_its_log(tmp_path):
    with pytest.raises(RuntimeError, match="(?s)spm_train.*Vocabulary size too high"):
        _run_bpe_tokens_stage(tmp_path, "utt1 A CAT\nutt2 A MAT\n", nbpe=500)


TOKENS = "<blank>\n<unk>\n<space>\nE\nT\n<sos/eos>\n"


def _trained_lm(tmp_path: Path, token_list: list) -> Path:
    """An LM dir as lm_train leaves it: config.yaml naming its token list, and the
    checkpoint asr.sh decodes with (contents are not read before decoding)."""
    import yaml

    lm = tmp_path / "exp_lm"
    lm.mkdir()
    (lm / "config.yaml").write_text(yaml.safe_dump({"token_list": token_list}))
    (lm / "valid.loss.ave.pth").write_bytes(b"")
    tokens = tmp_path / "exp" / "token_list" / "char" / "tokens.txt"
    tokens.parent.mkdir(parents=True)
    tokens.write_text(TOKENS)
    return lm


def test_an_lm_decode_fuses_the_lm_and_gets_its_own_tag(tmp_path):
    lm = _trained_lm(tmp_path, TOKENS.split())
    lm_opts = ("--use_lm", "true", "--lm_config", "lm.yaml", "--lm_exp_dir", str(lm))
    argv = _recorded_args(tmp_path, *lm_opts, stage="decode")
    assert _option(argv, "--lm_train_config") == [str(lm / "config.yaml")]
    assert _option(argv, "--lm_file") == [str(lm / "valid.loss.ave.pth")]
    # the LM-free decode (decode_<model>/) is left alone
    (out,) = _option(argv, "--output_dir")
    assert Path(out).parent.name.endswith("_lm")


def test_an_lm_of_another_token_list_is_refused(tmp_path):
    lm = _trained_lm(tmp_path, ["<blank>", "<unk>", "<space>", "T", "E", "<sos/eos>"])
    lm_opts = ("--use_lm", "true", "--lm_config", "lm.yaml", "--lm_exp_dir", str(lm))
    with pytest.raises(ValueError, match="another token list"):
        _recorded_args(tmp_path, *lm_opts, stage="decode")


def test_training_with_use_lm_needs_no_trained_lm_yet(tmp_path):
    lm_opts = ("--use_lm", "true", "--lm_config", "lm.yaml")
    lm_opts += ("--lm_exp_dir", str(tmp_path / "no_lm_yet"))
    argv = _recorded_args(tmp_path, *lm_opts, stage="train")
    assert "espnet2.bin.asr_train" in argv


def test_use_lm_needs_an_lm_config(tmp_path):
    with pytest.raises(SystemExit):
        _recorded_args(tmp_path, "--use_lm", "true", stage="decode")


def test_the_lm_stage_trains_nothing_without_use_lm(tmp_path):
    with pytest.raises(FileNotFoundError):  # the fake interpreter never ran
        _recorded_args(tmp_path, stage="lm")


def test_a_distilled_model_s_report_names_its_teacher_and_its_training_time(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    torch.save({"w": torch.zeros(3, 4), "b": torch.zeros(4)}, teacher / "ave.pth")
    epoch = {"train": {"time": timedelta(minutes=50)}, "valid": {"acc": 0.5}}
    epoch["valid"]["time"] = timedelta(minutes=2)
    reporter = {"stats": {1: epoch, 2: epoch}, "epoch": 2}
    torch.save({"reporter": reporter}, teacher / "checkpoint.pth")
    conf = tmp_path / "config.yaml"
    distill = {"teacher_config": "t.yaml", "teacher_model": str(teacher / "ave.pth")}
    conf.write_text(yaml.safe_dump({"model_conf": {"distill": distill}}))
    summary = asr_pipeline._teacher_summary(conf)
    assert summary["params"] == 16 and summary["config"] == "t.yaml"
    assert summary["epochs"] == 2 and summary["train_seconds"] == 2 * 52 * 60


def test_a_model_without_distillation_reports_no_teacher(tmp_path):
    conf = tmp_path / "config.yaml"
    conf.write_text(yaml.safe_dump({"model_conf": {"ctc_weight": 0.3}}))
    assert asr_pipeline._teacher_summary(conf) is None
