"""``decoder: saml_transformer``: ESPnet's transformer decoder with SAML experts.

The decoder's self-attention and source-attention projections become mixtures of LoRA
experts with two shared routers, one per attention type (self: reads the decoder
stream; source: pools the decoder stream and the encoder memory separately, as SAML's
cross-attention router). ESPnet's ``TransformerDecoder`` is untouched otherwise (same
keys, ``batch_score`` decoding; in cached decoding the self-attention router reads the
whole prefix, as in training). The matching decoder of ``encoder: saml_conformer``.
"""

from typing import List

from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
from espnet.nets.pytorch_backend.transformer.embedding import PositionalEncoding
from typeguard import typechecked

from espnet_ext.adapters.saml import attach_saml

__all__ = ["SAMLTransformerDecoder"]


class SAMLTransformerDecoder(TransformerDecoder):
    """Transformer decoder with SAML mixture-of-LoRA-expert attention projections.

    Args: every ``TransformerDecoder`` argument, plus the SAML keys of
    :class:`~espnet_ext.encoders.saml_conformer.SAMLConformerEncoder`
    (``num_experts``, ``lora_rank``, ``lora_alpha``, ``lora_dropout_rate``,
    ``router_temperature``, ``router_kernel_size``, ``saml_targets``,
    ``lora_mixing``, ``freeze_base``, ``quantize``, ``quantize_block_size``).
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
        pos_enc_class=PositionalEncoding,
        normalize_before: bool = True,
        concat_after: bool = False,
        layer_drop_rate: float = 0.0,
        qk_norm: bool = False,
        use_flash_attn: bool = True,
        gradient_checkpoint_layers: List[int] = [],
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
            pos_enc_class=pos_enc_class,
            normalize_before=normalize_before,
            concat_after=concat_after,
            layer_drop_rate=layer_drop_rate,
            qk_norm=qk_norm,
            use_flash_attn=use_flash_attn,
            gradient_checkpoint_layers=gradient_checkpoint_layers,
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
