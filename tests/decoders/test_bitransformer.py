"""bitransformer / moe_bitransformer and model_conf.reverse_weight."""

import pytest
import torch
from espnet2.asr.ctc import CTC
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder
from espnet2.asr.espnet_model import ESPnetASRModel

from espnet_ext.decoders.bitransformer import BiTransformerDecoder, reverse_padded
from espnet_ext.decoders.moe_bitransformer import MoEBiTransformerDecoder
from espnet_ext.models.asr_model import ESPnetExtASRModel

V = 10
DEC = dict(
    attention_heads=2,
    linear_units=24,
    num_blocks=1,
    dropout_rate=0.0,
    positional_dropout_rate=0.0,
)


def _model(model_cls, decoder, **kw):
    torch.manual_seed(0)
    encoder = ConformerEncoder(
        12, output_size=16, attention_heads=2, linear_units=24, num_blocks=1
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
        **kw,
    )


def _batch():
    torch.manual_seed(2)
    return dict(
        speech=torch.randn(2, 40, 12),
        speech_lengths=torch.tensor([40, 33]),
        text=torch.tensor([[1, 2, 3], [4, 5, -1]]),
        text_lengths=torch.tensor([3, 2]),
    )


def test_reverse_padded():
    ys = torch.tensor([[1, 2, 3], [4, 5, -1]])
    out = reverse_padded(ys, torch.tensor([3, 2]), -1)
    assert out.tolist() == [[3, 2, 1], [5, 4, -1]]


def test_l2r_part_is_espnet_transformer_decoder():
    torch.manual_seed(0)
    bi = BiTransformerDecoder(V, 16, **DEC, r_num_blocks=2)
    plain = TransformerDecoder(V, 16, **DEC)
    missing, unexpected = bi.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("r2l_decoder.") for k in missing)
    assert len(bi.r2l_decoder.decoders) == 2
    bi.eval(), plain.eval()
    hs, hl = torch.randn(2, 7, 16), torch.tensor([7, 5])
    ys, yl = torch.tensor([[9, 1, 2], [9, 3, 9]]), torch.tensor([3, 2])
    assert torch.equal(bi(hs, hl, ys, yl)[0], plain(hs, hl, ys, yl)[0])


def test_reverse_weight_zero_is_the_plain_transformer_loss():
    torch.manual_seed(1)
    plain_dec = TransformerDecoder(V, 16, **DEC)
    bi_dec = BiTransformerDecoder(V, 16, **DEC)
    base = _model(ESPnetASRModel, plain_dec).train()
    ext = _model(ESPnetExtASRModel, bi_dec, reverse_weight=0.0).train()
    ext.load_state_dict(base.state_dict(), strict=False)
    loss_b, stats_b, _ = base(**_batch())
    loss_e, stats_e, _ = ext(**_batch())
    assert torch.allclose(loss_e, loss_b, atol=1e-6)
    assert torch.allclose(stats_e["loss_att"], stats_b["loss_att"])
    assert "loss_att_r2l" in stats_e and "loss_att_l2r" in stats_e
    loss_e.backward()  # r2l decoder in the graph with zero gradients (DDP-safe)
    grads = [p.grad for p in ext.decoder.r2l_decoder.parameters()]
    assert all(g is not None and not g.any() for g in grads)


def test_reverse_weight_combines_and_r2l_sees_reversed_targets():
    dec = BiTransformerDecoder(V, 16, **DEC)
    model = _model(ESPnetExtASRModel, dec, reverse_weight=0.3, ctc_weight=0.0).train()
    seen = {}
    original = dec.r2l_decoder.forward

    def spy(hs, hl, ys_in, ys_in_lens, **kw):
        seen["ys_in"], seen["lens"] = ys_in.clone(), ys_in_lens.clone()
        return original(hs, hl, ys_in, ys_in_lens, **kw)

    dec.r2l_decoder.forward = spy
    loss, stats, _ = model(**_batch())
    sos = model.sos
    assert seen["ys_in"][0].tolist() == [sos, 3, 2, 1]
    assert seen["ys_in"][1, :3].tolist() == [sos, 5, 4]
    assert seen["lens"].tolist() == [4, 3]
    expected = 0.7 * stats["loss_att_l2r"] + 0.3 * stats["loss_att_r2l"]
    assert torch.allclose(stats["loss_att"], expected, atol=1e-5)
    assert torch.allclose(loss.detach(), stats["loss_att"], atol=1e-5)


def test_reverse_weight_needs_bidirectional_decoder():
    model = _model(
        ESPnetExtASRModel, TransformerDecoder(V, 16, **DEC), reverse_weight=0.3
    )
    with pytest.raises(ValueError, match="reverse_weight"):
        model(**_batch())
    with pytest.raises(ValueError, match="reverse_weight"):
        _model(
            ESPnetExtASRModel, BiTransformerDecoder(V, 16, **DEC), reverse_weight=1.5
        )


def test_moe_bitransformer_trains_both_directions_with_aux_losses():
    dec = MoEBiTransformerDecoder(
        V, 16, **DEC, num_experts=3, top_k=2, moe_balance_weight=0.01
    )
    model = _model(ESPnetExtASRModel, dec, reverse_weight=0.3).train()
    loss, stats, _ = model(**_batch())
    assert "loss_dec_moe_balance" in stats and "loss_att_r2l" in stats
    loss.backward()
    r2l_expert = next(
        p for n, p in dec.r2l_decoder.named_parameters() if "experts" in n
    )
    assert r2l_expert.grad is not None and r2l_expert.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="r_num_blocks"):
        MoEBiTransformerDecoder(V, 16, **DEC, num_experts=2, r_num_blocks=0)
