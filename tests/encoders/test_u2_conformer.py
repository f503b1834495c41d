"""u2_conformer and moe_conformer chunk options: equivalence, streaming, bad input."""

import pytest
import torch
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

from espnet_ext.encoders.moe_conformer import MoEConformerEncoder
from espnet_ext.encoders.u2_conformer import U2ConformerEncoder
from espnet_ext.layers.chunk import CausalDepthwiseConv1d

KW = dict(
    input_size=20,
    output_size=16,
    attention_heads=2,
    linear_units=24,
    num_blocks=2,
    input_layer="conv2d6",
    macaron_style=True,
    rel_pos_type="latest",
    cnn_module_kernel=5,
    dropout_rate=0.0,
    positional_dropout_rate=0.0,
)
MOE = dict(num_experts=3, top_k=2)


def _enc(cls, seed=0, **kw):
    torch.manual_seed(seed)
    extra = MOE if cls is MoEConformerEncoder else {}
    return cls(**{**KW, **extra, **kw})


def test_options_off_is_espnet_conformer_exactly():
    base = _enc(ConformerEncoder).eval()
    u2 = _enc(U2ConformerEncoder).eval()
    assert u2.state_dict().keys() == base.state_dict().keys()
    u2.load_state_dict(base.state_dict())
    xs, ilens = torch.randn(2, 70, 20), torch.tensor([70, 50])
    a, la, _ = base(xs, ilens)
    b, lb, _ = u2(xs, ilens)
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_moe_conformer_options_off_unchanged_state_dict_and_hooks():
    plain = _enc(MoEConformerEncoder)
    chunked = _enc(MoEConformerEncoder, use_dynamic_chunk=True, causal=True)
    assert plain.state_dict().keys() == chunked.state_dict().keys()
    assert not plain._u2_hooks and chunked._u2_hooks
    assert not any(isinstance(m, CausalDepthwiseConv1d) for m in plain.modules())


def test_causal_encoder_output_ignores_future_frames():
    enc = _enc(U2ConformerEncoder, causal=True, static_chunk_size=1).eval()
    xs = torch.randn(1, 100, 20)
    ys, _, _ = enc(xs, torch.tensor([100]))
    t = 6  # encoder frame; reads input frames up to 6 * t + 10
    xs2 = xs.clone()
    xs2[:, 6 * t + 11 :] = torch.randn(1, 100 - 6 * t - 11, 20)
    ys2, _, _ = enc(xs2, torch.tensor([100]))
    assert torch.allclose(ys[:, : t + 1], ys2[:, : t + 1], atol=1e-6)
    assert not torch.allclose(ys[:, t + 1 :], ys2[:, t + 1 :])


@pytest.mark.parametrize("cls", [U2ConformerEncoder, MoEConformerEncoder])
@pytest.mark.parametrize("chunk,left", [(1, -1), (4, -1), (4, 1), (3, 0), (5, 2)])
def test_chunk_by_chunk_equals_full_forward_with_chunk_mask(cls, chunk, left):
    enc = _enc(cls, use_dynamic_chunk=True, use_dynamic_left_chunk=True, causal=True)
    enc.eval()
    xs = torch.randn(1, 131, 20)
    enc.set_decoding_chunk(chunk, left)
    full, olens, _ = enc(xs, torch.tensor([131]))
    streamed = enc.forward_chunk_by_chunk(xs, chunk, left)
    assert streamed.shape == full.shape == (1, int(olens[0]), 16)
    assert torch.allclose(streamed, full, atol=1e-5), (streamed - full).abs().max()
    # the chunk mask matters: full context differs
    enc.set_decoding_chunk(None)
    ctx, _, _ = enc(xs, torch.tensor([131]))
    assert not torch.allclose(ctx, full, atol=1e-4)


def _assert_chunk_by_chunk_equals_masked(enc, xs, chunk=4, left=1):
    """Chunk-by-chunk encoding == one full forward under the same chunk mask."""
    enc.set_decoding_chunk(chunk, left)
    full, _, _ = enc(xs, torch.tensor([xs.size(1)]))
    streamed = enc.forward_chunk_by_chunk(xs, chunk, left)
    assert torch.allclose(streamed, full, atol=1e-5), (streamed - full).abs().max()


def test_moe_chunk_by_chunk_with_stacked_experts_equals_full_forward():
    from espnet_ext.layers.moe import prepare_moe_inference

    enc = _enc(MoEConformerEncoder, use_dynamic_chunk=True, causal=True).eval()
    assert prepare_moe_inference(enc) == 4  # 2 blocks x (macaron + FFN)
    _assert_chunk_by_chunk_equals_masked(enc, torch.randn(1, 131, 20))


@pytest.mark.parametrize(
    "weight",
    [
        "self_attn.linear_pos.weight",
        "self_attn.linear_k.weight",  # fused with q and v
        "conv_module.norm.running_var",  # folded into the depthwise weights
        "conv_module.depthwise_conv.bias",
    ],
)
def test_memoised_chunk_weights_follow_weight_updates(weight):
    enc = _enc(U2ConformerEncoder, use_dynamic_chunk=True, causal=True).eval()
    xs = torch.randn(1, 131, 20)
    enc.forward_chunk_by_chunk(xs, 4, 1)  # fills the memos
    with torch.no_grad():
        for layer in enc.encoders:
            tensor = dict(layer.named_parameters(), **dict(layer.named_buffers()))
            tensor[weight].mul_(3.0)
    _assert_chunk_by_chunk_equals_masked(enc, xs)


class _WrappedLinear(torch.nn.Linear):
    """Not the plain type: the chunk attention must call the module's own methods."""


def test_chunk_attention_of_a_wrapped_projection_equals_full_forward():
    enc = _enc(U2ConformerEncoder, use_dynamic_chunk=True, causal=True).eval()
    for layer in enc.encoders:
        layer.self_attn.linear_q.__class__ = _WrappedLinear
    _assert_chunk_by_chunk_equals_masked(enc, torch.randn(1, 131, 20))


class _WrappedConv1d(torch.nn.Conv1d):
    """Not the plain type: the chunk path must call the module itself."""


@pytest.mark.parametrize("wrapped", [False, True])
def test_chunk_conv_path_equals_full_forward_with_trained_batchnorm(wrapped):
    enc = _enc(U2ConformerEncoder, use_dynamic_chunk=True, causal=True)
    with torch.no_grad():  # BatchNorm statistics and affine far from their init
        for layer in enc.encoders:
            norm = layer.conv_module.norm
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
            if wrapped:
                layer.conv_module.pointwise_conv1.__class__ = _WrappedConv1d
    enc.eval()
    _assert_chunk_by_chunk_equals_masked(enc, torch.randn(1, 131, 20))


def test_simulate_streaming_forward_is_chunk_by_chunk():
    enc = _enc(U2ConformerEncoder, use_dynamic_chunk=True, causal=True).eval()
    xs = torch.randn(1, 90, 20)
    enc.set_decoding_chunk(2, 1)
    masked, _, _ = enc(xs, torch.tensor([90]))
    enc.set_decoding_chunk(2, 1, simulate_streaming=True)
    streamed, olens, _ = enc(xs, torch.tensor([90]))
    assert int(olens[0]) == streamed.size(1) == masked.size(1)
    assert torch.allclose(streamed, masked, atol=1e-5)


def test_training_batches_use_chunk_masks():
    enc = _enc(U2ConformerEncoder, static_chunk_size=2, causal=True).train()
    seen = []
    enc.encoders[0].self_attn.register_forward_hook(
        lambda m, a, o: seen.append(a[4].shape)
    )
    xs = torch.randn(2, 70, 20)
    _, olens, _ = enc(xs, torch.tensor([70, 40]))
    assert seen[-1] == (2, 10, 10)  # (B, T, T) chunk mask, not (B, 1, T)
    # the padding mask is handed back: lengths are ESPnet's own
    _, base_olens, _ = _enc(ConformerEncoder)(xs, torch.tensor([70, 40]))
    assert torch.equal(olens, base_olens)


@pytest.mark.parametrize(
    "kw,key",
    [
        (dict(static_chunk_size=-1), "static_chunk_size"),
        (dict(use_dynamic_left_chunk=True), "use_dynamic_left_chunk"),
        (dict(use_dynamic_chunk=True, static_chunk_size=4), "static_chunk_size"),
        (dict(use_dynamic_chunk=True, ctc_trim=True), "ctc_trim"),
    ],
)
def test_bad_options_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        _enc(U2ConformerEncoder, **kw)


def test_streaming_needs_causal_and_positive_chunk():
    enc = _enc(U2ConformerEncoder, use_dynamic_chunk=True).eval()
    with pytest.raises(ValueError, match="causal"):
        enc.forward_chunk_by_chunk(torch.randn(1, 40, 20), 4)
    causal = _enc(U2ConformerEncoder, causal=True).eval()
    with pytest.raises(ValueError, match="decoding_chunk_size"):
        causal.set_decoding_chunk(0)
    legacy = _enc(U2ConformerEncoder, causal=True, rel_pos_type="legacy").eval()
    with pytest.raises(ValueError, match="rel_pos_type"):
        legacy.forward_chunk_by_chunk(torch.randn(1, 40, 20), 4)
