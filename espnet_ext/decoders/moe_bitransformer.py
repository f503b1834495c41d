"""``decoder: moe_bitransformer``: U2++ MoE's bidirectional decoder with MoE FFNs.

U2++ MoE (arXiv 2404.16407) replaces every FFN of the U2++ model by a mixture of
experts, those of both attention decoders included. This is
:class:`~espnet_ext.decoders.moe_transformer.MoETransformerDecoder` (left to right,
ESPnet's beam-search interface) holding a second ``MoETransformerDecoder`` for the
right-to-left direction (``r2l_decoder``), as
:class:`~espnet_ext.decoders.bitransformer.BiTransformerDecoder` does for the dense one.
"""

from typing import List, Optional

from typeguard import typechecked

from espnet_ext.decoders.bitransformer import (
    BidirectionalDecoderMixin,
    check_r_num_blocks,
)
from espnet_ext.decoders.moe_transformer import MoETransformerDecoder

__all__ = ["MoEBiTransformerDecoder"]


class MoEBiTransformerDecoder(BidirectionalDecoderMixin, MoETransformerDecoder):
    """MoE transformer decoder (left to right) plus a right-to-left MoE twin.

    Args: every ``MoETransformerDecoder`` argument (they build both directions),
    plus ``r_num_blocks``: blocks of the right-to-left decoder (``None`` =
    ``num_blocks``).

    Aux losses: both directions report under the same names (``dec_moe_balance``,
    ``dec_moe_z``, ...), averaged over all their MoE layers. The left-to-right
    ``forward`` clears the records of the whole decoder, the right-to-left one's
    included, so the model runs it first (as ``_calc_att_loss`` does).
    """

    @typechecked
    def __init__(
        self,
        vocab_size: int,
        encoder_output_size: int,
        attention_heads: int = 4,
        linear_units: int = 2048,
        num_blocks: int = 6,
        dropout_rate: float = 0.1,
        positional_dropout_rate: float = 0.1,
        self_attention_dropout_rate: float = 0.0,
        src_attention_dropout_rate: float = 0.0,
        input_layer: str = "embed",
        use_output_layer: bool = True,
        normalize_before: bool = True,
        concat_after: bool = False,
        layer_drop_rate: float = 0.0,
        qk_norm: bool = False,
        use_flash_attn: bool = True,
        gradient_checkpoint_layers: List[int] = [],
        num_experts: int = 8,
        top_k: int = 2,
        expert_units: Optional[int] = None,
        activation_type: str = "relu",
        moe_impl: str = "sorted",
        moe_balance_weight: float = 0.0,
        moe_z_weight: float = 0.0,
        dense_block_idx: List[int] = [],
        r_num_blocks: Optional[int] = None,
    ):
        kwargs = dict(
            vocab_size=vocab_size,
            encoder_output_size=encoder_output_size,
            attention_heads=attention_heads,
            linear_units=linear_units,
            dropout_rate=dropout_rate,
            positional_dropout_rate=positional_dropout_rate,
            self_attention_dropout_rate=self_attention_dropout_rate,
            src_attention_dropout_rate=src_attention_dropout_rate,
            input_layer=input_layer,
            use_output_layer=use_output_layer,
            normalize_before=normalize_before,
            concat_after=concat_after,
            layer_drop_rate=layer_drop_rate,
            qk_norm=qk_norm,
            use_flash_attn=use_flash_attn,
            gradient_checkpoint_layers=gradient_checkpoint_layers,
            num_experts=num_experts,
            top_k=top_k,
            expert_units=expert_units,
            activation_type=activation_type,
            moe_impl=moe_impl,
            moe_balance_weight=moe_balance_weight,
            moe_z_weight=moe_z_weight,
            dense_block_idx=dense_block_idx,
        )
        r_num_blocks = check_r_num_blocks(r_num_blocks, num_blocks)
        super().__init__(num_blocks=num_blocks, **kwargs)
        self.r2l_decoder = MoETransformerDecoder(num_blocks=r_num_blocks, **kwargs)
