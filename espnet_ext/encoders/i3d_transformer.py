"""``encoder: i3d_transformer``: ESPnet's transformer with input-dependent dynamic
depth.

I3D (Peng, Lee, Watanabe, ICASSP 2023, arXiv 2303.07624): each block's
self-attention and feed-forward modules sit behind a binary gate decided per
utterance; a closed module is not computed and the residual passes unchanged. The
skeleton is ESPnet's ``TransformerEncoder`` untouched; see
:mod:`espnet_ext.encoders.i3d_common`.
"""

from typing import List, Optional

from espnet2.asr.encoder.transformer_encoder import TransformerEncoder
from espnet.nets.pytorch_backend.transformer.embedding import PositionalEncoding
from typeguard import typechecked

from espnet_ext.encoders.i3d_common import I3DGatingMixin, check_residual_form

__all__ = ["I3DTransformerEncoder"]


class I3DTransformerEncoder(I3DGatingMixin, TransformerEncoder):
    """Transformer encoder whose modules are skipped per utterance by learned gates.

    Args: every ``TransformerEncoder`` argument, with the same meaning
        (``normalize_before`` must be true and ``concat_after`` false), plus the
        I3D options of :class:`espnet_ext.encoders.i3d_conformer.I3DConformerEncoder`
        (``gate_type``, ``gate_threshold``, ``gate_cost_weight``,
        ``gate_target_fraction``, ``gate_tau_init``, ``gate_tau_min``,
        ``gate_tau_decay``, ``gate_hidden_units``, ``gate_init_bias``).

    Shapes: ``forward(xs_pad (B, T, input_size), ilens (B,))`` ->
    ``(B, T', output_size), (B,), None`` exactly as ``TransformerEncoder``.
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
        pos_enc_class=PositionalEncoding,
        pos_enc_layer_type="abs_pos",
        normalize_before: bool = True,
        concat_after: bool = False,
        positionwise_layer_type: str = "linear",
        positionwise_conv_kernel_size: int = 1,
        padding_idx: int = -1,
        interctc_layer_idx: List[int] = [],
        interctc_use_conditioning: bool = False,
        layer_drop_rate: float = 0.0,
        qk_norm: bool = False,
        use_flash_attn: bool = True,
        gate_type: str = "local",
        gate_threshold: float = 0.5,
        gate_cost_weight: float = 1.0,
        gate_target_fraction: Optional[float] = None,
        gate_tau_init: float = 1.0,
        gate_tau_min: float = 0.5,
        gate_tau_decay: float = 1.0e-4,
        gate_hidden_units: int = 64,
        gate_init_bias: float = 2.0,
    ):
        check_residual_form("i3d_transformer", normalize_before, concat_after)
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
            pos_enc_class=pos_enc_class,
            pos_enc_layer_type=pos_enc_layer_type,
            normalize_before=normalize_before,
            concat_after=concat_after,
            positionwise_layer_type=positionwise_layer_type,
            positionwise_conv_kernel_size=positionwise_conv_kernel_size,
            padding_idx=padding_idx,
            interctc_layer_idx=interctc_layer_idx,
            interctc_use_conditioning=interctc_use_conditioning,
            layer_drop_rate=layer_drop_rate,
            qk_norm=qk_norm,
            use_flash_attn=use_flash_attn,
        )
        self._install_gates(
            encoder_name="i3d_transformer",
            gate_type=gate_type,
            gate_threshold=gate_threshold,
            gate_cost_weight=gate_cost_weight,
            gate_target_fraction=gate_target_fraction,
            gate_tau_init=gate_tau_init,
            gate_tau_min=gate_tau_min,
            gate_tau_decay=gate_tau_decay,
            gate_hidden_units=gate_hidden_units,
            gate_init_bias=gate_init_bias,
        )
