"""The streaming benchmark's report (its timed runs are not part of the tests)."""

import pytest
import torch

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


def test_report_names_trained_models_and_experts_per_call():
    rows = [
        ("dense", "full", 0.020, 3.0, 0.05),
        ("dense", "stream", 0.026, 1.1, 0.01),
        ("moe", "full", 0.030, 3.0, 0.08),
        ("moe", "stream", 0.039, 1.1, 0.02),
    ]
    text = streaming.render(
        rows,
        {"dense": 5.0, "moe": 26.0},
        24.5,
        [(16, 0.0002, 0.002)],
        8,
        3,
        16,
        4,
        "cpu",
        used={"full": 6.2, "stream": 4.9, "experts": 8.0},
        trained={"dense": "exp/d/asr_train", "moe": "exp/m/asr_train"},
    )
    assert "trained models (dense `exp/d/asr_train`, MoE `exp/m/asr_train`)" in text
    assert "6.2 experts per call full-context, 4.9 streaming (of 8)" in text
    assert "untrained" not in text


def _tiny_experiment(root):
    """A recipe layout as asr.sh leaves it: config.yaml names its token list
    relative to the recipe directory ``root``."""
    import yaml
    from model_zoo import build_case, full_config

    tokens = root / "data" / "token_list" / "char" / "tokens.txt"
    tokens.parent.mkdir(parents=True)
    tokens.write_text("\n".join(streaming.TOKENS) + "\n")
    exp = root / "exp" / "tiny" / "asr_train"
    exp.mkdir(parents=True)
    conf = {
        "encoder": "u2_conformer",
        "encoder_conf": {
            "output_size": 16,
            "attention_heads": 2,
            "linear_units": 24,
            "num_blocks": 1,
            "input_layer": "conv2d6",
            "rel_pos_type": "latest",
            "causal": True,
        },
        "decoder": "bitransformer",
        "decoder_conf": {"attention_heads": 2, "linear_units": 24, "num_blocks": 1},
        "model": "espnet_ext",
        "model_conf": {"ctc_weight": 0.3, "reverse_weight": 0.3},
        "frontend_conf": {"n_mels": 20},
        "normalize": "utterance_mvn",
        "token_list": list(streaming.TOKENS),
        "token_type": "char",
    }
    model = build_case(conf, seed=3)
    torch.save(model.state_dict(), exp / "model.pth")
    # As ESPnet writes it: the token list's path as given on asr.sh's command line.
    args = vars(full_config({**conf, "token_list": "data/token_list/char/tokens.txt"}))
    (exp / "config.yaml").write_text(yaml.safe_dump(args))
    return exp, model


def test_trained_model_loads_from_any_working_directory(tmp_path, monkeypatch):
    exp, model = _tiny_experiment(tmp_path / "recipe")
    monkeypatch.chdir(tmp_path)  # not the recipe dir: the token list is found above
    s2t = streaming.load_trained(exp, "model.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(s2t.asr_model.state_dict()[key], value), key
    assert s2t.converter.token_list == streaming.TOKENS
    assert not s2t.asr_model.training


def test_missing_trained_model_file_names_the_path(tmp_path):
    exp, _ = _tiny_experiment(tmp_path / "recipe")
    with pytest.raises(FileNotFoundError, match="valid.acc.ave.pth"):
        streaming.load_trained(exp, "valid.acc.ave.pth")


def test_dense_and_moe_experiments_go_together(capsys):
    with pytest.raises(SystemExit, match="--dense_exp and --moe_exp go together"):
        streaming.main(["--dense_exp", "exp/x/asr_train"])
