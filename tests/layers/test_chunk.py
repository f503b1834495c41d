"""Chunk masks, dynamic chunk draws, causal convolution, subsampling context."""

import random

import pytest
import torch
from espnet.nets.pytorch_backend.transformer.subsampling import (
    Conv2dSubsampling,
    Conv2dSubsampling6,
    Conv2dSubsampling8,
)

from espnet_ext.layers.chunk import (
    CausalDepthwiseConv1d,
    chunk_attention_mask,
    draw_dynamic_chunk,
    subsampling_context,
)


@pytest.mark.parametrize(
    "size,chunk,left", [(10, 3, -1), (10, 3, 1), (7, 2, 0), (5, 8, -1)]
)
def test_chunk_mask_is_the_chunk_rule(size, chunk, left):
    mask = chunk_attention_mask(size, chunk, left)
    for i in range(size):
        for j in range(size):
            ci, cj = i // chunk, j // chunk
            expected = cj <= ci and (left < 0 or cj >= ci - left)
            assert bool(mask[i, j]) == expected, (i, j)


def test_chunk_mask_properties():
    mask = chunk_attention_mask(12, 4, -1)
    assert mask.diagonal().all()  # every frame sees itself
    assert not mask.triu(4).any()  # never a later chunk
    assert mask[:4, :4].all()  # full attention inside a chunk
    full = chunk_attention_mask(12, 12, -1)
    assert full.all()  # one chunk = full context


def test_chunk_mask_rejects_non_positive_chunk():
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_attention_mask(4, 0)


def test_dynamic_draw_range():
    rng = random.Random(0)
    draws = [draw_dynamic_chunk(100, True, rng=rng) for _ in range(400)]
    full = [c for c, _ in draws if c >= 100]
    chunked = [(c, n) for c, n in draws if c < 100]
    assert 0.3 < len(full) / len(draws) < 0.7  # about half full context
    assert all(1 <= c <= 25 for c, _ in chunked)
    assert all(0 <= n < (99 // c) for c, n in chunked)
    assert len({c for c, _ in chunked}) > 10
    assert draw_dynamic_chunk(100, False, rng=random.Random(3))[1] == -1


def test_causal_conv_output_ignores_the_future():
    torch.manual_seed(0)
    conv = CausalDepthwiseConv1d(3, 5)
    x = torch.randn(2, 3, 20)
    y = conv(x)
    t = 11
    x2 = x.clone()
    x2[:, :, t + 1 :] = torch.randn(2, 3, 20 - t - 1)
    y2 = conv(x2)
    assert y.shape == x.shape
    assert torch.equal(y[:, :, : t + 1], y2[:, :, : t + 1])
    assert not torch.allclose(y[:, :, t + 1 :], y2[:, :, t + 1 :])
    # and it is the symmetric conv shifted by (k-1)/2 with the same weights
    sym = torch.nn.Conv1d(3, 3, 5, padding=4, groups=3)
    sym.load_state_dict(conv.state_dict())
    assert torch.allclose(sym(x)[:, :, :20], y, atol=1e-6)


@pytest.mark.parametrize(
    "cls,rate,right",
    [
        (Conv2dSubsampling, 4, 6),
        (Conv2dSubsampling6, 6, 10),
        (Conv2dSubsampling8, 8, 14),
    ],
)
def test_subsampling_context_matches_espnet(cls, rate, right):
    sub = cls(20, 8, 0.0).eval()
    assert subsampling_context(sub.conv) == (rate, right)
    # output frame t only reads input frames rate*t .. rate*t + right
    torch.manual_seed(0)
    x = torch.randn(1, 60, 20)
    y, _ = sub(x, None)
    t = 2
    x2 = x.clone()
    x2[:, rate * t + right + 1 :] += 1.0
    y2, _ = sub(x2, None)
    assert torch.allclose(y[:, : t + 1], y2[:, : t + 1])
    assert not torch.allclose(y[:, t + 1], y2[:, t + 1])
