"""``model: espnet_ext``: ESPnet's CTC/attention model plus auxiliary losses.

Any module of the model may report auxiliary losses and statistics during forward
(:mod:`espnet_ext.layers.aux_loss`): MoE balance and router z-losses, gate costs, later
distillation and right-to-left decoder losses. This model adds
``weight * loss`` for each to ESPnet's loss and logs every loss and statistic as its
own entry in the training stats (``loss_<name>`` and ``<name>``). With no reporting
module it is ESPnetASRModel exactly: same loss, same stats.
"""

from typing import Dict, List, Optional, Tuple, Union

import torch
from espnet2.asr.ctc import CTC
from espnet2.asr.decoder.abs_decoder import AbsDecoder
from espnet2.asr.encoder.abs_encoder import AbsEncoder
from espnet2.asr.espnet_model import ESPnetASRModel
from espnet2.asr.frontend.abs_frontend import AbsFrontend
from espnet2.asr.postencoder.abs_postencoder import AbsPostEncoder
from espnet2.asr.preencoder.abs_preencoder import AbsPreEncoder
from espnet2.asr.specaug.abs_specaug import AbsSpecAug
from espnet2.layers.abs_normalize import AbsNormalize
from espnet2.torch_utils.device_funcs import force_gatherable
from typeguard import typechecked

from espnet_ext.layers.aux_loss import clear_aux, collect_aux
from espnet_ext.models.bidirectional import (
    BidirectionalAttLossMixin,
    check_reverse_weight,
)
from espnet_ext.models.distill import Distiller

__all__ = ["ESPnetExtASRModel"]


class ESPnetExtASRModel(BidirectionalAttLossMixin, ESPnetASRModel):
    """ESPnetASRModel whose loss includes the aux losses its modules report.

    Args (beyond ESPnetASRModel's, all in ``model_conf``):
        aux_loss_weights: ``{aux loss name: weight}``; overrides the default weight
            the reporting module declares (e.g. ``encoder_conf.moe_balance_weight``).
            A name that no module reports is an error at the first training step.
        distill: knowledge distillation from a trained ESPnet ASR model, ``None``
            (default) for none; keys in :class:`espnet_ext.models.distill.Distiller`.
            Its losses ``kd_ctc``, ``kd_dec``, ``kd_hidden`` are aux losses.
        reverse_weight: U2++ right-to-left decoder weight, ``loss_att = (1 - w) *
            l2r + w * r2l`` with a bidirectional decoder (0 = ESPnet's loss);
            see :mod:`espnet_ext.models.bidirectional`.
    """

    @typechecked
    def __init__(
        self,
        vocab_size: int,
        token_list: Union[Tuple[str, ...], List[str]],
        frontend: Optional[AbsFrontend],
        specaug: Optional[AbsSpecAug],
        normalize: Optional[AbsNormalize],
        preencoder: Optional[AbsPreEncoder],
        encoder: Optional[AbsEncoder],
        postencoder: Optional[AbsPostEncoder],
        decoder: Optional[AbsDecoder],
        ctc: CTC,
        joint_network: Optional[torch.nn.Module],
        aux_ctc: Optional[dict] = None,
        ctc_weight: float = 0.5,
        interctc_weight: float = 0.0,
        ignore_id: int = -1,
        lsm_weight: float = 0.0,
        length_normalized_loss: bool = False,
        report_cer: bool = True,
        report_wer: bool = True,
        sym_space: str = "<space>",
        sym_blank: str = "<blank>",
        transducer_multi_blank_durations: List = [],
        transducer_multi_blank_sigma: float = 0.05,
        sym_sos: str = "<sos/eos>",
        sym_eos: str = "<sos/eos>",
        autocast_frontend: bool = False,
        extract_feats_in_collect_stats: bool = True,
        lang_token_id: int = -1,
        aux_loss_weights: Optional[Dict[str, float]] = None,
        distill: Optional[Dict] = None,
        reverse_weight: float = 0.0,
    ):
        super().__init__(
            vocab_size=vocab_size,
            token_list=token_list,
            frontend=frontend,
            specaug=specaug,
            normalize=normalize,
            preencoder=preencoder,
            encoder=encoder,
            postencoder=postencoder,
            decoder=decoder,
            ctc=ctc,
            joint_network=joint_network,
            aux_ctc=aux_ctc,
            ctc_weight=ctc_weight,
            interctc_weight=interctc_weight,
            ignore_id=ignore_id,
            lsm_weight=lsm_weight,
            length_normalized_loss=length_normalized_loss,
            report_cer=report_cer,
            report_wer=report_wer,
            sym_space=sym_space,
            sym_blank=sym_blank,
            transducer_multi_blank_durations=transducer_multi_blank_durations,
            transducer_multi_blank_sigma=transducer_multi_blank_sigma,
            sym_sos=sym_sos,
            sym_eos=sym_eos,
            autocast_frontend=autocast_frontend,
            extract_feats_in_collect_stats=extract_feats_in_collect_stats,
            lang_token_id=lang_token_id,
        )
        self.aux_loss_weights = dict(aux_loss_weights or {})
        for name, w in self.aux_loss_weights.items():
            if w < 0:
                raise ValueError(
                    f"model_conf.aux_loss_weights[{name!r}] must be >= 0, got {w}"
                )
        self._aux_names_checked = False
        # Knowledge distillation (espnet_ext.models.distill); the teacher is never a
        # sub-module, only the student-side projection (if any) is.
        self.distill = None
        if distill is not None:
            self.distill = Distiller(
                distill,
                token_list=token_list,
                student_hidden_size=(
                    postencoder if postencoder is not None else encoder
                ).output_size(),
                decoder=decoder,
            )
        # U2++ right-to-left decoder loss weight (espnet_ext.models.bidirectional)
        self.reverse_weight = check_reverse_weight(reverse_weight)

    def forward(
        self,
        speech: torch.Tensor,
        speech_lengths: torch.Tensor,
        text: torch.Tensor,
        text_lengths: torch.Tensor,
        **kwargs,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor]:
        """ESPnetASRModel.forward, plus the weighted aux losses in ``loss``.

        Returns:
            loss (1,), stats {name: (1,)}, weight (1,) as ESPnetASRModel.
        """
        clear_aux(self)
        if self.distill is not None:
            self.distill.begin(self)
        loss, stats, weight = super().forward(
            speech, speech_lengths, text, text_lengths, **kwargs
        )
        if self.distill is not None:
            self.distill.record(self, speech, speech_lengths)
        aux = collect_aux(self)
        self._check_aux_names(aux.losses)
        if not aux.losses and not aux.stats:
            return loss, stats, weight
        extra: Dict[str, torch.Tensor] = {}
        for name, value in aux.losses.items():
            w = self.aux_loss_weights.get(name, aux.weights[name])
            if w != 0.0:
                loss = loss + w * value.to(loss.dtype)
            extra[f"loss_{name}"] = value.detach()
        extra.update(aux.stats)
        extra["loss"] = loss.detach().reshape(())
        stats.update(force_gatherable(extra, loss.device))
        return loss, stats, weight

    def encode(
        self, speech: torch.Tensor, speech_lengths: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """ESPnetASRModel.encode; distillation keeps the training forward's output."""
        encoder_out, encoder_out_lens = super().encode(speech, speech_lengths)
        if self.distill is not None:
            self.distill.observe_encoder(self, encoder_out, encoder_out_lens)
        return encoder_out, encoder_out_lens

    def _check_aux_names(self, reported: Dict[str, torch.Tensor]) -> None:
        """A weight configured for a loss nobody reports is a typo: fail, once."""
        if self._aux_names_checked or not self.training:
            return
        unknown = sorted(set(self.aux_loss_weights) - set(reported))
        if unknown:
            raise ValueError(
                f"model_conf.aux_loss_weights has {unknown}, which no module of this "
                f"model reports; reported aux losses: {sorted(reported) or 'none'}"
            )
        self._aux_names_checked = True
