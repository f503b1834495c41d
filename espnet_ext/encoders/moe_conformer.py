"""``encoder: moe_conformer``: ESPnet's conformer with mixture-of-experts FFNs.

U2++ MoE (arXiv 2404.16407) replaces every feed-forward module of the conformer (both
macaron halves) by a sparse top-k mixture of experts with a bias-free router and no
auxiliary loss: several times the parameters at the compute of the dense model.

The skeleton is ESPnet's ``ConformerEncoder`` untouched (same YAML keys, same
subsampling, attention, convolution and masks); only the FFN modules of its layers are
swapped after construction, which ESPnet's ``EncoderLayer`` allows because it calls
``self.feed_forward(x)`` / ``self.feed_forward_macaron(x)``.
"""

from typing import List, Optional, Tuple, Union

import torch
from espnet2.asr.ctc import CTC
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder
from typeguard import typechecked

from espnet_ext.encoders.u2_common import ChunkEncoderMixin
from espnet_ext.layers.aux_loss import clear_aux
from espnet_ext.layers.moe import install_moe_ffns, moe_ffn_factory

__all__ = ["MoEConformerEncoder"]


class MoEConformerEncoder(ChunkEncoderMixin, ConformerEncoder):
    """Conformer encoder whose FFNs are sparse top-k mixtures of experts.

    Args: every ``ConformerEncoder`` argument, with the same meaning, plus
        num_experts: experts per MoE layer (paper: 8).
        top_k: experts per token (paper: 2); with 1, a token is weighted by the
            full softmax probability of its expert (Switch Transformer).
        expert_units: hidden size of each expert; ``None`` = ``linear_units``
            (paper: each expert is the size of the dense FFN).
        moe_impl: dispatch implementation, ``"sorted"`` (fast) or ``"reference"``
            (plain loop); see :data:`espnet_ext.layers.moe.DISPATCH`. Same results.
        moe_balance_weight: default weight of the ``enc_moe_balance`` aux loss
            (paper: 0, none). Needs ``model: espnet_ext`` to be trained on.
        moe_z_weight: default weight of the router ``enc_moe_z`` loss (0).
        dense_block_idx: 1-based indices of blocks that keep ESPnet's dense FFNs
            (as ESPnet's ``interctc_layer_idx``); empty = every block is MoE.
        use_dynamic_chunk, use_dynamic_left_chunk, static_chunk_size, causal: the
            U2++ chunk options of :class:`~espnet_ext.encoders.u2_conformer.
            U2ConformerEncoder` (all off by default: the plain full-context encoder).

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
        num_experts: int = 8,
        top_k: int = 2,
        expert_units: Optional[int] = None,
        moe_impl: str = "sorted",
        moe_balance_weight: float = 0.0,
        moe_z_weight: float = 0.0,
        dense_block_idx: List[int] = [],
        use_dynamic_chunk: bool = False,
        use_dynamic_left_chunk: bool = False,
        static_chunk_size: int = 0,
        causal: bool = False,
    ):
        if positionwise_layer_type != "linear":
            raise ValueError(
                "moe_conformer: positionwise_layer_type must be 'linear' (experts are "
                f"linear FFNs), got {positionwise_layer_type!r}"
            )
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

        make_moe = moe_ffn_factory(
            idim=output_size,
            linear_units=linear_units,
            expert_units=expert_units,
            num_experts=num_experts,
            top_k=top_k,
            dropout_rate=dropout_rate,
            activation_type=activation_type,
            moe_impl=moe_impl,
            moe_balance_weight=moe_balance_weight,
            moe_z_weight=moe_z_weight,
            aux_prefix="enc_",
        )
        # EncoderLayer.forward(x_input, mask (B, 1, T), cache=None)
        install_moe_ffns(self.encoders, make_moe, dense_block_idx, "mask")
        # After the MoE hooks: their pre-hook must see the (B, 1, T) padding mask
        # before the chunk-mask hook replaces it (hooks run in registration order).
        self._init_chunking(
            use_dynamic_chunk=use_dynamic_chunk,
            use_dynamic_left_chunk=use_dynamic_left_chunk,
            static_chunk_size=static_chunk_size,
            causal=causal,
            ctc_trim=ctc_trim,
        )

    def forward(
        self,
        xs_pad: torch.Tensor,
        ilens: torch.Tensor,
        prev_states: torch.Tensor = None,
        masks: torch.Tensor = None,
        ctc: CTC = None,
        return_all_hs: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        clear_aux(self, owner="encoder 'moe_conformer'")
        return super().forward(
            xs_pad,
            ilens,
            prev_states,
            masks=masks,
            ctc=ctc,
            return_all_hs=return_all_hs,
        )
