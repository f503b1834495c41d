"""``encoder: residual_conformer``: ESPnet's conformer with residual-shared weights.

ResidualTransformer (Wang & Li, ICASSP 2024, arXiv 2310.02489): every chosen weight
matrix of block ``l`` is ``W_shared(group of l) + A_l B_l + diag(d_l)``, the shared
full-rank part used by K adjacent blocks, a rank-r part and a diagonal per block
(:mod:`espnet_ext.layers.residual_linear`). About 3x smaller encoder for a slight loss.

The skeleton is ESPnet's ``ConformerEncoder`` untouched (same YAML keys, subsampling,
attention, convolution, masks, inter-CTC and ``return_all_hs``); only the chosen leaf
modules of its blocks are swapped after construction (see
:mod:`espnet_ext.encoders.residual_common`).
"""

from typing import List, Optional, Tuple, Union

import torch
from espnet2.asr.ctc import CTC
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder
from typeguard import typechecked

from espnet_ext.encoders.residual_common import ResidualSharingMixin

__all__ = ["ResidualConformerEncoder"]


class ResidualConformerEncoder(ResidualSharingMixin, ConformerEncoder):
    """Conformer encoder whose blocks share full-rank weights in groups of K.

    Args: every ``ConformerEncoder`` argument, with the same meaning, plus
        share_group_size: K, adjacent blocks per shared weight (1 = no sharing).
        share_remainder: when ``num_blocks`` is not a multiple of K: ``"error"``
            (default), ``"last_smaller"`` (the last num_blocks % K blocks form a
            smaller group) or ``"merge_last"`` (they join the previous group).
        lowrank_rank: r of each block's ``A_l B_l``; ``0 <= r < min(in, out)`` of
            every chosen matrix (0: sharing plus diagonal only).
        use_diagonal: learn ``diag(d_l)`` per block (for non-square matrices, on the
            leading min(in, out) diagonal entries).
        residual_targets: the matrices to reparameterise, from ``attn_q``,
            ``attn_k``, ``attn_v``, ``attn_out``, ``attn_pos`` (rel-pos projection),
            ``ffn_in``, ``ffn_out`` (both macaron FFNs, each its own family),
            ``conv_pw1``, ``conv_pw2`` (pointwise convolutions); ``["all"]``
            (default): every one this encoder has. The others stay dense per block.
        residual_impl: ``"materialized"`` (default), ``"factored"`` or
            ``"reference"``; same results (see
            :data:`espnet_ext.layers.residual_linear.IMPLS`).
        init_from_dense: path of a trained dense ``conformer`` model file of the same
            architecture; applied at the first training forward unless weights were
            loaded into the encoder before (resume, ``--init_param`` of the whole
            model, decoding). See :meth:`load_dense`.

    Shapes: ``forward(xs_pad (B, T, input_size), ilens (B,))`` ->
    ``(B, T', output_size), (B,), None`` exactly as ``ConformerEncoder``.

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
        self._install_residual(
            encoder_name="residual_conformer",
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
