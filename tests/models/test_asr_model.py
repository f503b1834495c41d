"""model: espnet_ext adds the modules' weighted aux losses and logs each of them."""

import warnings

import pytest
import torch
from espnet2.asr.ctc import CTC
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder
from espnet2.asr.espnet_model import ESPnetASRModel

from espnet_ext.encoders.moe_conformer import MoEConformerEncoder
from espnet_ext.models.asr_model import ESPnetExtASRModel

V = 10
ENC = dict(
    input_size=12,
    output_size=16,
    attention_heads=2,
    linear_units=24,
    num_blocks=2,
    dropout_rate=0.0,
    positional_dropout_rate=0.0,
)


def _build(model_cls, encoder_cls, seed=0, enc_kw=None, **model_kw):
    torch.manual_seed(seed)
    encoder = encoder_cls(**ENC, **(enc_kw or {}))
    decoder = TransformerDecoder(
        V,
        16,
        attention_heads=2,
        linear_units=24,
        num_blocks=1,
        dropout_rate=0.0,
        positional_dropout_rate=0.0,
        self_attention_dropout_rate=0.0,
        src_attention_dropout_rate=0.0,
    )
    return model_cls(
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
        **model_kw,
    )


def _batch():
    torch.manual_seed(2)
    return dict(
        speech=torch.randn(2, 40, 12),
        speech_lengths=torch.tensor([40, 33]),
        text=torch.tensor([[1, 2, 3], [4, 5, -1]]),
        text_lengths=torch.tensor([3, 2]),
    )


def test_without_aux_modules_it_is_espnet_asr_model_exactly():
    base = _build(ESPnetASRModel, ConformerEncoder).train()
    ext = _build(ESPnetExtASRModel, ConformerEncoder).train()
    ext.load_state_dict(base.state_dict())
    loss_b, stats_b, w_b = base(**_batch())
    loss_e, stats_e, w_e = ext(**_batch())
    assert torch.equal(loss_e, loss_b) and torch.equal(w_e, w_b)
    assert stats_e.keys() == stats_b.keys()


def test_weighted_aux_loss_is_added_and_logged():
    enc_kw = dict(moe_balance_weight=0.25)
    base = _build(ESPnetASRModel, MoEConformerEncoder, enc_kw=enc_kw).train()
    ext = _build(ESPnetExtASRModel, MoEConformerEncoder, enc_kw=enc_kw).train()
    ext.load_state_dict(base.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ESPnetASRModel never collects (see aux tests)
        loss_b, _, _ = base(**_batch())
    loss_e, stats, _ = ext(**_batch())
    balance = stats["loss_enc_moe_balance"]
    assert (
        balance.item() > 0
        and {
            "loss_enc_moe_z",
            "enc_moe_load_entropy",
            "enc_moe_load_max",
            "enc_moe_frac_e7",
        }
        <= stats.keys()
    )
    torch.testing.assert_close(loss_e, loss_b + 0.25 * balance)
    torch.testing.assert_close(stats["loss"], loss_e.detach())


def test_model_conf_weight_overrides_module_default():
    ext = _build(
        ESPnetExtASRModel,
        MoEConformerEncoder,
        enc_kw=dict(moe_balance_weight=0.25),
        aux_loss_weights={"enc_moe_balance": 0.0, "enc_moe_z": 0.5},
    ).train()
    base = _build(ESPnetASRModel, MoEConformerEncoder).train()
    base.load_state_dict(ext.state_dict())
    loss_e, stats, _ = ext(**_batch())
    loss_b, _, _ = base(**_batch())
    torch.testing.assert_close(loss_e, loss_b + 0.5 * stats["loss_enc_moe_z"])


def test_weight_for_a_loss_nobody_reports_is_an_error():
    ext = _build(
        ESPnetExtASRModel, ConformerEncoder, aux_loss_weights={"enc_moe_balanse": 0.1}
    )
    with pytest.raises(ValueError, match="enc_moe_balanse"):
        ext.train()(**_batch())


def test_aux_loss_gradient_reaches_the_router():
    grads = []
    for w in (0.0, 1.0):
        ext = _build(
            ESPnetExtASRModel,
            MoEConformerEncoder,
            aux_loss_weights={"enc_moe_balance": w},
        ).train()
        ext(**_batch())[0].sum().backward()
        grads.append(ext.encoder.encoders[0].feed_forward.router.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])
