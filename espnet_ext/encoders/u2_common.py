"""U2++ chunk machinery shared by ``u2_conformer`` and ``moe_conformer``.

:class:`ChunkEncoderMixin` goes before ESPnet's ``ConformerEncoder`` in an encoder's
bases. It adds, without touching ESPnet's layer code:

- chunked self-attention in the ordinary full forward (training with
  ``use_dynamic_chunk`` / ``static_chunk_size``, or decoding with a decoding chunk
  size): ESPnet's ``forward`` runs unchanged, a forward pre-hook on each layer turns
  its (B, 1, T) padding mask into the (B, T, T) chunk mask and a forward hook hands
  the padding mask back, so output lengths, inter-CTC and ``return_all_hs`` stay
  ESPnet's;
- ``causal`` depthwise convolutions
  (:class:`~espnet_ext.layers.chunk.CausalDepthwiseConv1d`, same state-dict keys);
- :meth:`ChunkEncoderMixin.forward_chunk`: one chunk of features in, its encoder
  frames out, with per-layer attention key/value caches and convolution caches;
  the subsampling front end gets each chunk with its right context so that chunk by
  chunk equals the full forward under the same chunk mask.

With every option off (the default) nothing is installed and the encoder is the
plain ESPnet class: same outputs, same state dict.
"""

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from espnet_ext.layers.chunk import (
    chunk_attention_mask,
    draw_dynamic_chunk,
    make_conv_module_causal,
    subsampling_context,
)

__all__ = ["ChunkEncoderMixin", "ChunkState", "LayerCache"]


class LayerCache(NamedTuple):
    """Caches of one conformer layer between chunks (batch B, H heads).

    k, v: (B, H, T_cache, d_k) attention keys/values of earlier frames.
    conv: (B, kernel - 1, C) the depthwise convolution's last inputs (or None).
    """

    k: torch.Tensor
    v: torch.Tensor
    conv: Optional[torch.Tensor]


class ChunkState(NamedTuple):
    """Streaming state: ``offset`` encoder frames emitted so far, per-layer caches."""

    offset: int
    layers: Tuple[LayerCache, ...]


class _ChunkMaskPreHook:
    """Layer pre-hook: (B, 1, T) padding mask -> (B, T, T) padding & chunk mask.

    A class (not a closure) so that ``torch.save(model)`` can pickle it. The plan
    ``(chunk_size, num_left_chunks)`` is set on the layer by the encoder's forward
    for the duration of one call; no plan = the hook does nothing.
    """

    def __call__(self, layer, args, kwargs):
        plan = layer.__dict__.get("_u2_plan")
        if plan is None:
            return None
        if len(args) > 1:
            pad = args[1]
        else:
            pad = kwargs.get("mask")
        if pad is None or pad.dim() != 3 or pad.size(1) != 1:
            return None  # not ESPnet's padding mask: leave it alone
        chunk = chunk_attention_mask(pad.size(-1), plan[0], plan[1], pad.device)
        layer.__dict__["_u2_pad_mask"] = pad
        masked = pad & chunk.unsqueeze(0)  # (B, T, T)
        if len(args) > 1:
            return (args[0], masked) + tuple(args[2:]), kwargs
        kwargs = dict(kwargs)
        kwargs["mask"] = masked
        return args, kwargs


class _ChunkMaskPostHook:
    """Layer hook: give ESPnet's forward back the (B, 1, T) padding mask."""

    def __call__(self, layer, args, output):
        pad = layer.__dict__.pop("_u2_pad_mask", None)
        if pad is None:
            return None
        return output[0], pad


class ChunkEncoderMixin:
    """U2++ chunk options for an ESPnet ``ConformerEncoder`` subclass.

    Call :meth:`_init_chunking` at the end of ``__init__``. Options (YAML keys):

    use_dynamic_chunk: per training batch, full context about half of the time, else
        a chunk of 1..25 encoder frames (:func:`draw_dynamic_chunk`).
    use_dynamic_left_chunk: with ``use_dynamic_chunk``, also draw how many left
        chunks are visible (else all).
    static_chunk_size: > 0: always this chunk size (all left chunks in training,
        ``num_decoding_left_chunks`` in decoding); 0: off.
    causal: left-padded depthwise convolution (a frame never sees the future).

    Eval mode (validation, decoding) never draws: it runs full context, or the
    decoding chunk set by :meth:`set_decoding_chunk`, or ``static_chunk_size``.
    """

    def _init_chunking(
        self,
        use_dynamic_chunk: bool,
        use_dynamic_left_chunk: bool,
        static_chunk_size: int,
        causal: bool,
        ctc_trim: bool,
    ) -> None:
        if static_chunk_size < 0:
            raise ValueError(
                f"static_chunk_size must be >= 0 (0 = off), got {static_chunk_size}"
            )
        if use_dynamic_left_chunk and not use_dynamic_chunk:
            raise ValueError(
                "use_dynamic_left_chunk needs use_dynamic_chunk: true (it draws the "
                "left context of the dynamic chunks)"
            )
        if use_dynamic_chunk and static_chunk_size > 0:
            raise ValueError(
                "use_dynamic_chunk and static_chunk_size > 0 exclude each other: "
                "choose dynamic (random chunk per batch) or static chunks"
            )
        self.use_dynamic_chunk = use_dynamic_chunk
        self.use_dynamic_left_chunk = use_dynamic_left_chunk
        self.static_chunk_size = static_chunk_size
        self.causal = causal
        self.decoding_chunk_size: Optional[int] = None
        self.num_decoding_left_chunks = -1
        self._u2_hooks = False
        if self.chunk_training and ctc_trim:
            raise ValueError(
                "ctc_trim shortens the sequence between layers, which chunk masks "
                "cannot follow: use ctc_trim: false with chunk training"
            )
        if causal:
            for layer in self.encoders:
                if getattr(layer, "conv_module", None) is not None:
                    make_conv_module_causal(layer.conv_module)
        if self.chunk_training:
            self._install_chunk_hooks()

    @property
    def chunk_training(self) -> bool:
        return bool(self.use_dynamic_chunk or self.static_chunk_size > 0)

    def _install_chunk_hooks(self) -> None:
        if self._u2_hooks:
            return
        if getattr(self, "ctc_trim", False):
            raise ValueError("chunked attention cannot be combined with ctc_trim")
        for layer in self.encoders:
            layer.register_forward_pre_hook(_ChunkMaskPreHook(), with_kwargs=True)
            layer.register_forward_hook(_ChunkMaskPostHook())
            # ESPnet's flash-attention path (selfattn on CUDA with flash_attn
            # installed) reads only the last mask row as key padding: it would
            # silently drop the chunk mask, so chunked encoders use the plain path.
            if getattr(layer.self_attn, "use_flash_attn", False):
                layer.self_attn.use_flash_attn = False
        self._u2_hooks = True

    def set_decoding_chunk(
        self,
        chunk_size: Optional[int],
        num_left_chunks: int = -1,
        simulate_streaming: bool = False,
    ) -> None:
        """Chunked attention in eval-mode forwards (decoding).

        Args:
            chunk_size: encoder frames per chunk (> 0), or ``None`` for the model's
                default (``static_chunk_size`` if set, else full context).
            num_left_chunks: visible left chunks, < 0 = all.
            simulate_streaming: eval-mode ``forward`` of a single utterance runs
                :meth:`forward_chunk_by_chunk` (caches, chunk by chunk) instead of
                one pass with the chunk mask. Same result; what a streaming
                decoder computes.
        """
        if simulate_streaming:
            if chunk_size is None:
                raise ValueError("simulate_streaming needs decoding_chunk_size > 0")
            self.check_streamable()
        if chunk_size is not None:
            if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
                raise ValueError(
                    f"decoding_chunk_size must be an int, got {chunk_size!r}"
                )
            if chunk_size <= 0:
                raise ValueError(
                    f"decoding_chunk_size must be > 0 (or null for full context), "
                    f"got {chunk_size}"
                )
            self._install_chunk_hooks()
        self.decoding_chunk_size = chunk_size
        self.num_decoding_left_chunks = int(num_left_chunks)
        self.simulate_streaming = bool(simulate_streaming)

    def _chunk_plan(self, num_frames: int) -> Optional[Tuple[int, int]]:
        """``(chunk_size, num_left_chunks)`` for this forward, or None (full)."""
        if self.training and self.use_dynamic_chunk:
            chunk, left = draw_dynamic_chunk(num_frames, self.use_dynamic_left_chunk)
            return None if chunk >= num_frames else (chunk, left)
        if not self.training and self.decoding_chunk_size is not None:
            return self.decoding_chunk_size, self.num_decoding_left_chunks
        if self.static_chunk_size > 0:
            left = -1 if self.training else self.num_decoding_left_chunks
            return self.static_chunk_size, left
        return None

    def _subsampled_frames(self, num_input_frames: int) -> int:
        """Encoder frames the front end makes of ``num_input_frames`` (exact for
        ESPnet's unpadded ``Conv2dSubsampling*``, identity otherwise)."""
        conv = getattr(self.embed, "conv", None)
        if conv is None:
            return num_input_frames
        try:
            rate, right = subsampling_context(conv)
        except ValueError:
            return num_input_frames
        return max((num_input_frames - right - 1) // rate + 1, 0)

    def forward(
        self,
        xs_pad: torch.Tensor,
        ilens: torch.Tensor,
        prev_states: torch.Tensor = None,
        masks: torch.Tensor = None,
        ctc=None,
        return_all_hs: bool = False,
    ):
        """ESPnet's conformer forward, with the chunk mask of this batch if any."""
        if (
            not self.training
            and getattr(self, "simulate_streaming", False)
            and xs_pad.size(0) == 1
            and masks is None
        ):
            ys = self.forward_chunk_by_chunk(
                xs_pad[:, : int(ilens[0])],
                self.decoding_chunk_size,
                self.num_decoding_left_chunks,
            )
            return ys, ys.new_full((1,), ys.size(1), dtype=torch.long), None
        plan = None
        if getattr(self, "_u2_hooks", False):
            plan = self._chunk_plan(self._subsampled_frames(xs_pad.size(1)))
        if plan is None:
            return super().forward(
                xs_pad,
                ilens,
                prev_states,
                masks=masks,
                ctc=ctc,
                return_all_hs=return_all_hs,
            )
        for layer in self.encoders:
            layer.__dict__["_u2_plan"] = plan
        try:
            return super().forward(
                xs_pad,
                ilens,
                prev_states,
                masks=masks,
                ctc=ctc,
                return_all_hs=return_all_hs,
            )
        finally:
            for layer in self.encoders:
                layer.__dict__.pop("_u2_plan", None)
                layer.__dict__.pop("_u2_pad_mask", None)

    # ------------------------------------------------------------------ streaming
    def streaming_context(self) -> Tuple[int, int]:
        """``(subsampling rate, right context)`` of the front end, in input frames."""
        self.check_streamable()
        return subsampling_context(self.embed.conv)

    def check_streamable(self) -> None:
        """Raise ``ValueError`` naming the key that makes chunk-by-chunk inexact."""
        from espnet.nets.pytorch_backend.transformer.attention import (
            MultiHeadedAttention,
            RelPositionMultiHeadedAttention,
        )
        from espnet.nets.pytorch_backend.transformer.embedding import (
            PositionalEncoding,
            RelPositionalEncoding,
        )
        from espnet.nets.pytorch_backend.transformer.positionwise_feed_forward import (  # noqa: E501
            PositionwiseFeedForward,
        )

        has_conv = any(
            getattr(layer, "conv_module", None) is not None for layer in self.encoders
        )
        if has_conv and not self.causal:
            raise ValueError(
                "streaming (chunk by chunk) needs causal: true in encoder_conf: a "
                "symmetric depthwise convolution looks into the next chunk"
            )
        if getattr(self, "interctc_use_conditioning", False):
            raise ValueError(
                "streaming does not support interctc_use_conditioning: true"
            )
        conv = getattr(self.embed, "conv", None)
        if conv is None or not isinstance(conv, torch.nn.Sequential):
            raise ValueError(
                "streaming needs input_layer: conv2d, conv2d2, conv2d6 or conv2d8 "
                f"(got {type(self.embed).__name__})"
            )
        subsampling_context(conv)
        pos_enc = _embed_parts(self.embed)[2]
        if type(pos_enc) not in (RelPositionalEncoding, PositionalEncoding):
            raise ValueError(
                "streaming needs pos_enc_layer_type: rel_pos with rel_pos_type: "
                "latest, or abs_pos (legacy relative positions depend on the "
                f"sequence length); got {type(pos_enc).__name__}"
            )
        for layer in self.encoders:
            attn = layer.self_attn
            if type(attn) not in (
                RelPositionMultiHeadedAttention,
                MultiHeadedAttention,
            ):
                raise ValueError(
                    "streaming needs selfattention_layer_type: rel_selfattn (latest) "
                    f"or selfattn, got {type(attn).__name__}"
                )
            if getattr(attn, "zero_triu", False):
                raise ValueError("streaming does not support zero_triu: true")
            for name in ("feed_forward", "feed_forward_macaron"):
                ffn = getattr(layer, name, None)
                if ffn is not None and not _is_framewise(ffn, PositionwiseFeedForward):
                    raise ValueError(
                        "streaming needs positionwise_layer_type: linear (a conv1d "
                        "FFN looks into the next chunk)"
                    )

    def init_chunk_state(self) -> ChunkState:
        return ChunkState(0, ())

    @torch.no_grad()
    def forward_chunk(
        self,
        xs: torch.Tensor,
        state: Optional[ChunkState] = None,
        cache_frames: int = -1,
    ) -> Tuple[torch.Tensor, ChunkState]:
        """Encode one chunk of features given the caches of the earlier chunks.

        Args:
            xs: (B, W, input_size) normalised features of this chunk, including the
                front end's right context (``streaming_context``); all B rows the
                same length (no padding).
            state: from the previous call (None = start of the utterance).
            cache_frames: encoder frames of attention history kept for the next
                chunk: ``num_left_chunks * chunk_size``; < 0 = all.

        Returns:
            (B, t, output_size) encoder frames of this chunk, the new state.
        """
        if self.training:
            raise ValueError("forward_chunk is for inference: call .eval() first")
        if not self.__dict__.get("_u2_streamable", False):
            self.check_streamable()  # once: the per-chunk cost would add up
            self.__dict__["_u2_streamable"] = True
        state = state or self.init_chunk_state()
        conv, linear, pos_enc = _embed_parts(self.embed)
        x = conv(xs.unsqueeze(1))  # (B, C, t, F')
        b, c, t, f = x.size()
        x = linear(x.transpose(1, 2).contiguous().view(b, t, c * f))  # (B, t, D)
        cache_len = state.layers[0].k.size(2) if state.layers else 0
        x, pos_emb = _pos_encode_chunk(pos_enc, x, state.offset, cache_len)
        new_layers: List[LayerCache] = []
        for i, layer in enumerate(self.encoders):
            cache = state.layers[i] if state.layers else None
            x, new_cache = _layer_forward_chunk(layer, x, pos_emb, cache)
            if cache_frames >= 0:
                keep = min(cache_frames, new_cache.k.size(2))
                start = new_cache.k.size(2) - keep
                new_cache = LayerCache(
                    new_cache.k[:, :, start:], new_cache.v[:, :, start:], new_cache.conv
                )
            new_layers.append(new_cache)
        if self.normalize_before:
            x = self.after_norm(x)
        return x, ChunkState(state.offset + t, tuple(new_layers))

    @torch.no_grad()
    def forward_chunk_by_chunk(
        self, xs: torch.Tensor, chunk_size: int, num_left_chunks: int = -1
    ) -> torch.Tensor:
        """Encode a whole utterance chunk by chunk (what streaming computes).

        Args:
            xs: (B, T, input_size) features (no padding).
            chunk_size: encoder frames per chunk (> 0).
            num_left_chunks: visible left chunks, < 0 = all.

        Returns:
            (B, T', output_size), T' as the full forward's.
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        rate, right = self.streaming_context()
        window = (chunk_size - 1) * rate + right + 1
        stride = rate * chunk_size
        cache_frames = num_left_chunks * chunk_size if num_left_chunks >= 0 else -1
        state = None
        outs = []
        for cur in range(0, xs.size(1) - right, stride):
            ys, state = self.forward_chunk(
                xs[:, cur : cur + window], state, cache_frames
            )
            outs.append(ys)
        if not outs:
            return xs.new_zeros(xs.size(0), 0, self.output_size())
        return torch.cat(outs, dim=1)


def _is_framewise(ffn, positionwise_cls) -> bool:
    from espnet_ext.layers.moe import MoEFeedForward

    return isinstance(ffn, (positionwise_cls, MoEFeedForward))


def _embed_parts(embed):
    """``(conv stack, linear, positional encoding)`` of a ``Conv2dSubsampling*``."""
    out = embed.out
    if isinstance(out, torch.nn.Sequential):
        return embed.conv, out[0], out[1]
    return embed.conv, out, embed.pos_enc


def _pos_encode_chunk(pos_enc, x: torch.Tensor, offset: int, cache_len: int):
    """Scale ``x`` and give the positional encodings of this chunk.

    abs_pos: x * sqrt(D) + pe[offset : offset + t], no separate embedding.
    rel_pos (latest): x * sqrt(D) and the relative encodings of a key window of
    ``cache_len + t`` frames, (1, 2 (cache_len + t) - 1, D), ordered as ESPnet's.
    """
    from espnet.nets.pytorch_backend.transformer.embedding import (
        RelPositionalEncoding,
    )

    t = x.size(1)
    if isinstance(pos_enc, RelPositionalEncoding):
        keys = cache_len + t
        pos_enc.extend_pe(x.new_zeros(1, keys))
        center = pos_enc.pe.size(1) // 2
        pos_emb = pos_enc.pe[:, center - keys + 1 : center + keys]
        return x * pos_enc.xscale, pos_emb
    pos_enc.extend_pe(x.new_zeros(1, offset + t))
    return x * pos_enc.xscale + pos_enc.pe[:, offset : offset + t], None


def _memo(owner: torch.nn.Module, tag, tensors: Sequence[torch.Tensor], build):
    """``build()``, kept on ``owner`` until one of ``tensors`` changes.

    A chunk is a few frames, so per-chunk work that depends only on the weights
    (fusing, folding, projecting the positional table) costs as much as the chunk's
    own arithmetic. The key holds each tensor's address and version counter: an
    in-place update (``load_state_dict``, an optimiser step) or a ``.to()`` rebuilds.
    """
    key = tuple((t.data_ptr(), t._version) for t in tensors)
    memo = owner.__dict__.setdefault("_u2_memo", {})
    hit = memo.get(tag)
    if hit is not None and hit[0] == key:
        return hit[1]
    if len(memo) >= 64:  # bounded: a few position windows per decoding setup
        memo.clear()
    value = build()
    memo[tag] = (key, value)
    return value


def _plain_linear(lin) -> bool:
    return type(lin) is torch.nn.Linear and lin.bias is not None


def _plain_attention(attn) -> bool:
    """ESPnet's attention with plain q/k/v/out projections and no q/k norms."""
    from espnet.nets.pytorch_backend.transformer.attention import (
        MultiHeadedAttention,
    )

    return (
        type(attn).forward_attention is MultiHeadedAttention.forward_attention
        and type(attn).forward_qkv is MultiHeadedAttention.forward_qkv
        and all(
            _plain_linear(getattr(attn, n))
            for n in ("linear_q", "linear_k", "linear_v", "linear_out")
        )
        and type(getattr(attn, "q_norm", torch.nn.Identity())) is torch.nn.Identity
        and type(getattr(attn, "k_norm", torch.nn.Identity())) is torch.nn.Identity
    )


def _qkv(attn, x):
    """``forward_qkv(x, x, x)`` of ESPnet's plain attention (the caller checks
    :func:`_plain_attention`) as one GEMM on the fused q/k/v weights.

    x: (B, t, D); returns q, k, v, each (B, H, t, d_k).
    """
    lins = (attn.linear_q, attn.linear_k, attn.linear_v)
    params = [t for lin in lins for t in (lin.weight, lin.bias)]
    weight, bias = _memo(
        attn,
        "qkv",
        params,
        lambda: (torch.cat(params[0::2]), torch.cat(params[1::2])),
    )  # (3 D, D), (3 D,)
    b, t = x.shape[:2]
    qkv = torch.nn.functional.linear(x, weight, bias).view(b, t, 3, attn.h, attn.d_k)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _attention_chunk(attn, x, pos_emb, cache: Optional[LayerCache]):
    """Self-attention of a chunk's frames over cached + own keys.

    x: (B, t, D); returns (B, t, D) and the extended k, v (B, H, T_cache + t, d_k).
    ESPnet's plain attention runs inlined (fused q/k/v, no eval-mode dropout call,
    the attention weights not kept on the module); any other goes through its own
    ``forward_qkv`` / ``forward_attention``.
    """
    plain = _plain_attention(attn)
    if plain:
        q, k, v = _qkv(attn, x)  # (B, H, t, d_k)
    else:
        q, k, v = attn.forward_qkv(x, x, x)
    if cache is not None:
        k = torch.cat([cache.k, k], dim=2)
        v = torch.cat([cache.v, v], dim=2)
    if pos_emb is None:
        scores = torch.matmul(q, k.transpose(-2, -1))
    else:
        scores = _rel_scores(attn, q, k, pos_emb)
    scores = scores.mul_(1.0 / math.sqrt(attn.d_k))
    if not plain:
        return attn.forward_attention(v, scores, None), k, v
    ctx = torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, H, t, d_k)
    ctx = ctx.transpose(1, 2).reshape(x.size(0), x.size(1), attn.h * attn.d_k)
    out = attn.linear_out
    return torch.nn.functional.linear(ctx, out.weight, out.bias), k, v


def _rel_scores(attn, q, k, pos_emb):
    """Unscaled relative-position scores (B, H, t, keys) of ESPnet's latest
    ``RelPositionMultiHeadedAttention`` for queries at the window's end."""
    t, keys = q.size(2), k.size(2)
    p = _projected_positions(attn, pos_emb)  # (1, H, 2 keys - 1, d_k)
    q_u = q + attn.pos_bias_u.unsqueeze(1)  # (H, 1, d_k) broadcast over time
    q_v = q + attn.pos_bias_v.unsqueeze(1)
    matrix_ac = torch.matmul(q_u, k.transpose(-2, -1))  # (B, H, t, keys)
    matrix_bd = torch.matmul(q_v, p.transpose(-2, -1))  # (B, H, t, 2 keys - 1)
    # Column m of matrix_bd holds relative position keys - 1 - m. Query i sits at
    # window position cached + i; its relative position to key j is cached + i - j,
    # i.e. column keys - 1 - cached - i + j (ESPnet's rel_shift for cached = 0): row
    # i's keys columns start at t - 1 - i, a strided view of the flat rows.
    matrix_bd = matrix_bd.contiguous()
    b, h = matrix_bd.shape[:2]
    width = 2 * keys - 1
    matrix_bd = matrix_bd.as_strided(
        (b, h, t, keys),
        (h * t * width, t * width, width - 1, 1),
        matrix_bd.storage_offset() + t - 1,
    )
    return matrix_ac.add_(matrix_bd)


def _projected_positions(attn, pos_emb: torch.Tensor) -> torch.Tensor:
    """``linear_pos(pos_emb)`` as (1, H, 2 keys - 1, d_k), memoised per module.

    Every chunk of every utterance projects the same few windows of the positional
    table (``keys`` = cached + chunk frames), so a plain ``Linear`` projection is
    kept per window until a parameter changes (their version counters and storage
    are part of the key). Any other ``linear_pos`` module is called each time.
    """
    lin = attn.linear_pos
    if type(lin) is not torch.nn.Linear:
        p = lin(pos_emb)
    else:
        tag = ("pos", pos_emb.shape, pos_emb.dtype)
        p = _memo(attn, tag, [pos_emb, *lin.parameters()], lambda: lin(pos_emb))
    return p.view(1, -1, attn.h, attn.d_k).transpose(1, 2)


def _conv_chunk(conv_module, x, cache: Optional[torch.Tensor]):
    """The conformer convolution module on a chunk, causal with its input cache.

    x: (B, t, C) -> (B, t, C); cache: (B, kernel - 1, C) last GLU outputs.

    Time stays the last-but-one axis throughout: a chunk has few frames, and at 16
    frames ``Conv1d``'s fixed cost dominates (measured: a depthwise ``conv1d`` 193 us,
    the same product as ``unfold`` + multiply + sum 44 us; a kernel-1 ``Conv1d`` 100
    us, ``linear`` 57 us). The plain module types (ESPnet's ``ConvolutionModule``
    with our causal depthwise conv, BatchNorm in eval mode) take this route; any
    other (wrapped, quantised) module goes through its own ``forward`` calls.
    """
    if _plain_conv_module(conv_module):
        return _conv_chunk_timewise(conv_module, x, cache)
    dw = conv_module.depthwise_conv
    lorder = dw.kernel_size[0] - 1
    x = x.transpose(1, 2)  # (B, C, t)
    x = conv_module.pointwise_conv1(x)  # (B, 2C, t)
    x = torch.nn.functional.glu(x, dim=1)  # (B, C, t)
    if cache is None:
        cache = x.new_zeros(x.size(0), lorder, x.size(1))
    x = torch.cat([cache.transpose(1, 2), x], dim=2)  # (B, C, lorder + t)
    new_cache = x[:, :, x.size(2) - lorder :].transpose(1, 2)
    x = dw._conv_forward(x, dw.weight, dw.bias)  # unpadded: (B, C, t)
    x = conv_module.activation(conv_module.norm(x))
    x = conv_module.pointwise_conv2(x)
    return x.transpose(1, 2), new_cache


def _plain_conv_module(conv_module) -> bool:
    from espnet_ext.layers.chunk import CausalDepthwiseConv1d

    def pointwise(conv) -> bool:
        return type(conv) is torch.nn.Conv1d and conv.kernel_size == (1,)

    return (
        pointwise(conv_module.pointwise_conv1)
        and pointwise(conv_module.pointwise_conv2)
        and conv_module.pointwise_conv1.groups == 1
        and conv_module.pointwise_conv2.groups == 1
        and type(conv_module.depthwise_conv) is CausalDepthwiseConv1d
        and type(conv_module.norm) is torch.nn.BatchNorm1d
        and not conv_module.norm.training
        and conv_module.norm.track_running_stats
    )


def _folded_conv_params(conv_module):
    """The plain module's weights in (B, t, C) form, BatchNorm folded in.

    Returns (pointwise 1 weight (2C, C), bias, depthwise weight (C, kernel) scaled
    by BatchNorm, shift (C,) = the depthwise bias through BatchNorm, pointwise 2
    weight (C, C), bias): eval-mode BatchNorm is one per-channel affine map, so
    ``norm(dw(x)) = (windows * (w * scale)).sum + (b * scale + shift)``.
    """
    pw1, dw, norm, pw2 = (
        conv_module.pointwise_conv1,
        conv_module.depthwise_conv,
        conv_module.norm,
        conv_module.pointwise_conv2,
    )
    scale = torch.rsqrt(norm.running_var + norm.eps)
    shift = -norm.running_mean * scale
    if norm.affine:
        scale = scale * norm.weight
        shift = shift * norm.weight + norm.bias
    if dw.bias is not None:
        shift = shift + dw.bias * scale
    return (
        pw1.weight.squeeze(-1),
        pw1.bias,
        dw.weight.squeeze(1) * scale.unsqueeze(-1),
        shift,
        pw2.weight.squeeze(-1),
        pw2.bias,
    )


def _conv_chunk_timewise(conv_module, x, cache: Optional[torch.Tensor]):
    """:func:`_conv_chunk` for the plain module types, in (B, t, C) layout."""
    F = torch.nn.functional
    tensors = [
        *conv_module.parameters(),
        conv_module.norm.running_mean,
        conv_module.norm.running_var,
    ]
    w1, b1, wd, shift, w2, b2 = _memo(
        conv_module, "folded", tensors, lambda: _folded_conv_params(conv_module)
    )
    kernel = wd.size(1)
    x = F.glu(F.linear(x, w1, b1), dim=-1)  # (B, t, C)
    if cache is None:
        cache = x.new_zeros(x.size(0), kernel - 1, x.size(2))
    x = torch.cat([cache, x], dim=1)  # (B, kernel - 1 + t, C)
    new_cache = x[:, x.size(1) - kernel + 1 :]
    # (B, t, C, kernel) windows times the (C, kernel) depthwise weights
    x = (x.unfold(1, kernel, 1) * wd).sum(-1).add_(shift)
    return F.linear(_activation(conv_module.activation)(x), w2, b2), new_cache


def _activation(module):
    """``F.silu`` for ESPnet's ``Swish`` (x * sigmoid(x), two ops); else the module."""
    from espnet.nets.pytorch_backend.conformer.swish import Swish

    return torch.nn.functional.silu if type(module) is Swish else module


def _ffn_chunk(ffn, x):
    """A feed-forward module on a chunk: ESPnet's plain ``PositionwiseFeedForward``
    as two functional GEMMs (no eval-mode dropout call), any other (MoE, wrapped)
    through its own forward."""
    from espnet.nets.pytorch_backend.transformer.positionwise_feed_forward import (
        PositionwiseFeedForward,
    )

    if (
        type(ffn) is not PositionwiseFeedForward
        or not _plain_linear(ffn.w_1)
        or not _plain_linear(ffn.w_2)
    ):
        return ffn(x)
    F = torch.nn.functional
    h = _activation(ffn.activation)(F.linear(x, ffn.w_1.weight, ffn.w_1.bias))
    return F.linear(h, ffn.w_2.weight, ffn.w_2.bias)


def _identity(x):
    return x


def _layer_forward_chunk(layer, x, pos_emb, cache: Optional[LayerCache]):
    """ESPnet's conformer ``EncoderLayer`` step order, with caches (eval mode).

    ESPnet's layer has no key/value cache (its ``cache`` re-runs only the last query
    frame), so the residual structure is spelled out here; it follows the layer's
    own flags (macaron, ``normalize_before``, ``concat_after``, conv module).
    """
    nb = layer.normalize_before
    # eval mode: ESPnet's dropout is the identity, not worth an aten call per module
    drop = _identity if type(layer.dropout) is torch.nn.Dropout else layer.dropout
    if layer.feed_forward_macaron is not None:
        h = layer.norm_ff_macaron(x) if nb else x
        y = _ffn_chunk(layer.feed_forward_macaron, h)
        x = torch.add(x, drop(y), alpha=layer.ff_scale)
        if not nb:
            x = layer.norm_ff_macaron(x)
    residual = x
    h = layer.norm_mha(x) if nb else x
    att, k, v = _attention_chunk(layer.self_attn, h, pos_emb, cache)
    if layer.concat_after:
        x = residual + layer.concat_linear(torch.cat((h, att), dim=-1))
    else:
        x = residual + drop(att)
    if not nb:
        x = layer.norm_mha(x)
    conv_cache = None
    if layer.conv_module is not None:
        residual = x
        h = layer.norm_conv(x) if nb else x
        y, conv_cache = _conv_chunk(
            layer.conv_module, h, cache.conv if cache is not None else None
        )
        x = residual + drop(y)
        if not nb:
            x = layer.norm_conv(x)
    h = layer.norm_ff(x) if nb else x
    y = _ffn_chunk(layer.feed_forward, h)
    x = torch.add(x, drop(y), alpha=layer.ff_scale)
    if not nb:
        x = layer.norm_ff(x)
    if layer.conv_module is not None:
        x = layer.norm_final(x)
    return x, LayerCache(k, v, conv_cache)
