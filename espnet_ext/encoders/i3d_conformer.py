"""``encoder: i3d_conformer``: ESPnet's conformer with input-dependent dynamic depth.

I3D (Peng, Lee, Watanabe, ICASSP 2023, arXiv 2303.07624) applied to the conformer:
each block's self-attention, convolution and feed-forward modules (both macaron
halves, one gate each) sit behind a binary gate decided per utterance; a closed
module is not computed and the residual passes unchanged. The skeleton is ESPnet's
``ConformerEncoder`` untouched; see :mod:`espnet_ext.encoders.i3d_common`.
"""

from typing import List, Optional, Union

from espnet2.asr.encoder.conformer_encoder import ConformerEncoder
from typeguard import typechecked

from espnet_ext.encoders.i3d_common import I3DGatingMixin, check_residual_form

__all__ = ["I3DConformerEncoder"]


class I3DConformerEncoder(I3DGatingMixin, ConformerEncoder):
    """Conformer encoder whose modules are skipped per utterance by learned gates.

    Args: every ``ConformerEncoder`` argument, with the same meaning
        (``normalize_before`` must be true and ``concat_after`` false: only then
        does a closed module leave the residual stream unchanged), plus
        gate_type: ``"local"`` (each block predicts its own gates from its input,
            mean-pooled over valid frames) or ``"global"`` (one predictor reads
            the subsampled encoder input once and predicts every gate).
        gate_threshold: inference decision, a module runs when P(open) >= it;
            in (0, 1). Changeable after training (:meth:`set_gate_threshold`, or
            ``encoder_conf.gate_threshold`` of the config used for decoding).
        gate_cost_weight: default weight of the ``enc_i3d_depth`` aux loss
            (``model: espnet_ext``; ``model_conf.aux_loss_weights`` overrides it).
        gate_target_fraction: ``None``: the cost is the expected fraction of
            executed modules (mean gate probability); a value in (0, 1]: the cost
            is (expected fraction - target)^2 over the batch.
        gate_tau_init, gate_tau_min, gate_tau_decay: Gumbel-sigmoid temperature
            ``max(min, init * exp(-decay * step))``, step = training forwards
            (saved in the ``gate_step`` buffer, so it survives a resume).
        gate_hidden_units: hidden size of each gate predictor MLP (0: linear).
        gate_init_bias: initial bias of the predictors' output (2.0: 88% open).

    Shapes: ``forward(xs_pad (B, T, input_size), ilens (B,))`` ->
    ``(B, T', output_size), (B,), None`` exactly as ``ConformerEncoder``.
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
        check_residual_form("i3d_conformer", normalize_before, concat_after)
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
        self._install_gates(
            encoder_name="i3d_conformer",
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
