"""residual_transformer: ESPnet's transformer encoder, residual-shared."""

import pytest
import torch
from espnet2.asr.encoder.transformer_encoder import TransformerEncoder
from residual_util import copy_dense_into_k1, n_params, perturb

from espnet_ext.encoders.residual_transformer import ResidualTransformerEncoder
from espnet_ext.layers.residual_linear import ResidualLinear

CONF = dict(
    input_size=12,
    output_size=16,
    attention_heads=2,
    linear_units=24,
    num_blocks=4,
    dropout_rate=0.0,
    positional_dropout_rate=0.0,
)


def _build(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"share_group_size": 2, "lowrank_rank": 2, **kw}
    return ResidualTransformerEncoder(**{**CONF, **kw})


def _dense(seed=5, **kw):
    torch.manual_seed(seed)
    return TransformerEncoder(**{**CONF, **kw})


def _inputs():
    torch.manual_seed(1)
    return torch.randn(2, 40, 12), torch.tensor([40, 31])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_k1_zero_lowrank_zero_diagonal_equals_espnet_transformer(mode):
    dense = _dense()
    res = _build(share_group_size=1)
    copy_dense_into_k1(res, dense)
    getattr(dense, mode)(), getattr(res, mode)()
    xs, ilens = _inputs()
    with torch.no_grad():
        ref, ref_lens, _ = dense(xs, ilens)
        out, out_lens, _ = res(xs, ilens)
    torch.testing.assert_close(out, ref)
    assert torch.equal(out_lens, ref_lens)
    assert res.merged == (mode == "eval")


def test_attention_and_ffn_matrices_are_reparameterised():
    block = _build().encoders[0]
    for m in (
        block.self_attn.linear_q,
        block.self_attn.linear_k,
        block.self_attn.linear_v,
        block.self_attn.linear_out,
        block.feed_forward.w_1,
        block.feed_forward.w_2,
    ):
        assert isinstance(m, ResidualLinear)


def test_shared_weights_are_one_tensor_object_per_group():
    enc = _build()
    w = [block.feed_forward.w_2.shared.weight for block in enc.encoders]
    assert w[0] is w[1] and w[2] is w[3] and w[0] is not w[2]


def test_gradients_reach_shared_lowrank_and_diagonal_parts():
    enc = _build().train()
    perturb(enc)
    enc(*_inputs())[0].square().sum().backward()
    for layer in enc.residual_layers():
        for p in (layer.shared.weight, layer.lowrank_a, layer.lowrank_b, layer.diag):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_state_dict_round_trips_with_no_missing_or_unexpected_keys():
    a = _build(seed=0).eval()
    perturb(a)
    b = _build(seed=1).eval()
    missing, unexpected = b.load_state_dict(a.state_dict(), strict=False)
    assert missing == [] and unexpected == []
    with torch.no_grad():
        torch.testing.assert_close(b(*_inputs())[0], a(*_inputs())[0], rtol=0, atol=0)


def test_merged_equals_unmerged():
    enc = _build().eval()
    perturb(enc)
    unmerged = enc(*_inputs())[0]
    with torch.no_grad():
        merged = enc(*_inputs())[0]
    assert enc.merged
    torch.testing.assert_close(merged, unmerged)


def test_parameter_formula_matches_the_measured_count():
    expected, _ = _build().parameter_formula(n_params(_dense()))
    assert expected == n_params(_build())


def test_interctc_and_return_all_hs_equal_espnet_with_copied_weights():
    dense = _dense(interctc_layer_idx=[2]).eval()
    res = _build(share_group_size=1, interctc_layer_idx=[2]).eval()
    copy_dense_into_k1(res, dense)
    with torch.no_grad():
        (ref, ref_inter), _, _ = dense(*_inputs())
        (out, inter), _, _ = res(*_inputs())
    torch.testing.assert_close(out, ref)
    assert [i for i, _ in inter] == [2]
    torch.testing.assert_close(inter[0][1], ref_inter[0][1])
    dense, res = _dense().eval(), _build(share_group_size=1).eval()
    copy_dense_into_k1(res, dense)
    with torch.no_grad():
        (_, ref_hs), _, _ = dense(*_inputs(), return_all_hs=True)
        (_, hs), _, _ = res(*_inputs(), return_all_hs=True)
    assert len(hs) == len(ref_hs) == CONF["num_blocks"]
    for h, h_ref in zip(hs, ref_hs):
        torch.testing.assert_close(h, h_ref)


def test_init_from_dense_with_k1_reproduces_the_dense_encoder():
    dense = _dense().eval()
    res = _build(share_group_size=1).eval()
    res.load_dense(dense.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(res(*_inputs())[0], dense(*_inputs())[0])


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(residual_targets=["attn_pos"]), "residual_targets"),  # abs_pos attention
        (dict(residual_targets=["conv_pw2"]), "residual_targets"),
        (dict(lowrank_rank=16), "lowrank_rank"),
        (dict(share_group_size=3), "share_group_size"),
        (dict(share_group_size=0), "share_group_size"),
    ],
)
def test_bad_configuration_raises_naming_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        _build(**kw)
