"""Residual-shared encoders inside ESPnet's models and decoding entry points."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_python
from espnet2.asr.ctc import CTC
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
from espnet2.asr.espnet_model import ESPnetASRModel

from espnet_ext.encoders.residual_conformer import ResidualConformerEncoder
from espnet_ext.models.asr_model import ESPnetExtASRModel

V = 10


def _model(cls):
    torch.manual_seed(0)
    encoder = ResidualConformerEncoder(
        12,
        output_size=16,
        attention_heads=2,
        linear_units=24,
        num_blocks=2,
        share_group_size=2,
        lowrank_rank=2,
        dropout_rate=0.0,
    )
    decoder = TransformerDecoder(
        V, 16, attention_heads=2, linear_units=24, num_blocks=1
    )
    return cls(
        vocab_size=V,
        token_list=[str(i) for i in range(V)],
        frontend=None,
        specaug=None,
        normalize=None,
        preencoder=None,
        encoder=encoder,
        postencoder=None,
        decoder=decoder,
        ctc=CTC(V, 16),
        joint_network=None,
        report_cer=False,
        report_wer=False,
    )


def test_espnet_ext_model_computes_espnet_models_loss_with_a_residual_encoder():
    base = _model(ESPnetASRModel).train()
    ext = _model(ESPnetExtASRModel).train()
    ext.load_state_dict(base.state_dict())
    torch.manual_seed(2)
    batch = dict(
        speech=torch.randn(2, 40, 12),
        speech_lengths=torch.tensor([40, 33]),
        text=torch.tensor([[1, 2, 3], [4, 5, -1]]),
        text_lengths=torch.tensor([3, 2]),
    )
    torch.manual_seed(3)
    loss_b, stats_b, _ = base(**batch)
    torch.manual_seed(3)
    loss_e, stats_e, _ = ext(**batch)
    assert torch.equal(loss_e, loss_b) and stats_e.keys() == stats_b.keys()
    loss_e.backward()
    shared = ext.encoder.encoders[0].self_attn.linear_q.shared.weight
    assert shared.grad is not None and shared.grad.abs().sum() > 0


@pytest.mark.slow
def test_packed_tiny_model_decodes_merged_through_speech2text(speechocean, tmp_path):
    """asr.sh's chain (stats, training, asr_inference, pack) on real speech, then
    the packed model through Speech2Text in a fresh interpreter: it decodes, the
    encoder ran merged without being asked, and the checkpoint holds the compact
    form with exactly the model's keys."""
    exp = tmp_path / "exp"
    cmd = [
        sys.executable,
        "-m",
        "espnet_ext.bin.asr_pipeline",
        "--train_dir",
        str(speechocean / "train"),
        "--valid_dir",
        str(speechocean / "dev"),
        "--asr_config",
        str(REPO / "tests/conf/tiny_residual_conformer.yaml"),
        "--inference_config",
        str(REPO / "tests/conf/decode_tiny.yaml"),
        "--exp_dir",
        str(exp),
        "--max_train_utts",
        "12",
        "--max_eval_utts",
        "2",
        "--stages",
        "data",
        "tokens",
        "stats",
        "train",
        "pack",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wav = (speechocean / "dev" / "wav.scp").read_text().split("\n")[0].split()[1]
    code = f"""
import json, soundfile, torch
from espnet2.bin.asr_inference import Speech2Text
from espnet2.main_funcs.pack_funcs import unpack

files = unpack("{exp / 'asr_model.zip'}", "{tmp_path / 'unpacked'}")
s2t = Speech2Text(asr_train_config=files["asr_train_config"],
                  asr_model_file=files["asr_model_file"], device="cpu", beam_size=2,
                  ctc_weight=0.3, maxlenratio=0.5)
enc = s2t.asr_model.encoder
before = enc.merged
speech, _ = soundfile.read("{speechocean / wav}", dtype="float32")
hyp = s2t(torch.from_numpy(speech))[0][0]
after = enc.merged
state = torch.load(files["asr_model_file"], map_location="cpu")
missing, unexpected = s2t.asr_model.load_state_dict(state, strict=False)
print(json.dumps(dict(
    encoder=type(enc).__name__, before=before, after=after,
    stale=enc.merged,
    hyp_type=type(hyp).__name__, missing=missing, unexpected=unexpected,
    shared=sorted(k for k in state if ".residual_shared." in k)[:2],
    cached=sum("merged" in k for k in state))))
"""
    out = json.loads(run_python(code).stdout.strip().splitlines()[-1])
    assert out["encoder"] == "ResidualConformerEncoder"
    assert out["before"] is False and out["after"] is True
    assert out["stale"] is False  # load_state_dict's in-place copy invalidated it
    assert out["hyp_type"] == "str"
    assert out["missing"] == [] and out["unexpected"] == [] and out["cached"] == 0
    assert out["shared"][0].startswith("encoder.residual_shared.")


TINY_ST = """
encoder: residual_conformer
encoder_conf: {output_size: 16, attention_heads: 2, linear_units: 24, num_blocks: 2,
    cnn_module_kernel: 5, share_group_size: 2, lowrank_rank: 2}
decoder: transformer
decoder_conf: {attention_heads: 2, linear_units: 24, num_blocks: 1}
extra_asr_decoder: transformer
extra_asr_decoder_conf: {attention_heads: 2, linear_units: 24, num_blocks: 1}
model_conf: {asr_weight: 0.3, mtlalpha: 0.3}
frontend_conf: {n_fft: 512, hop_length: 160, n_mels: 20}
"""


def test_st_inference_runs_the_residual_encoder_merged(tmp_path):
    config = tmp_path / "st.yaml"
    config.write_text(TINY_ST)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("<blank>\n<unk>\na\nb\n<sos/eos>\n")
    code = f"""
import json, torch
from espnet2.bin.st_inference import Speech2Text
from espnet2.tasks.st import STTask

STTask.main(cmd=["--config", "{config}", "--iterator_type", "none", "--dry_run",
                 "true", "--output_dir", "{tmp_path}/out", "--token_list", "{tokens}",
                 "--src_token_list", "{tokens}"])
model, _ = STTask.build_model_from_file("{tmp_path}/out/config.yaml", None, "cpu")
torch.save(model.state_dict(), "{tmp_path}/model.pth")
s2t = Speech2Text(st_train_config="{tmp_path}/out/config.yaml",
                  st_model_file="{tmp_path}/model.pth", beam_size=1, maxlenratio=0.1)
s2t(torch.randn(16000))
print(json.dumps(s2t.st_model.encoder.merged))
"""
    assert json.loads(run_python(code).stdout.strip().splitlines()[-1]) is True
