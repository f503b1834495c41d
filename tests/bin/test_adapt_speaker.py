"""``python -m espnet_ext.bin.adapt_speaker`` on real speechocean762 utterances."""

from pathlib import Path

import pytest
import torch
import yaml

from espnet_ext.adapters.saml import load_adapter
from espnet_ext.bin import adapt_speaker
from espnet_ext.bin.adapt_speaker import _Batcher, load_model, main

SAML = ["--num_experts", "2", "--rank", "2", "--alpha", "4", "--dropout_rate", "0"]
SAML_CONF = dict(num_experts=2, rank=2, alpha=4.0, dropout_rate=0.0)


def _data_dir(corpus: Path, tmp: Path, n: int = 4) -> Path:
    """Speaker 0001's first ``n`` training utterances as a Kaldi dir."""
    d = tmp / "data"
    d.mkdir()
    utts = (corpus / "train" / "spk2utt").read_text().split("\n")[0].split()[1 : n + 1]
    wav = dict(
        ln.split(" ", 1) for ln in (corpus / "train/wav.scp").read_text().splitlines()
    )
    text = dict(
        ln.split(" ", 1) for ln in (corpus / "train/text").read_text().splitlines()
    )
    (d / "wav.scp").write_text("".join(f"{u} {corpus / wav[u]}\n" for u in utts))
    (d / "text").write_text("".join(f"{u} {text[u]}\n" for u in utts))
    (d / "spk2utt").write_text("0001 " + " ".join(utts) + "\n")
    return d


def _tiny_model(tmp: Path, data: Path, seed: int = 0):
    """config.yaml + model file of a tiny random ESPnet conformer (char tokens)."""
    import espnet2.tasks.asr  # noqa: F401
    from espnet2.tasks.asr import ASRTask

    chars = sorted(
        {
            c
            for line in (data / "text").read_text().splitlines()
            for c in line.split(" ", 1)[1].replace(" ", "")
        }
    )
    tokens = ["<blank>", "<unk>", "<space>", *chars, "<sos/eos>"]
    (tmp / "tokens.txt").write_text("\n".join(tokens) + "\n")
    conf = {
        "token_list": str(tmp / "tokens.txt"),
        "token_type": "char",
        "frontend_conf": {"n_fft": 256, "hop_length": 160, "n_mels": 16},
        "normalize": "utterance_mvn",
        "encoder": "conformer",
        "encoder_conf": {
            "output_size": 16,
            "attention_heads": 2,
            "linear_units": 32,
            "num_blocks": 1,
            "cnn_module_kernel": 3,
            "use_flash_attn": False,
        },
        "decoder": "transformer",
        "decoder_conf": {
            "attention_heads": 2,
            "linear_units": 32,
            "num_blocks": 1,
            "use_flash_attn": False,
        },
    }
    (tmp / "train.yaml").write_text(yaml.safe_dump(conf))
    args = ASRTask.get_parser().parse_args(["--config", str(tmp / "train.yaml")])
    torch.manual_seed(seed)
    model = ASRTask.build_model(args)
    args.token_list = tokens
    (tmp / f"config{seed}.yaml").write_text(yaml.safe_dump(vars(args)))
    torch.save(model.state_dict(), tmp / f"model{seed}.pth")
    return str(tmp / f"config{seed}.yaml"), str(tmp / f"model{seed}.pth")


def test_adaptation_lowers_the_loss_and_the_file_reproduces_it(speechocean, tmp_path):
    data = _data_dir(speechocean, tmp_path)
    cfg, mdl = _tiny_model(tmp_path, data)
    out = tmp_path / "adapt"
    summary = main(
        [
            "--asr_train_config",
            cfg,
            "--asr_model_file",
            mdl,
            "--data_dir",
            str(data),
            "--speaker",
            "0001",
            "--utt_slice",
            "0:3",
            "--output_dir",
            str(out),
            "--steps",
            "10",
            "--lr_router",
            "0.01",
            "--lr_experts",
            "0.01",
            "--quiet",
            *SAML,
        ]
    )
    rec = summary["0001"]
    assert rec["adapt_utts"] == 3
    assert rec["loss_after"] < rec["loss_before"]
    # A fresh copy of the base + the file reproduces the adapted model's loss.
    fresh, args, _ = load_model(cfg, mdl, SAML_CONF)
    load_adapter(fresh, str(out / "0001.saml.pth"))
    fresh.eval()
    utts = (data / "spk2utt").read_text().split()[1:4]
    with torch.no_grad():
        loss = float(fresh(*_Batcher(args, data)(utts))[0])
    assert loss == pytest.approx(rec["loss_after"], rel=1e-5)
    assert (out / "0001.saml.pth").stat().st_size < Path(mdl).stat().st_size

    # Refusals, each with its reason.
    with pytest.raises(ValueError, match="no utterances"):
        main(
            [
                "--asr_train_config",
                cfg,
                "--asr_model_file",
                mdl,
                "--data_dir",
                str(data),
                "--speaker",
                "9999",
                "--output_dir",
                str(out),
            ]
        )
    with pytest.raises(ValueError, match="no utterance in --utt_slice"):
        main(
            [
                "--asr_train_config",
                cfg,
                "--asr_model_file",
                mdl,
                "--data_dir",
                str(data),
                "--utt_slice",
                "10:20",
                "--output_dir",
                str(out),
            ]
        )
    cfg1, mdl1 = _tiny_model(tmp_path, data, seed=1)
    other, _, _ = load_model(cfg1, mdl1, SAML_CONF)
    with pytest.raises(ValueError, match="another base model"):
        load_adapter(other, str(out / "0001.saml.pth"))
    pytest.importorskip("torchao")
    quant, _, _ = load_model(
        cfg, mdl, {**SAML_CONF, "quantize": "int8", "quantize_block_size": 16}
    )
    with pytest.raises(ValueError, match="int8-quantised"):
        load_adapter(quant, str(out / "0001.saml.pth"))


def test_quantised_checkpoint_decodes_through_speech2text(speechocean, tmp_path):
    pytest.importorskip("torchao")
    import argparse

    from espnet2.bin.asr_inference import Speech2Text
    from espnet2.layers.create_adapter import create_adapter
    from espnet2.tasks.asr import ASRTask

    data = _data_dir(speechocean, tmp_path, n=1)
    cfg, _ = _tiny_model(tmp_path, data)
    conf = yaml.safe_load(Path(cfg).read_text())
    conf.update(
        use_adapter=True,
        adapter="saml",
        adapter_conf={**SAML_CONF, "quantize": "nf4", "quantize_block_size": 16},
    )
    (tmp_path / "config_q.yaml").write_text(yaml.safe_dump(conf))
    # As asr_train: build, create the adapter, (train,) save the state dict.
    model = ASRTask.build_model(argparse.Namespace(**conf))
    create_adapter(model, "saml", conf["adapter_conf"])
    torch.save(model.state_dict(), tmp_path / "q.pth")
    assert "encoder.encoders.0.self_attn.linear_q.weight_nf4_codes" in torch.load(
        tmp_path / "q.pth"
    )
    s2t = Speech2Text(
        str(tmp_path / "config_q.yaml"), str(tmp_path / "q.pth"), beam_size=2
    )
    loaded = s2t.asr_model
    assert loaded.encoder.encoders[0].self_attn.linear_q.fmt == "nf4"
    got = loaded.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v), k
    utt = (data / "spk2utt").read_text().split()[1]
    speech = _Batcher(s2t.asr_train_args, data)([utt])[0][0]
    hyps = s2t(speech)
    assert hyps and isinstance(hyps[0][0], str)


def test_a_slice_from_the_end_reads_as_a_value_not_an_option():
    argv = ["--decode_slice", "-10:", "--utt_slice", "0:10", "--eval_slice=-5:"]
    opts = adapt_speaker.build_parser().parse_args(
        ["--asr_train_config", "c", "--asr_model_file", "m", "--data_dir", "d"]
        + ["--output_dir", "o"]
        + adapt_speaker._attach_slice_values(argv)
    )
    assert (opts.decode_slice, opts.utt_slice, opts.eval_slice) == (
        "-10:",
        "0:10",
        "-5:",
    )
