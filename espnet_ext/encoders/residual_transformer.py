"""``encoder: residual_transformer``: ESPnet's transformer encoder, residual-shared.

ResidualTransformer (Wang & Li, ICASSP 2024, arXiv 2310.02489): every chosen weight
matrix of block ``l`` is ``W_shared(group of l) + A_l B_l + diag(d_l)``, the shared
full-rank part used by K adjacent blocks, a rank-r part and a diagonal per block
(:mod:`espnet_ext.layers.residual_linear`). About 3x smaller encoder for a slight loss.

The skeleton is ESPnet's ``TransformerEncoder`` untouched (same YAML keys, subsampling,
attention, masks, inter-CTC and ``return_all_hs``); only the chosen leaf
modules of its blocks are swapped after construction (see
:mod:`espnet_ext.encoders.residual_common`).
"""

from typing import List, Optional, Tuple

import torch
from espnet2.asr.ctc import CTC
from espnet2.asr.encoder.transformer_encoder import TransformerEncoder
from espnet.nets.pytorch_backend.transformer.embedding import PositionalEncoding
from typeguard import typechecked

from espnet_ext.encoders.residual_common import ResidualSharingMixin

__all__ = ["ResidualTransformerEncoder"]


class ResidualTransformerEncoder(ResidualSharingMixin, TransformerEncoder):
    """Transformer encoder whose blocks share full-rank weights in groups of K.

    Args: every ``TransformerEncoder`` argument, with the same meaning, plus
        share_group_size: K, adjacent blocks per shared weight (1 = no sharing).
        share_remainder: when ``num_blocks`` is not a multiple of K: ``"error"``
            (default), ``"last_smaller"`` (the last num_blocks % K blocks form a
            smaller group) or ``"merge_last"`` (they join the previous group).
        lowrank_rank: r of each block's ``A_l B_l``; ``0 <= r < min(in, out)`` of
            every chosen matrix (0: sharing plus diagonal only).
        use_diagonal: learn ``diag(d_l)`` per block (for non-square matrices, on the
            leading min(in, out) diagonal entries).
        residual_targets: the matrices to reparameterise, from ``attn_q``,
            ``attn_k``, ``attn_v``, ``attn_out``, ``ffn_in``, ``ffn_out``;
            ``["all"]`` (default): all six. The others stay dense per block.
        residual_impl: ``"materialized"`` (default), ``"factored"`` or
            ``"reference"``; same results (see
            :data:`espnet_ext.layers.residual_linear.IMPLS`).
        init_from_dense: path of a trained dense ``transformer`` model file of the same
            architecture; applied at the first training forward unless weights were
            loaded into the encoder before (resume, ``--init_param`` of the whole
            model, decoding). See :meth:`load_dense`.

    Shapes: ``forward(xs_pad (B, T, input_size), ilens (B,))`` ->
    ``(B, T', output_size), (B,), None`` exactly as ``TransformerEncoder``.

    In eval mode without gradients every block runs merged dense weights (cached,
    never saved); ``train()`` drops them (training after a merge: undone explicitly).
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
        share_group_size: int = 2,
        share_remainder: str = "error",
        lowrank_rank: int = 16,
        use_diagonal: bool = True,
        residual_targets: List[str] = ["all"],
        residual_impl: str = "materialized",
        init_from_dense: Optional[str] = None,
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
        self._install_residual(
            encoder_name="residual_transformer",
            residual_targets=residual_targets,
            share_group_size=share_group_size,
            share_remainder=share_remainder,
            lowrank_rank=lowrank_rank,
            use_diagonal=use_diagonal,
            residual_impl=residual_impl,
            init_from_dense=init_from_dense,
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
        self._before_forward()
        return super().forward(
            xs_pad,
            ilens,
            prev_states,
            masks=masks,
            ctc=ctc,
            return_all_hs=return_all_hs,
        )
