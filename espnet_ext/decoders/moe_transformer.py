"""``decoder: moe_transformer``: ESPnet's transformer decoder with MoE FFNs (U2++ MoE).

U2++ MoE replaces *all* FFNs, the decoder's included. The skeleton is ESPnet's
``TransformerDecoder`` (same YAML keys, same ``forward_one_step``/``batch_score``),
so ESPnet's ``BatchBeamSearch`` decodes with it unchanged; only each
``DecoderLayer.feed_forward`` is swapped for a :class:`MoEFeedForward`.
"""

from typing import List, Optional, Tuple

import torch
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
from typeguard import typechecked

from espnet_ext.layers.aux_loss import clear_aux
from espnet_ext.layers.moe import install_moe_ffns, moe_ffn_factory

__all__ = ["MoETransformerDecoder"]


class MoETransformerDecoder(TransformerDecoder):
    """Transformer decoder whose FFNs are sparse top-k mixtures of experts.

    Args: every ``TransformerDecoder`` YAML argument, plus the MoE options of
    :class:`espnet_ext.encoders.moe_conformer.MoEConformerEncoder` (``num_experts``,
    ``top_k``, ``expert_units``, ``moe_impl``, ``moe_balance_weight``,
    ``moe_z_weight``, ``dense_block_idx``) and ``activation_type`` of the experts
    (ESPnet's decoder FFN uses ReLU).

    Shapes: as ``TransformerDecoder``: ``forward(hs_pad (B, T, D), hlens (B,),
    ys_in_pad (B, L), ys_in_lens (B,))`` -> ``(B, L, V), (B,)``.
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
    ):
        super().__init__(
            vocab_size=vocab_size,
            encoder_output_size=encoder_output_size,
            attention_heads=attention_heads,
            linear_units=linear_units,
            num_blocks=num_blocks,
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
        )

        make_moe = moe_ffn_factory(
            idim=encoder_output_size,
            linear_units=linear_units,
            expert_units=expert_units,
            num_experts=num_experts,
            top_k=top_k,
            dropout_rate=dropout_rate,
            activation_type=activation_type,
            moe_impl=moe_impl,
            moe_balance_weight=moe_balance_weight,
            moe_z_weight=moe_z_weight,
            aux_prefix="dec_",
        )
        # DecoderLayer.forward(tgt, tgt_mask (B, L, L), memory, memory_mask, ...)
        install_moe_ffns(
            self.decoders, make_moe, dense_block_idx, "tgt_mask", ("feed_forward",)
        )

    def forward(
        self,
        hs_pad: torch.Tensor,
        hlens: torch.Tensor,
        ys_in_pad: torch.Tensor,
        ys_in_lens: torch.Tensor,
        return_hs: bool = False,
        return_all_hs: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        clear_aux(self, owner="decoder 'moe_transformer'")
        return super().forward(
            hs_pad,
            hlens,
            ys_in_pad,
            ys_in_lens,
            return_hs=return_hs,
            return_all_hs=return_all_hs,
        )
