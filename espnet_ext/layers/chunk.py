"""Chunk attention masks, chunk-size draws and causal convolution (U2 / U2++).

U2 (arXiv 2012.05481) and U2++ (arXiv 2106.05642, 2404.16407) train one conformer for
streaming and full-context decoding: each batch restricts self-attention to chunks of
``C`` frames (each frame sees its own chunk and ``L`` chunks to the left), with ``C``
drawn per batch, and a causal depthwise convolution so that no frame sees the future
through the convolution either. Decoding chunk by chunk with attention and
convolution caches then computes exactly what the full forward computes under the
same chunk mask (tested in ``tests/encoders/test_u2_conformer.py``).

Everything here is plain tensor code, independent of ESPnet's classes.
"""

import random
from typing import Optional, Tuple

import torch

__all__ = [
    "chunk_attention_mask",
    "draw_dynamic_chunk",
    "CausalDepthwiseConv1d",
    "make_conv_module_causal",
    "subsampling_context",
]

# U2's dynamic chunk training draws chunk sizes from 1..25 subsampled frames (1 s of
# latency at 4x subsampling, 1.5 s at the recipe's 6x): WeNet's ``max_chunk_size``.
MAX_DYNAMIC_CHUNK = 25


def chunk_attention_mask(
    size: int,
    chunk_size: int,
    num_left_chunks: int = -1,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Which keys each query frame may attend to under chunked attention.

    Frame ``i`` belongs to chunk ``c = i // chunk_size``; it sees frames of chunks
    ``c - num_left_chunks .. c`` (all earlier chunks when ``num_left_chunks < 0``),
    never a later chunk.

    Args:
        size: number of frames T.
        chunk_size: frames per chunk (> 0).
        num_left_chunks: left chunks visible; < 0 = all.

    Returns:
        (T, T) bool, ``True`` = may attend.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    pos = torch.arange(size, device=device)
    chunk = pos // chunk_size
    q_chunk = chunk.unsqueeze(1)  # (T, 1) chunk of the query
    k_chunk = chunk.unsqueeze(0)  # (1, T) chunk of the key
    mask = k_chunk <= q_chunk
    if num_left_chunks >= 0:
        mask = mask & (k_chunk >= q_chunk - num_left_chunks)
    return mask


def draw_dynamic_chunk(
    num_frames: int,
    use_dynamic_left_chunk: bool,
    max_chunk: int = MAX_DYNAMIC_CHUNK,
    rng: Optional[random.Random] = None,
) -> Tuple[int, int]:
    """U2's per-batch draw: full context half of the time, else a chunk of 1..25.

    A number ``n`` is drawn uniformly from ``1 .. T-1``; above ``T // 2`` the batch
    gets full context (so about half the batches, and more for short batches),
    otherwise chunk size ``n % max_chunk + 1``. With ``use_dynamic_left_chunk`` the
    number of visible left chunks is drawn uniformly from ``0 .. (T-1)//C - 1``
    (WeNet's range), else all left chunks are visible.

    Python's ``random`` (seeded by ESPnet's ``--seed`` like torch), so the draw never
    touches a device tensor (no host sync on GPU).

    Returns:
        ``(chunk_size, num_left_chunks)``; ``chunk_size >= num_frames`` means full
        context, ``num_left_chunks = -1`` means all left chunks.
    """
    rng = rng or random
    if num_frames <= 1:
        return num_frames, -1
    n = rng.randint(1, num_frames - 1)
    if n > num_frames // 2:
        return num_frames, -1
    chunk = n % max_chunk + 1
    num_left = -1
    if use_dynamic_left_chunk:
        max_left = (num_frames - 1) // chunk
        num_left = rng.randint(0, max_left - 1) if max_left > 0 else 0
    return chunk, num_left


class CausalDepthwiseConv1d(torch.nn.Conv1d):
    """A depthwise ``Conv1d`` padded on the left only: output t sees inputs <= t.

    Same parameters (``weight``, ``bias``) and state-dict keys as the symmetric
    convolution it replaces; only the padding moves: ``kernel_size - 1`` zeros on the
    left instead of ``(kernel_size - 1) / 2`` on each side.

    Shapes: ``(B, C, T) -> (B, C, T)``.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = True):
        super().__init__(
            channels, channels, kernel_size, padding=0, groups=channels, bias=bias
        )
        self.left_context = kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.pad(x, (self.left_context, 0))
        return super().forward(x)


def make_conv_module_causal(conv_module: torch.nn.Module) -> None:
    """Swap a conformer ``ConvolutionModule``'s depthwise conv for a causal one.

    Parameters are copied (same keys), so a module made causal after construction
    keeps its initialisation.
    """
    old = conv_module.depthwise_conv
    if isinstance(old, CausalDepthwiseConv1d):
        return
    if old.groups != old.in_channels or old.in_channels != old.out_channels:
        raise ValueError("causal: the conformer's depthwise_conv is not depthwise")
    new = CausalDepthwiseConv1d(
        old.in_channels, old.kernel_size[0], bias=old.bias is not None
    )
    with torch.no_grad():
        new.weight.copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    conv_module.depthwise_conv = new


def subsampling_context(conv: torch.nn.Module) -> Tuple[int, int]:
    """Subsampling rate and right context of a stack of valid (unpadded) convs.

    Output frame t of a stack of time-convolutions with kernels ``k_i`` and strides
    ``s_i`` (no padding) reads input frames ``R t .. R t + r`` with ``R = prod s_i``
    and ``r = sum_i (k_i - 1) prod_{j<i} s_j``. ESPnet's ``Conv2dSubsampling*``
    front ends are such stacks (time is dim 2 of their ``Conv2d`` kernels).

    Returns:
        ``(rate R, right_context r)``.

    Raises:
        ValueError: a convolution pads or dilates in time.
    """
    rate, right = 1, 0
    for m in conv.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
            k, s = m.kernel_size[0], m.stride[0]
            pad, dil = m.padding[0], m.dilation[0]
            if pad != 0 or dil != 1:
                raise ValueError(
                    "subsampling: streaming needs unpadded, undilated time "
                    f"convolutions, got padding {pad}, dilation {dil}"
                )
            right += (k - 1) * rate
            rate *= s
    return rate, right
