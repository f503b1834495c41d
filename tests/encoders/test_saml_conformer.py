"""``encoder: saml_conformer`` and ``decoder: saml_transformer``."""

import pytest
import torch
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

from espnet_ext.decoders.saml_transformer import SAMLTransformerDecoder
from espnet_ext.encoders.saml_conformer import SAMLConformerEncoder

CONF = dict(
    input_size=8,
    output_size=16,
    attention_heads=2,
    linear_units=32,
    num_blocks=2,
    input_layer="linear",
    cnn_module_kernel=3,
    use_flash_attn=False,
)
SAML = dict(num_experts=3, lora_rank=2, lora_dropout_rate=0.0)


def _adapter_key(k):
    return "lora_" in k or "saml_routers." in k


def test_fresh_encoder_equals_espnet_conformer_with_same_weights():
    torch.manual_seed(0)
    dense = ConformerEncoder(**CONF).eval()
    saml = SAMLConformerEncoder(**CONF, **SAML).eval()
    missing, unexpected = saml.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and missing and all(_adapter_key(k) for k in missing)
    x, lens = torch.randn(2, 10, 8), torch.tensor([10, 7])
    want, _, _ = dense(x, lens)
    got, olens, _ = saml(x, lens)
    torch.testing.assert_close(got, want)
    # One step on the experts changes the output (the check above is not vacuous).
    saml.train()
    opt = torch.optim.SGD(
        [p for n, p in saml.named_parameters() if "lora_b" in n], lr=1.0
    )
    saml(x, lens)[0].pow(2).sum().backward()
    opt.step()
    saml.eval()
    assert not torch.allclose(saml(x, lens)[0], want, atol=1e-4)


def test_from_scratch_trains_the_base_and_freeze_base_does_not():
    enc = SAMLConformerEncoder(**CONF, **SAML)
    assert enc.encoders[0].self_attn.linear_q.weight.requires_grad
    frozen = SAMLConformerEncoder(**CONF, **SAML, freeze_base=True)
    train = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert train and all(_adapter_key(n) for n in train)
    with pytest.raises(ValueError, match="freeze_base"):
        SAMLConformerEncoder(**CONF, **SAML, quantize="nf4")


def test_decoder_state_dict_round_trip_and_batch_score():
    torch.manual_seed(0)
    a = SAMLTransformerDecoder(
        10,
        16,
        attention_heads=2,
        linear_units=32,
        num_blocks=2,
        use_flash_attn=False,
        **SAML
    ).eval()
    b = SAMLTransformerDecoder(
        10,
        16,
        attention_heads=2,
        linear_units=32,
        num_blocks=2,
        use_flash_attn=False,
        **SAML
    ).eval()
    missing, unexpected = b.load_state_dict(a.state_dict(), strict=False)
    assert not missing and not unexpected
    assert sorted(a.saml_routers) == ["decoders__self_attn", "decoders__src_attn"]
    plain = TransformerDecoder(
        10, 16, attention_heads=2, linear_units=32, num_blocks=2, use_flash_attn=False
    ).eval()
    plain.load_state_dict(a.state_dict(), strict=False)
    mem = torch.randn(2, 6, 16)
    ys = torch.tensor([[9, 1, 2], [9, 3, 4]])
    with torch.no_grad():
        scores, _ = a.batch_score(ys, [None, None], mem)
        want, _ = plain.batch_score(ys, [None, None], mem)
    torch.testing.assert_close(scores, want)
