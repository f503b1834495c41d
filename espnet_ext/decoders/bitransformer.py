"""``decoder: bitransformer``: U2++'s left-to-right + right-to-left decoder.

U2++ (arXiv 2106.05642) trains a second attention decoder on the reversed target
sequence; the two decoders share the encoder, and at decoding time both rescore the
CTC n-best (attention rescoring). Here the decoder *is* ESPnet's
``TransformerDecoder`` for the left-to-right direction (same state-dict keys, same
``forward``, ``score`` and ``batch_score``, so ESPnet's beam search decodes with it
unchanged) and holds a second ``TransformerDecoder``, ``r2l_decoder``, run by
:meth:`BidirectionalDecoderMixin.forward_r2l`. The model weighs the two losses with
``model_conf.reverse_weight`` (:mod:`espnet_ext.models.bidirectional`).
"""

from typing import List, Optional, Tuple

import torch
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
from typeguard import typechecked

__all__ = ["BiTransformerDecoder", "BidirectionalDecoderMixin", "reverse_padded"]


def reverse_padded(
    ys_pad: torch.Tensor, ys_lens: torch.Tensor, pad_value: int
) -> torch.Tensor:
    """Reverse each row's first ``ys_lens[b]`` entries; the padding stays at the end.

    Args:
        ys_pad: (B, L) token ids.
        ys_lens: (B,) valid lengths.
        pad_value: value written after each reversed sequence.

    Returns:
        (B, L): row b is ``ys_pad[b, :n][::-1]`` followed by ``pad_value``.
    """
    length = ys_pad.size(1)
    pos = torch.arange(length, device=ys_pad.device).unsqueeze(0)  # (1, L)
    lens = ys_lens.to(ys_pad.device).unsqueeze(1)  # (B, 1)
    index = (lens - 1 - pos).clamp(min=0)  # position n-1-i inside the sequence
    out = torch.gather(ys_pad, 1, index)
    return out.masked_fill(pos >= lens, pad_value)


class BidirectionalDecoderMixin:
    """What a U2++ bidirectional decoder adds: a right-to-left twin.

    The class using it builds ``self.r2l_decoder`` (a decoder of the same kind) in
    its ``__init__``; ``forward`` and the beam-search interface stay left-to-right.
    """

    bidirectional = True

    def forward_r2l(
        self,
        hs_pad: torch.Tensor,
        hlens: torch.Tensor,
        r_ys_in_pad: torch.Tensor,
        r_ys_in_lens: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The right-to-left decoder on reversed targets.

        Args:
            hs_pad: (B, T, D) encoder output; hlens: (B,).
            r_ys_in_pad: (B, L) ``<sos>`` + the reversed tokens (padded with eos).
            r_ys_in_lens: (B,).

        Returns:
            (B, L, V) logits, (B,) lengths, as ``forward``.
        """
        return self.r2l_decoder(hs_pad, hlens, r_ys_in_pad, r_ys_in_lens)


class BiTransformerDecoder(BidirectionalDecoderMixin, TransformerDecoder):
    """ESPnet's transformer decoder (left to right) plus a right-to-left twin.

    Args: every ``TransformerDecoder`` argument, with the same meaning (they build
    both directions), plus
        r_num_blocks: blocks of the right-to-left decoder; ``None`` = ``num_blocks``
            (WeNet's U2++ configs use equal depths).

    Shapes: ``forward(hs_pad (B, T, D), hlens (B,), ys_in_pad (B, L), ys_in_lens
    (B,))`` -> ``(B, L, V), (B,)`` (left to right); ``forward_r2l`` the same for the
    reversed targets. Checkpoint: the left-to-right weights under ESPnet's own keys,
    the other direction under ``r2l_decoder.*``.
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
        )
        r_num_blocks = check_r_num_blocks(r_num_blocks, num_blocks)
        super().__init__(num_blocks=num_blocks, **kwargs)
        self.r2l_decoder = TransformerDecoder(num_blocks=r_num_blocks, **kwargs)


def check_r_num_blocks(r_num_blocks: Optional[int], num_blocks: int) -> int:
    if r_num_blocks is None:
        return num_blocks
    if r_num_blocks < 1:
        raise ValueError(
            f"r_num_blocks must be >= 1 (or null = num_blocks), got {r_num_blocks}"
        )
    return r_num_blocks
