"""U2++'s right-to-left attention loss for ``model: espnet_ext``.

With a bidirectional decoder (``decoder: bitransformer`` / ``moe_bitransformer``) the
attention loss becomes

    loss_att = (1 - reverse_weight) * loss_l2r + reverse_weight * loss_r2l

(U2++, arXiv 2106.05642; WeNet's ``reverse_weight``), where ``loss_r2l`` is the
right-to-left decoder's label-smoothed cross entropy on the reversed targets (ESPnet's
``criterion_att``, so ``lsm_weight`` and ``length_normalized_loss`` apply alike). The
total is ESPnet's: ``ctc_weight * loss_ctc + (1 - ctc_weight) * loss_att``.
``loss_att_l2r``, ``loss_att_r2l`` and ``acc_r2l`` are logged as their own entries.
With ``reverse_weight: 0`` (default) the loss is ESPnet's exactly; the right-to-left
loss is still computed and logged, and its decoder gets zero gradients (so DDP needs
no ``unused_parameters``).
"""

from typing import Optional

import torch
from espnet.nets.pytorch_backend.nets_utils import th_accuracy
from espnet.nets.pytorch_backend.transformer.add_sos_eos import add_sos_eos

from espnet_ext.decoders.bitransformer import reverse_padded
from espnet_ext.layers.aux_loss import AuxRecorder

__all__ = ["BidirectionalAttLossMixin", "check_reverse_weight"]


def check_reverse_weight(reverse_weight: float) -> float:
    if not 0.0 <= reverse_weight <= 1.0:
        raise ValueError(
            f"model_conf.reverse_weight must be in [0, 1], got {reverse_weight}"
        )
    return float(reverse_weight)


class BidirectionalAttLossMixin(AuxRecorder):
    """Adds the right-to-left decoder's loss to ``ESPnetASRModel._calc_att_loss``.

    Goes before ``ESPnetASRModel`` in the model's bases; the model sets
    ``self.reverse_weight`` (:func:`check_reverse_weight`). The extra log entries are
    recorded as aux statistics, which ``model: espnet_ext`` logs.
    """

    reverse_weight: float = 0.0

    def _calc_att_loss(
        self,
        encoder_out: torch.Tensor,
        encoder_out_lens: torch.Tensor,
        ys_pad: torch.Tensor,
        ys_pad_lens: torch.Tensor,
    ):
        decoder = self.decoder
        if not getattr(decoder, "bidirectional", False):
            if self.reverse_weight > 0.0:
                raise ValueError(
                    f"model_conf.reverse_weight={self.reverse_weight} needs a "
                    f"bidirectional decoder (decoder: bitransformer or "
                    f"moe_bitransformer), got {type(decoder).__name__}"
                )
            return super()._calc_att_loss(
                encoder_out, encoder_out_lens, ys_pad, ys_pad_lens
            )
        # ESPnet's version increments ys_pad_lens in place with a language token;
        # the right-to-left targets use the text tokens only.
        r_ys_pad = reverse_padded(ys_pad, ys_pad_lens, self.ignore_id)
        r_lens = ys_pad_lens.clone()
        # Left to right first: an MoE decoder's forward clears the aux records of
        # the whole decoder (the right-to-left one's included).
        loss_l2r, acc_att, cer_att, wer_att = super()._calc_att_loss(
            encoder_out, encoder_out_lens, ys_pad, ys_pad_lens
        )
        loss_r2l, acc_r2l = self._calc_r2l_loss(
            encoder_out, encoder_out_lens, r_ys_pad, r_lens
        )
        w = self.reverse_weight
        loss_att = (1.0 - w) * loss_l2r + w * loss_r2l if w > 0.0 else loss_l2r
        if w == 0.0:
            # Keep the right-to-left decoder in the graph (zero gradients) so that
            # DDP does not need find_unused_parameters.
            loss_att = loss_att + 0.0 * loss_r2l
        self.record_aux_stat("loss_att_l2r", loss_l2r)
        self.record_aux_stat("loss_att_r2l", loss_r2l)
        if acc_r2l is not None:
            self.record_aux_stat("acc_r2l", torch.as_tensor(acc_r2l, dtype=torch.float))
        return loss_att, acc_att, cer_att, wer_att

    def _calc_r2l_loss(
        self,
        encoder_out: torch.Tensor,
        encoder_out_lens: torch.Tensor,
        r_ys_pad: torch.Tensor,
        r_lens: torch.Tensor,
    ):
        """Cross entropy of the right-to-left decoder on reversed targets."""
        r_ys_in_pad, r_ys_out_pad = add_sos_eos(
            r_ys_pad, self.sos, self.eos, self.ignore_id
        )
        r_out, _ = self.decoder.forward_r2l(
            encoder_out, encoder_out_lens, r_ys_in_pad, r_lens + 1
        )
        loss = self.criterion_att(r_out, r_ys_out_pad)
        acc: Optional[float] = th_accuracy(
            r_out.view(-1, self.vocab_size), r_ys_out_pad, ignore_label=self.ignore_id
        )
        return loss, acc
