"""``encoder: u2_conformer``: ESPnet's conformer with U2++ chunk options.

U2++ (arXiv 2106.05642; the dense baseline of U2++ MoE, arXiv 2404.16407) trains one
conformer for streaming and full-context decoding: dynamic chunk attention masks,
optionally a limited number of visible left chunks, and a causal depthwise
convolution. This is ESPnet's ``ConformerEncoder`` (every key, same defaults, same
layers) plus :class:`~espnet_ext.encoders.u2_common.ChunkEncoderMixin`; with the chunk
options off it is exactly ESPnet's encoder (same outputs and state dict).
"""

from typing import List, Optional, Union

from espnet2.asr.encoder.conformer_encoder import ConformerEncoder
from typeguard import typechecked

from espnet_ext.encoders.u2_common import ChunkEncoderMixin

__all__ = ["U2ConformerEncoder"]


class U2ConformerEncoder(ChunkEncoderMixin, ConformerEncoder):
    """Conformer encoder with dynamic/static chunk attention and causal convolution.

    Args: every ``ConformerEncoder`` argument, with the same meaning, plus
        use_dynamic_chunk: per training batch, full context about half of the time,
            else a random chunk of 1..25 encoder frames (U2).
        use_dynamic_left_chunk: also draw the number of visible left chunks.
        static_chunk_size: > 0: always chunks of this many encoder frames.
        causal: left-padded depthwise convolution (a frame never sees the future);
            required for chunk-by-chunk decoding (``forward_chunk``).

    Shapes: ``forward(xs_pad (B, T, input_size), ilens (B,))`` ->
    ``(B, T', output_size), (B,), None`` exactly as ``ConformerEncoder``;
    ``forward_chunk(xs (B, W, input_size), state)`` -> ``(B, t, output_size), state``.
    """

    @typechecked
    def __init__(
        self,
        input_size: int,
        output_size: int = 256,
        attention_heads: int = 4,
        linear_units: int = 2048,
        num_blocks: int = 6,
        dropout_rate: float = 0.1,
        positional_dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        input_layer: Optional[str] = "conv2d",
        normalize_before: bool = True,
        concat_after: bool = False,
        positionwise_layer_type: str = "linear",
        positionwise_conv_kernel_size: int = 3,
        macaron_style: bool = False,
        rel_pos_type: str = "legacy",
        pos_enc_layer_type: str = "rel_pos",
        selfattention_layer_type: str = "rel_selfattn",
        activation_type: str = "swish",
        use_cnn_module: bool = True,
        zero_triu: bool = False,
        cnn_module_kernel: int = 31,
        padding_idx: int = -1,
        interctc_layer_idx: List[int] = [],
        interctc_use_conditioning: bool = False,
        ctc_trim: bool = False,
        stochastic_depth_rate: Union[float, List[float]] = 0.0,
        layer_drop_rate: float = 0.0,
        max_pos_emb_len: int = 5000,
        qk_norm: bool = False,
        use_flash_attn: bool = True,
        use_dynamic_chunk: bool = False,
        use_dynamic_left_chunk: bool = False,
        static_chunk_size: int = 0,
        causal: bool = False,
    ):
        super().__init__(
            input_size=input_size,
            output_size=output_size,
            attention_heads=attention_heads,
            linear_units=linear_units,
            num_blocks=num_blocks,
            dropout_rate=dropout_rate,
            positional_dropout_rate=positional_dropout_rate,
            attention_dropout_rate=attention_dropout_rate,
            input_layer=input_layer,
            normalize_before=normalize_before,
            concat_after=concat_after,
            positionwise_layer_type=positionwise_layer_type,
            positionwise_conv_kernel_size=positionwise_conv_kernel_size,
            macaron_style=macaron_style,
            rel_pos_type=rel_pos_type,
            pos_enc_layer_type=pos_enc_layer_type,
            selfattention_layer_type=selfattention_layer_type,
            activation_type=activation_type,
            use_cnn_module=use_cnn_module,
            zero_triu=zero_triu,
            cnn_module_kernel=cnn_module_kernel,
            padding_idx=padding_idx,
            interctc_layer_idx=interctc_layer_idx,
            interctc_use_conditioning=interctc_use_conditioning,
            ctc_trim=ctc_trim,
            stochastic_depth_rate=stochastic_depth_rate,
            layer_drop_rate=layer_drop_rate,
            max_pos_emb_len=max_pos_emb_len,
            qk_norm=qk_norm,
            use_flash_attn=use_flash_attn,
        )
        self._init_chunking(
            use_dynamic_chunk=use_dynamic_chunk,
            use_dynamic_left_chunk=use_dynamic_left_chunk,
            static_chunk_size=static_chunk_size,
            causal=causal,
            ctc_trim=ctc_trim,
        )
