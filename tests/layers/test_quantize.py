"""Weight-only NF4 (torchao) and int8 storage of a frozen linear map."""

import io

import pytest
import torch

from espnet_ext.layers.quantize import (
    NF4_TABLE,
    FrozenConv,
    FrozenEmbedding,
    FrozenLinear,
    int8_dequantize,
    int8_quantize,
    nf4_dequantize,
    nf4_quantize,
    quantize_modules,
)

pytest.importorskip("torchao")


def _w(out_f=32, in_f=64, seed=0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


def test_int8_error_is_within_half_a_step():
    w = _w()
    q = int8_quantize(w, block_size=16)
    assert q["int8_codes"].dtype == torch.int8 and q["int8_scales"].shape == (32, 4)
    err = (int8_dequantize(q) - w).abs().reshape(32, 4, 16)
    assert (err <= q["int8_scales"].unsqueeze(-1) / 2 + 1e-6).all()


def test_nf4_equals_the_block_wise_normal_float_reference():
    w = _w()
    block = 64
    q = nf4_quantize(w, block_size=block, scaler_block_size=8)
    deq = nf4_dequantize(q, w.shape)
    # Reference: per-block scale (double-quantised to int8 around the mean), then
    # the nearest of the 16 NF4 values.
    blocks = w.reshape(-1, block)
    absmax = blocks.abs().amax(-1)
    mean = absmax.mean()
    centred = (absmax - mean).reshape(-1, 8)
    factor = 256 / (2 * centred.abs().amax(-1, keepdim=True))
    scale = ((centred * factor).round().clamp(-128, 127) / factor).reshape(-1) + mean
    table = torch.tensor(NF4_TABLE)
    code = ((blocks / absmax[:, None]).unsqueeze(-1) - table).abs().argmin(-1)
    ref = (table[code] * scale[:, None]).reshape(w.shape)
    torch.testing.assert_close(deq, ref)
    # Error bound of the format: half the widest NF4 gap times the block scale,
    # plus the scale's own int8 rounding.
    half_gap = max(b - a for a, b in zip(NF4_TABLE, NF4_TABLE[1:])) / 2
    bound = half_gap * absmax + (scale - absmax).abs()
    assert ((deq - w).abs().reshape(-1, block) <= bound[:, None] + 1e-6).all()
    # 4 bits per value + one int8 scale per block.
    nbytes = sum(t.numel() * t.element_size() for t in q.values())
    assert nbytes < w.numel() * 4 / 7


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantised_linear_uses_its_dequantised_weight(fmt):
    lin = torch.nn.Linear(64, 32)
    q = FrozenLinear.from_linear(lin, fmt, block_size=16, scaler_block_size=4)
    assert "weight" not in q.state_dict()
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(
        y,
        torch.nn.functional.linear(x, q.base_weight(), lin.bias),
        rtol=1e-5,
        atol=1e-5,
    )
    assert (q.base_weight() - lin.weight).abs().max() < 0.05
    y.sum().backward()
    assert x.grad is not None and q.bias.grad is None


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantised_state_round_trips(fmt):
    lin = torch.nn.Linear(64, 32)
    q = FrozenLinear.from_linear(lin, fmt, block_size=16, scaler_block_size=4)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)  # plain tensors, no pickled classes
    fresh = FrozenLinear(64, 32, fmt=fmt, block_size=16, scaler_block_size=4)
    fresh.load_state_dict(sd)
    for k, v in q.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), q(x))


def test_full_precision_weights_quantise_on_load_and_the_reverse_is_refused():
    lin = torch.nn.Linear(64, 32)
    q = FrozenLinear(64, 32, fmt="nf4", block_size=16)
    q.load_state_dict(lin.state_dict())  # ESPnet's --init_param after the adapter
    want = FrozenLinear.from_linear(lin, "nf4", block_size=16)
    assert torch.equal(q.base_weight(), want.base_weight())
    fp = FrozenLinear(64, 32, fmt="none")
    with pytest.raises(RuntimeError, match="nf4-quantised base weight"):
        fp.load_state_dict(q.state_dict())
    i8 = FrozenLinear(64, 32, fmt="int8", block_size=16)
    with pytest.raises(RuntimeError, match="built with quantize: int8"):
        i8.load_state_dict(q.state_dict(), strict=False)


def test_unblockable_shapes_are_refused_naming_the_key():
    with pytest.raises(ValueError, match="quantize_block_size"):
        int8_quantize(_w(4, 24), block_size=16)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_espnet_checkpoint_averaging_is_detected(fmt):
    # ESPnet's average_nbest_models: integer tensors are summed, the others divided.
    q = FrozenLinear.from_linear(torch.nn.Linear(64, 32), fmt, block_size=16)

    def average(states):
        avg = {k: v.clone() for k, v in states[0].items()}
        for st in states[1:]:
            for k in avg:
                avg[k] = avg[k] + st[k]
        return {
            k: v if str(v.dtype).startswith("torch.int") else v / len(states)
            for k, v in avg.items()
        }

    fresh = FrozenLinear(64, 32, fmt=fmt, block_size=16)
    fresh.load_state_dict(average([q.state_dict()]))  # n = 1: harmless, repaired
    assert torch.equal(fresh.base_weight(), q.base_weight())
    with pytest.raises(RuntimeError, match="sum of 3 checkpoints"):
        fresh.load_state_dict(average([q.state_dict()] * 3))


def _conv_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 16, 2, stride=2, padding=1),  # rows of 16 weights
        torch.nn.Conv1d(16, 16, 4, padding=2, groups=4),  # rows of 4 * 4
        torch.nn.Embedding(10, 32, padding_idx=0),
        torch.nn.Conv1d(16, 8, 3, padding_mode="circular"),  # not supported: kept
    )


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantised_convolutions_and_embeddings_compute_their_dequantised_weight(fmt):
    m = _conv_model()
    ref = _conv_model()  # the same fp32 weights
    assert quantize_modules(m, fmt, 16, 4, kinds=("conv", "embedding")) == 3
    assert isinstance(m[0], FrozenConv) and isinstance(m[2], FrozenEmbedding)
    assert type(m[3]) is torch.nn.Conv1d
    x2, x1, ids = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 7), torch.tensor([0, 3])
    for q, plain, x in ((m[0], ref[0], x2), (m[1], ref[1], x1)):
        assert q.weight.shape == plain.weight.shape
        want = plain._conv_forward(x, q.weight, plain.bias)
        torch.testing.assert_close(q(x), want)
        assert (q.weight - plain.weight).abs().max() < 0.1  # the format's error
    torch.testing.assert_close(m[2](ids), m[2].weight[ids])
    assert "weight" not in m[0].state_dict()


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_fp32_convolution_and_embedding_weights_quantise_on_load(fmt):
    m = _conv_model()
    fp32 = _conv_model().state_dict()
    quantize_modules(m, fmt, 16, 4, kinds=("conv", "embedding"))
    want = {k: v.clone() for k, v in m.state_dict().items()}
    fresh = _conv_model()
    torch.nn.init.zeros_(fresh[0].weight)
    quantize_modules(fresh, fmt, 16, 4, kinds=("conv", "embedding"))
    fresh.load_state_dict(fp32)  # ESPnet's --init_param from the fp32 model
    assert fresh.state_dict().keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_an_unknown_module_kind_is_refused():
    with pytest.raises(ValueError, match="unknown kind"):
        quantize_modules(_conv_model(), "nf4", kinds=("lstm",))
