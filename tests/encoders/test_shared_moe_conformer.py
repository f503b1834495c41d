"""encoder: shared_moe_conformer (shared sparsely-gated experts, arXiv 2209.08326)."""

import pytest
import torch
import yaml
from conftest import REPO
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

from espnet_ext.encoders.moe_conformer import MoEConformerEncoder
from espnet_ext.encoders.shared_moe_conformer import SharedMoEConformerEncoder

TINY = dict(
    output_size=16,
    attention_heads=2,
    linear_units=24,
    num_blocks=4,
    macaron_style=True,
    rel_pos_type="latest",
    cnn_module_kernel=5,
    num_experts=3,
    top_k=2,
    dropout_rate=0.0,
    positional_dropout_rate=0.0,
)
RECIPE_CONF = (
    REPO / "egs2/speechocean762/asr1/conf/tuning/train_asr_shared_moe_conformer.yaml"
)


def _shared(seed=0, **kw):
    torch.manual_seed(seed)
    return SharedMoEConformerEncoder(12, **{**TINY, **kw})


def _inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 40, 12, generator=g), torch.tensor([40, 31])


def _all_tensors(module):
    """Every parameter and buffer under every path (shared ones under each user)."""
    return {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
    }


def test_group_size_one_is_moe_conformer_with_the_same_weights():
    torch.manual_seed(1)
    moe = MoEConformerEncoder(12, **TINY).eval()
    shared = _shared(seed=2, share_group_size=1).eval()
    assert shared.shared_copies() == []
    assert set(shared.state_dict()) == set(moe.state_dict())
    xs, lens = _inputs()
    assert not torch.allclose(shared(xs, lens)[0], moe(xs, lens)[0])  # not vacuous
    shared.load_state_dict(moe.state_dict())
    out_s, lens_s, _ = shared(xs, lens)
    out_m, lens_m, _ = moe(xs, lens)
    assert torch.equal(lens_s, lens_m) and torch.equal(out_s, out_m)


def test_shared_encoder_computes_moe_conformer_with_every_block_given_its_weights():
    shared = _shared(share_group_size=2).eval()
    moe = MoEConformerEncoder(12, **TINY).eval()
    moe.load_state_dict(_all_tensors(shared))
    xs, lens = _inputs()
    assert torch.equal(shared(xs, lens)[0], moe(xs, lens)[0])


def test_shared_modules_are_the_same_objects_and_routers_and_norms_are_per_block():
    enc = _shared(share_group_size=2)
    b = list(enc.encoders)
    for first, other in ((b[0], b[1]), (b[2], b[3])):
        assert first.self_attn.linear_q is other.self_attn.linear_q
        assert first.self_attn.linear_pos is other.self_attn.linear_pos
        assert first.self_attn.pos_bias_u is other.self_attn.pos_bias_u
        assert first.conv_module.pointwise_conv1 is other.conv_module.pointwise_conv1
        assert first.conv_module.depthwise_conv is other.conv_module.depthwise_conv
        assert first.feed_forward.experts is other.feed_forward.experts
        assert first.feed_forward_macaron.experts is other.feed_forward_macaron.experts
        assert first.feed_forward.router is not other.feed_forward.router
        assert first.conv_module.norm is not other.conv_module.norm  # BatchNorm
        for norm in (
            "norm_ff",
            "norm_mha",
            "norm_ff_macaron",
            "norm_conv",
            "norm_final",
        ):
            assert getattr(first, norm) is not getattr(other, norm)
    # across groups nothing is shared, and the two macaron halves are two banks
    assert b[0].self_attn.linear_q is not b[2].self_attn.linear_q
    assert b[0].feed_forward.experts is not b[2].feed_forward.experts
    assert b[0].feed_forward.experts is not b[0].feed_forward_macaron.experts


def test_shared_weight_gets_the_gradient_of_every_block_using_it():
    enc = _shared(share_group_size=4).train()
    xs, lens = _inputs()
    enc(xs, lens)[0].sum().backward()
    # one tensor for the four blocks: its gradient is the sum over them
    w = enc.encoders[0].feed_forward.experts[0].w_1.weight
    assert w is enc.encoders[3].feed_forward.experts[0].w_1.weight
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert all(b.feed_forward.router.weight.grad is not None for b in enc.encoders)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_parameter_count_matches_the_formula(group):
    enc = _shared(share_group_size=group)
    expected, text = enc.parameter_formula()
    assert sum(p.numel() for p in enc.parameters()) == expected, text


def test_state_dict_holds_each_shared_tensor_once_and_round_trips():
    enc = _shared(share_group_size=2).train()
    enc(*_inputs())  # BatchNorm running statistics differ per block
    state = enc.state_dict()
    assert not any(k.startswith("encoders.1.self_attn.") for k in state)
    assert not any(k.startswith("encoders.1.feed_forward.experts.") for k in state)
    assert "encoders.1.feed_forward.router.weight" in state
    assert "encoders.1.conv_module.norm.running_mean" in state
    # ESPnet averages checkpoints key by key: each shared tensor is one key, so the
    # saved parameters are exactly the encoder's unique parameters.
    saved = sum(
        v.numel() for k, v in state.items() if k in dict(enc.named_parameters())
    )
    assert saved == sum(p.numel() for p in enc.parameters())
    fresh = _shared(seed=9, share_group_size=2)
    result = fresh.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    fresh.eval(), enc.eval()
    xs, lens = _inputs()
    assert torch.equal(fresh(xs, lens)[0], enc(xs, lens)[0])
    # sharing survives loading: still one object per group
    assert fresh.encoders[1].self_attn is not None
    assert fresh.encoders[0].self_attn.linear_q is fresh.encoders[1].self_attn.linear_q


def test_explicit_group_map_and_bad_keys():
    enc = _shared(share_groups=[3, 3, 7, 3])
    assert enc.layer_groups == [0, 0, 1, 0]
    b = enc.encoders
    assert b[0].conv_module.depthwise_conv is b[3].conv_module.depthwise_conv
    assert b[2].conv_module.depthwise_conv is not b[0].conv_module.depthwise_conv
    enc = _shared(share_group_size=2, shared_modules=["ffn"])
    assert enc.encoders[0].self_attn.linear_q is not enc.encoders[1].self_attn.linear_q
    assert enc.encoders[0].feed_forward.experts is enc.encoders[1].feed_forward.experts
    with pytest.raises(ValueError, match="share_groups"):
        _shared(share_groups=[0, 0, 1])
    with pytest.raises(ValueError, match="shared_modules"):
        _shared(shared_modules=["attention"])
    with pytest.raises(ValueError, match="share_remainder"):
        _shared(share_group_size=3)


def test_shipped_recipe_config_is_at_most_a_third_of_the_dense_encoder():
    conf = yaml.safe_load(RECIPE_CONF.read_text())
    enc_conf = conf["encoder_conf"]
    dense_conf = {
        k: v
        for k, v in enc_conf.items()
        if k not in ("share_group_size", "num_experts", "top_k", "expert_units")
    }
    n_mels = conf["frontend_conf"]["n_mels"]
    shared = SharedMoEConformerEncoder(n_mels, **enc_conf)
    dense = ConformerEncoder(n_mels, **dense_conf)
    n_shared = sum(p.numel() for p in shared.parameters())
    n_dense = sum(p.numel() for p in dense.parameters())
    assert n_shared <= n_dense / 3, (n_shared, n_dense)
    assert shared.parameter_formula()[0] == n_shared


def test_dense_blocks_share_their_ffn_with_the_dense_blocks_of_their_group():
    enc = _shared(share_group_size=2, dense_block_idx=[1, 2, 3])
    b = enc.encoders
    assert b[0].feed_forward is b[1].feed_forward  # dense, group 0
    assert b[2].feed_forward is not b[3].feed_forward  # dense + MoE, group 1
    assert b[2].self_attn.linear_q is b[3].self_attn.linear_q
    with pytest.raises(ValueError, match="parameter_formula"):
        enc.parameter_formula()
    xs, lens = _inputs()
    assert enc.train()(xs, lens)[0].shape == (2, 9, 16)


def test_intermediate_ctc_outputs_and_all_hidden_states_as_conformer():
    enc = _shared(share_group_size=2, interctc_layer_idx=[2]).eval()
    xs, lens = _inputs()
    (out, inter), olens, _ = enc(xs, lens)
    assert [i for i, _ in inter] == [2] and inter[0][1].shape == out.shape
    plain = _shared(share_group_size=2).eval()
    (out, hs), olens, _ = plain(xs, lens, return_all_hs=True)
    assert len(hs) == 4 and hs[-1].shape == out.shape
