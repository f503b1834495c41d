"""With a strong depth cost, a short training run on real speech lowers the average
executed depth of an I3D encoder (model: espnet_ext adds the cost to the loss)."""

import pytest
import torch
from conftest import real_speech_batch
from espnet2.asr.ctc import CTC
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
from espnet2.asr.frontend.default import DefaultFrontend
from espnet2.layers.utterance_mvn import UtteranceMVN

from espnet_ext.encoders.i3d_conformer import I3DConformerEncoder
from espnet_ext.models.asr_model import ESPnetExtASRModel

pytestmark = pytest.mark.slow


def _executed_fraction(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        model.encode(batch["speech"], batch["speech_lengths"])
    model.train()
    return model.encoder.last_gates[1].mean().item()


@pytest.mark.parametrize("gate_type", ["local", "global"])
def test_strong_depth_cost_lowers_the_executed_depth(speechocean, gate_type):
    tokens, batch, _ = real_speech_batch(speechocean, 4)
    torch.manual_seed(0)
    v, d = len(tokens), 32
    model = ESPnetExtASRModel(
        vocab_size=v,
        token_list=tokens,
        frontend=DefaultFrontend(n_mels=40),
        specaug=None,
        normalize=UtteranceMVN(),
        preencoder=None,
        encoder=I3DConformerEncoder(
            40,
            output_size=d,
            attention_heads=2,
            linear_units=64,
            num_blocks=2,
            macaron_style=True,
            cnn_module_kernel=7,
            gate_type=gate_type,
            gate_cost_weight=200.0,
            gate_init_bias=1.0,
            gate_hidden_units=16,
        ),
        postencoder=None,
        decoder=TransformerDecoder(
            v, d, attention_heads=2, linear_units=64, num_blocks=1
        ),
        ctc=CTC(v, d),
        joint_network=None,
        ctc_weight=0.3,
        report_cer=False,
        report_wer=False,
    ).train()
    before = _executed_fraction(model, batch)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(8):
        loss, stats, _ = model(**batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert {"loss_enc_i3d_depth", "enc_i3d_attn", "enc_i3d_ffn", "enc_i3d_conv"} <= set(
        stats
    )
    after = _executed_fraction(model, batch)
    assert before == 1.0 and after < 0.5, (before, after)
