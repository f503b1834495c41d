"""A short training run on real speech lowers the loss of MoE encoder + MoE decoder."""

import pytest
import torch
from conftest import real_speech_batch
from espnet2.asr.ctc import CTC
from espnet2.asr.frontend.default import DefaultFrontend
from espnet2.layers.utterance_mvn import UtteranceMVN

from espnet_ext.decoders.moe_transformer import MoETransformerDecoder
from espnet_ext.encoders.moe_conformer import MoEConformerEncoder
from espnet_ext.models.asr_model import ESPnetExtASRModel

pytestmark = pytest.mark.slow


def test_moe_encoder_and_decoder_training_lowers_the_loss(speechocean):
    tokens, batch, _ = real_speech_batch(speechocean, 6)
    torch.manual_seed(0)
    v, d = len(tokens), 32
    model = ESPnetExtASRModel(
        vocab_size=v,
        token_list=tokens,
        frontend=DefaultFrontend(n_mels=40),
        specaug=None,
        normalize=UtteranceMVN(),
        preencoder=None,
        encoder=MoEConformerEncoder(
            40,
            output_size=d,
            attention_heads=2,
            linear_units=64,
            num_blocks=2,
            macaron_style=True,
            cnn_module_kernel=7,
            num_experts=4,
            top_k=2,
            moe_balance_weight=0.01,
        ),
        postencoder=None,
        decoder=MoETransformerDecoder(
            v,
            d,
            attention_heads=2,
            linear_units=64,
            num_blocks=1,
            num_experts=4,
            top_k=2,
        ),
        ctc=CTC(v, d),
        joint_network=None,
        ctc_weight=0.3,
        report_cer=False,
        report_wer=False,
    ).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss, stats, _ = model(**batch)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        losses.append(loss.item())
    assert "loss_enc_moe_balance" in stats and "dec_moe_load_entropy" in stats
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
