"""moe_conformer: ESPnet's conformer with MoE FFNs, same skeleton and YAML keys."""

import io
import warnings

import pytest
import torch
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

from espnet_ext.encoders.moe_conformer import MoEConformerEncoder
from espnet_ext.layers.moe import MoEFeedForward

CONF = dict(
    input_size=12,
    output_size=16,
    attention_heads=2,
    linear_units=24,
    num_blocks=2,
    macaron_style=True,
    cnn_module_kernel=5,
    dropout_rate=0.0,
    positional_dropout_rate=0.0,
)


def _inputs():
    torch.manual_seed(1)
    return torch.randn(2, 40, 12), torch.tensor([40, 31])


def dense_to_moe_state(dense_state):
    """A dense conformer's weights as a 1-expert moe_conformer's keys."""
    out = {}
    for k, v in dense_state.items():
        for ffn in (".feed_forward.", ".feed_forward_macaron."):
            if ffn in k:
                k = k.replace(ffn, f"{ffn}experts.0.")
        out[k] = v
    return out


def test_one_expert_equals_espnet_conformer_with_same_weights():
    torch.manual_seed(0)
    dense = ConformerEncoder(**CONF).eval()
    moe = MoEConformerEncoder(**CONF, num_experts=1, top_k=1).eval()
    state = dense_to_moe_state(dense.state_dict())
    for name, p in moe.named_parameters():
        if name.endswith("router.weight"):
            state[name] = p.detach()
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert missing == [] and unexpected == []
    xs, ilens = _inputs()
    ref, ref_lens, _ = dense(xs, ilens)
    out, out_lens, _ = moe(xs, ilens)
    # Equal to float rounding: the experts compute swish as SiLU, ESPnet as
    # x * sigmoid(x).
    torch.testing.assert_close(out, ref)
    assert torch.equal(out_lens, ref_lens)


def test_every_ffn_is_moe_except_dense_blocks():
    enc = MoEConformerEncoder(**{**CONF, "num_blocks": 3}, dense_block_idx=[2])
    kinds = [
        (
            isinstance(layer.feed_forward, MoEFeedForward),
            isinstance(layer.feed_forward_macaron, MoEFeedForward),
        )
        for layer in enc.encoders
    ]
    assert kinds == [(True, True), (False, False), (True, True)]


def test_expert_units_default_to_linear_units():
    enc = MoEConformerEncoder(**CONF)
    assert (
        enc.encoders[0].feed_forward.experts[0].w_1.out_features == CONF["linear_units"]
    )
    enc = MoEConformerEncoder(**CONF, expert_units=8)
    assert enc.encoders[0].feed_forward.experts[0].w_1.out_features == 8


def test_state_dict_round_trip_has_no_missing_or_unexpected_keys():
    torch.manual_seed(0)
    a = MoEConformerEncoder(**CONF).eval()
    torch.manual_seed(1)
    b = MoEConformerEncoder(**CONF).eval()
    missing, unexpected = b.load_state_dict(a.state_dict(), strict=False)
    assert missing == [] and unexpected == []
    xs, ilens = _inputs()
    torch.testing.assert_close(b(xs, ilens)[0], a(xs, ilens)[0], rtol=0, atol=0)


def test_aux_records_do_not_pile_up_across_forwards():
    enc = MoEConformerEncoder(**CONF).train()
    xs, ilens = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            enc(xs, ilens)
    ffn = enc.encoders[0].feed_forward
    # one forward: 2 losses + load entropy + load max + one fraction per expert
    assert len(ffn._aux_buffer()) == 4 + ffn.num_experts


def test_whole_encoder_survives_torch_save_and_load():
    enc = MoEConformerEncoder(**CONF).eval()
    buf = io.BytesIO()
    torch.save(enc, buf)  # the layers' mask hooks must pickle
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    xs, ilens = _inputs()
    torch.testing.assert_close(loaded(xs, ilens)[0], enc(xs, ilens)[0], rtol=0, atol=0)


def test_training_layer_called_without_its_mask_raises():
    enc = MoEConformerEncoder(**CONF).train()
    x = torch.randn(2, 6, CONF["output_size"])
    pos = enc.embed.out[1](x)  # (x, pos_emb) as the layers receive them
    with pytest.raises(ValueError, match="needs its mask 'mask'"):
        enc.encoders[0](pos, None)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(positionwise_layer_type="conv1d"), "positionwise_layer_type"),
        (dict(dense_block_idx=[0]), "dense_block_idx"),
        (dict(moe_impl="nope"), "moe_impl"),
    ],
)
def test_bad_configuration_raises(kw, message):
    with pytest.raises(ValueError, match=message):
        MoEConformerEncoder(**{**CONF, **kw})
