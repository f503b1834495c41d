"""U2++ decoding modes through ESPnet's unmodified espnet2.bin.asr_inference."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from espnet2.bin import asr_inference
from espnet2.tasks.asr import ASRTask

from espnet_ext.decoding import inference_hook

TINY = {
    "encoder": "u2_conformer",
    "encoder_conf": {
        "output_size": 16,
        "attention_heads": 2,
        "linear_units": 24,
        "num_blocks": 2,
        "input_layer": "conv2d6",
        "macaron_style": True,
        "rel_pos_type": "latest",
        "cnn_module_kernel": 5,
        "use_dynamic_chunk": True,
        "use_dynamic_left_chunk": True,
        "causal": True,
    },
    "decoder": "bitransformer",
    "decoder_conf": {"attention_heads": 2, "linear_units": 24, "num_blocks": 1},
    "model": "espnet_ext",
    "model_conf": {"ctc_weight": 0.3, "reverse_weight": 0.3},
    "frontend_conf": {"n_fft": 512, "hop_length": 160, "n_mels": 20},
    "normalize": "utterance_mvn",
}
TOKENS = (
    ["<blank>", "<unk>", "<space>"]
    + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ'")
    + ["<sos/eos>"]
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, speechocean):
    """An (untrained) U2++ model as asr_train writes it, and 2 real utterances."""
    d = tmp_path_factory.mktemp("u2")
    (d / "train.yaml").write_text(yaml.safe_dump(TINY))
    (d / "tokens.txt").write_text("\n".join(TOKENS) + "\n")
    args = ASRTask.get_parser().parse_args(
        [
            "--config",
            str(d / "train.yaml"),
            "--token_list",
            str(d / "tokens.txt"),
            "--token_type",
            "char",
            "--output_dir",
            str(d / "exp"),
            "--iterator_type",
            "none",
            "--dry_run",
            "true",
        ]
    )
    ASRTask.main(args=args)
    torch.manual_seed(0)
    model = ASRTask.build_model(args)
    torch.save(model.state_dict(), d / "exp" / "model.pth")
    lines = (speechocean / "dev" / "wav.scp").read_text().splitlines()[:2]
    with open(d / "wav.scp", "w") as f:
        for line in lines:
            key, rel = line.split(maxsplit=1)
            f.write(f"{key} {speechocean / rel}\n")
    return d


def _decode(d: Path, name: str, conf: dict) -> Path:
    (d / f"{name}.yaml").write_text(yaml.safe_dump(conf))
    out = d / "out" / name
    asr_inference.main(
        [
            "--data_path_and_name_and_type",
            f"{d / 'wav.scp'},speech,sound",
            "--asr_train_config",
            str(d / "exp" / "config.yaml"),
            "--asr_model_file",
            str(d / "exp" / "model.pth"),
            "--output_dir",
            str(out),
            "--config",
            str(d / f"{name}.yaml"),
            "--ngpu",
            "0",
            "--batch_size",
            "1",
        ]
    )
    return out


def _read(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(" ")
        out[key] = value
    return out


MODES = {
    "attention": {"beam_size": 2, "ctc_weight": 0.3, "maxlenratio": 0.3},
    "ctc_greedy": {"decoding_mode": "ctc_greedy"},
    "ctc_prefix_beam": {"decoding_mode": "ctc_prefix_beam", "beam_size": 3, "nbest": 3},
    "attention_rescoring": {
        "decoding_mode": "attention_rescoring",
        "beam_size": 3,
        "ctc_weight": 0.5,
        "decoding_reverse_weight": 0.3,
    },
}


def test_every_mode_full_context_and_streaming_writes_espnet_outputs(tiny_model):
    outs = {}
    for mode, conf in MODES.items():
        for chunk in (None, 4):
            c = dict(conf)
            if chunk is not None:
                c.update(
                    decoding_chunk_size=chunk,
                    num_decoding_left_chunks=2,
                    simulate_streaming=mode == "ctc_greedy",
                )
            name = f"{mode}_{chunk}"
            out = _decode(tiny_model, name, c)
            best = out / "1best_recog"
            for f in ("text", "token", "token_int", "score"):
                assert (best / f).exists(), (name, f)
            outs[name] = (_read(best / "token_int"), _read(best / "score"))
            assert len(outs[name][0]) == 2
    # attention rescoring returns one of the CTC prefix beam's n-best (same beam)
    for chunk in (None, 4):
        prefix_dir = tiny_model / "out" / f"ctc_prefix_beam_{chunk}"
        nbest = [_read(prefix_dir / f"{i}best_recog" / "token_int") for i in (1, 2, 3)]
        rescored = outs[f"attention_rescoring_{chunk}"][0]
        for key, tokens in rescored.items():
            assert tokens in [n.get(key) for n in nbest], (chunk, key)
    # chunked attention changes the encoder output, hence the CTC scores
    assert outs["ctc_greedy_None"][1] != outs["ctc_greedy_4"][1]


def _args(tmp_path, name):
    # asr_inference's required options, so that only the decode YAML can fail
    return [
        "--output_dir",
        str(tmp_path),
        "--data_path_and_name_and_type",
        "wav.scp,speech,sound",
        "--config",
        str(tmp_path / name),
    ]


@pytest.mark.parametrize(
    "conf,message",
    [
        ({"decoding_chunk_size": 0}, "error: decoding_chunk_size must be"),
        ({"decoding_chunk_size": -16}, "error: decoding_chunk_size must be"),
        ({"decoding_mode": "beam_of_light"}, "error: decoding_mode must be one of"),
        ({"simulate_streaming": True}, "error: simulate_streaming: true needs"),
    ],
)
def test_bad_decode_yaml_is_a_clear_error(tmp_path, capsys, conf, message):
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(conf))
    with pytest.raises(SystemExit):
        asr_inference.get_parser().parse_args(_args(tmp_path, "d.yaml"))
    assert message in capsys.readouterr().err


def test_options_are_removed_before_espnet_inference_sees_them(tmp_path):
    (tmp_path / "d.yaml").write_text(
        yaml.safe_dump({"decoding_mode": "ctc_greedy", "decoding_chunk_size": 8})
    )
    args = asr_inference.get_parser().parse_args(_args(tmp_path, "d.yaml"))
    assert not hasattr(args, "decoding_mode")
    assert inference_hook._state["options"].decoding_chunk_size == 8
    # a plain decode YAML leaves ESPnet alone
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"beam_size": 2}))
    asr_inference.get_parser().parse_args(_args(tmp_path, "p.yaml"))
    assert inference_hook._state["options"] is None


def test_stream_asr_cli_prints_partials_and_final(tiny_model, speechocean, capsys):
    from espnet_ext.bin import stream_asr

    key, wav = (tiny_model / "wav.scp").read_text().splitlines()[0].split()
    text = stream_asr.main(
        [
            "--asr_train_config",
            str(tiny_model / "exp" / "config.yaml"),
            "--asr_model_file",
            str(tiny_model / "exp" / "model.pth"),
            "--wav",
            wav,
            "--decoding_chunk_size",
            "4",
            "--num_decoding_left_chunks",
            "2",
            "--beam_size",
            "3",
        ]
    )
    out = capsys.readouterr().out.splitlines()
    assert out[-1].endswith(f"final: {text}")
    assert all("partial:" in line for line in out[:-1])
    with pytest.raises(SystemExit):
        stream_asr.main(
            [
                "--asr_train_config",
                "x",
                "--asr_model_file",
                "y",
                "--wav",
                wav,
                "--decoding_chunk_size",
                "0",
            ]
        )


@pytest.mark.parametrize("samples", [0, 256])
def test_too_short_utterance_is_a_clear_error(tiny_model, samples):
    from espnet2.bin.asr_inference import Speech2Text

    s2t = Speech2Text(
        str(tiny_model / "exp" / "config.yaml"), str(tiny_model / "exp" / "model.pth")
    )
    with pytest.raises(ValueError, match=f"utterance of {samples} samples is too sh"):
        s2t(np.zeros(samples, dtype=np.float32))


def test_espnet_models_keep_espnet_behaviour_for_short_input():
    from espnet2.asr.frontend.default import DefaultFrontend

    plain = torch.nn.Module()  # only ESPnet classes inside
    plain.frontend = DefaultFrontend(n_fft=512, hop_length=160, n_mels=20)
    inference_hook.guard_short_input(plain)
    assert not plain.frontend._forward_pre_hooks


def test_measure_asr_times_a_u2_decode_yaml(tiny_model, tmp_path):
    from espnet_ext.bin.measure_asr import measure

    conf = {"decoding_mode": "attention_rescoring", "decoding_chunk_size": 4}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({**conf, "beam_size": 2}))
    res = measure(
        tiny_model / "exp" / "config.yaml",
        tiny_model / "exp" / "model.pth",
        tiny_model,
        tmp_path / "d.yaml",
        max_utts=1,
    )
    assert res["rtf"] > 0 and res["rtf_utts"] == 1
