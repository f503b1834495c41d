"""``encoder: saml_conformer``: ESPnet's conformer with SAML mixtures of LoRA experts.

Every self-attention projection (q, k, v, out by default) of ESPnet's
``ConformerEncoder`` becomes a :class:`~espnet_ext.layers.lora_moe.MoLoRALinear` (base +
E LoRA experts mixed at the parameter level), with one utterance-level router shared by
all blocks and applied to each block's own attention input (SAML, arXiv 2406.19706).
The conformer itself is ESPnet's, untouched; the projections are swapped after
construction by :func:`espnet_ext.adapters.saml.attach_saml`, the same code that
``adapter: saml`` runs on a trained model.

For training from scratch (``freeze_base: false``, default) the base weights train
with everything else; from a trained conformer (``--init_param``: the base keys are
ESPnet's own, ``encoder.encoders.<l>.self_attn.linear_q.weight``, so a plain
``conformer`` checkpoint loads) ``freeze_base: true`` trains only experts and router,
and ``quantize: nf4|int8`` stores the frozen encoder's linear weights quantised.
"""

from typing import List, Optional, Union

from espnet2.asr.encoder.conformer_encoder import ConformerEncoder
from typeguard import typechecked

from espnet_ext.adapters.saml import attach_saml

__all__ = ["SAMLConformerEncoder"]


class SAMLConformerEncoder(ConformerEncoder):
    """Conformer encoder with SAML mixture-of-LoRA-expert attention projections.

    Args: every ``ConformerEncoder`` argument, with the same meaning, plus
        num_experts: LoRA experts per projection (paper: 10).
        lora_rank: rank r of each expert (paper: 4).
        lora_alpha: LoRA scale numerator, scaling = alpha / r (paper: 64).
        lora_dropout_rate: dropout on the LoRA input (SAML's code: 0.2).
        router_temperature: router softmax temperature (paper: 1.0).
        router_kernel_size: router Conv1d kernel over time (SAML: 3).
        saml_targets: projections to adapt, of ``q``, ``k``, ``v``, ``out``.
        lora_mixing: ``parameter`` (SAML: weighted sums of A's and of B's) or
            ``output`` (weighted sum of the experts' outputs).
        freeze_base: train only experts and router (init from a trained model).
        quantize: ``none``, ``nf4`` or ``int8`` storage of the frozen encoder's
            linear weights (needs ``freeze_base: true``).
        quantize_block_size: values per quantisation block (64).

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
        num_experts: int = 10,
        lora_rank: int = 4,
        lora_alpha: float = 64.0,
        lora_dropout_rate: float = 0.2,
        router_temperature: float = 1.0,
        router_kernel_size: int = 3,
        saml_targets: List[str] = ["q", "k", "v", "out"],
        lora_mixing: str = "parameter",
        freeze_base: bool = False,
        quantize: str = "none",
        quantize_block_size: int = 64,
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
        attach_saml(
            self,
            num_experts=num_experts,
            rank=lora_rank,
            alpha=lora_alpha,
            dropout_rate=lora_dropout_rate,
            temperature=router_temperature,
            target_modules=saml_targets,
            mixing=lora_mixing,
            router_kernel_size=router_kernel_size,
            quantize=quantize,
            quantize_block_size=quantize_block_size,
            freeze_base=freeze_base,
        )
