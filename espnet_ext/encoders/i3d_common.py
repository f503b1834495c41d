"""What ``i3d_conformer`` and ``i3d_transformer`` share: input-dependent dynamic depth.

I3D (Peng, Lee, Watanabe, ICASSP 2023, arXiv 2303.07624): every self-attention and
feed-forward module of the encoder (and here also the conformer's convolution module)
sits behind a binary gate decided per utterance; a closed module is skipped and the
residual stream passes unchanged.

After ESPnet's encoder is built, each of those modules of each block is wrapped in a
:class:`~espnet_ext.layers.gates.GatedModule` (same state-dict keys) and two hooks
decide the gates; no ESPnet layer code is repeated:

- ``gate_type: local``: a forward pre-hook on each block pools the block's input over
  its valid frames and predicts that block's gates (one predictor per block);
- ``gate_type: global``: a forward hook on the input layer (``embed``) pools the
  subsampled encoder input once and predicts every gate of the encoder.

The hooks find this forward's settings in a small context object the encoder's
``forward`` attaches to its own blocks, so ``nn.DataParallel`` replicas (which copy
modules shallowly) each use their own predictor and record their own gates.
"""

import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from espnet_ext.layers.aux_loss import AuxRecorder, clear_aux
from espnet_ext.layers.gates import (
    GatedModule,
    GatePredictor,
    check_gate_options,
    gumbel_sigmoid,
    masked_mean,
)

__all__ = ["GATED_ATTRS", "I3DGatingMixin", "check_residual_form"]

logger = logging.getLogger(__name__)

# ESPnet EncoderLayer attribute -> module kind, in the order the layer runs them.
# The two FFNs of a macaron conformer block have one gate each (both count as FFN
# modules in the statistics): the paper gates "attention and FFN modules" and the
# macaron halves are two residual modules with their own residual add.
GATED_ATTRS: Tuple[Tuple[str, str], ...] = (
    ("feed_forward_macaron", "ffn"),
    ("self_attn", "attn"),
    ("conv_module", "conv"),
    ("feed_forward", "ffn"),
)
KINDS = ("attn", "ffn", "conv")


def check_residual_form(
    encoder_name: str, normalize_before: bool, concat_after: bool
) -> None:
    """A closed module must leave the residual stream unchanged.

    ESPnet's blocks compute ``x = residual + dropout(module(norm(x)))`` with
    ``normalize_before: true``; a gated module returning zeros then passes
    ``residual`` on. With ``normalize_before: false`` the LayerNorm comes after the
    sum (a closed module would still normalise the stream), and with
    ``concat_after: true`` the attention output goes through ``concat_linear``
    together with its input: neither can skip a module, so both are refused.
    """
    if not normalize_before:
        raise ValueError(
            f"{encoder_name}: normalize_before must be true: with post-norm blocks a "
            f"closed module would still apply its LayerNorm to the residual stream"
        )
    if concat_after:
        raise ValueError(
            f"{encoder_name}: concat_after must be false: its concat_linear mixes "
            f"the attention input into the output, so a closed attention could not "
            f"pass the residual unchanged"
        )


class _GateContext:
    """One forward's gating settings and records (plain object, never saved)."""

    def __init__(
        self,
        encoder: "I3DGatingMixin",
        input_mask: Optional[torch.Tensor],
        tau: Optional[torch.Tensor],
    ):
        self.training = encoder.training
        self.gate_type = encoder.gate_type
        self.threshold = float(encoder.gate_threshold)
        self.override = encoder._gate_override  # None or (num_gates,) bool tensor
        self.predictor = encoder.gate_predictor
        self.offsets = encoder._gate_offsets
        self.input_mask = input_mask  # (B, 1, T) before subsampling
        self.tau = tau
        self.global_logits: Optional[torch.Tensor] = None
        self.probs: Dict[int, torch.Tensor] = {}  # layer -> (B, M_l) P(open)
        self.decisions: Dict[int, torch.Tensor] = {}  # layer -> (B, M_l) 0/1

    def gate_layer(
        self,
        index: int,
        layer: torch.nn.Module,
        x: torch.Tensor,
        mask: Optional[torch.Tensor],
    ) -> None:
        """Decide the gates of block ``index`` for this batch and hand them to its
        GatedModules. x: (B, T, D) block input; mask: (B, 1, T)."""
        start, stop = self.offsets[index], self.offsets[index + 1]
        gated = [m for m in layer.children() if isinstance(m, GatedModule)]
        batch = x.size(0)
        if self.override is not None:
            row = self.override[start:stop].to(x.device)  # (M_l,)
            dec = row.to(x.dtype).unsqueeze(0).expand(batch, -1)
            probs = dec
        else:
            if self.gate_type == "local":
                logits = self.predictor[index](masked_mean(x, mask))  # (B, M_l)
            else:
                logits = self.global_logits[:, start:stop]
            probs = torch.sigmoid(logits)
            if self.training:
                dec = gumbel_sigmoid(logits, self.tau)  # straight-through 0/1
            else:
                dec = (probs >= self.threshold).to(probs.dtype)
        if self.training:
            for j, m in enumerate(gated):
                m.set_gate(dec[:, j])
        else:
            # One host sync per block: which rows each module runs on.
            open_cpu = dec.detach().to("cpu", torch.bool)  # (B, M_l)
            for j, m in enumerate(gated):
                idx = open_cpu[:, j].nonzero().squeeze(1).to(x.device)
                m.set_gate(dec[:, j], idx)
        self.probs[index] = probs
        self.decisions[index] = dec

    def gate_all(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        """Global predictor: x (B, T', D) subsampled input, mask (B, 1, T')."""
        if self.override is None and self.gate_type == "global":
            self.global_logits = self.predictor(masked_mean(x, mask))  # (B, G)


class _LayerGateHook:
    """Forward pre-hook of one block (a class, so that ``torch.save(model)`` can
    pickle it)."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, layer, args, kwargs):
        ctx = layer.__dict__.get("_i3d_ctx")
        if ctx is None:
            # Outside our forward (e.g. a checkpointed layer recomputed in the
            # backward pass): keep the decisions the forward made.
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        if isinstance(x, tuple):  # (x, pos_emb) of relative-position blocks
            x = x[0]
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        ctx.gate_layer(self.index, layer, x, mask)
        return None


def _embed_gate_hook(embed, inputs, output):
    """Forward hook of ``embed``: the global predictor reads its output."""
    ctx = embed.__dict__.get("_i3d_ctx")
    if ctx is None:
        return None
    if len(inputs) == 2:  # Conv2dSubsampling*(x, mask) -> (x, mask)
        x, mask = output
    else:  # linear / positional-encoding-only input layers keep T
        x, mask = output, ctx.input_mask
    if isinstance(x, tuple):
        x = x[0]
    ctx.gate_all(x, mask)
    return None


def _resolve_override(
    decisions, slots: List[Tuple[int, str, str]], encoder_name: str
) -> Optional[torch.Tensor]:
    if decisions is None:
        return None
    if isinstance(decisions, str):
        if decisions not in ("open", "closed"):
            raise ValueError(
                f"{encoder_name}: force_gates takes 'open', 'closed', None or one "
                f"bool per gated module, got {decisions!r}"
            )
        return torch.full((len(slots),), decisions == "open", dtype=torch.bool)
    flat = torch.as_tensor(decisions, dtype=torch.bool).flatten()
    if flat.numel() != len(slots):
        raise ValueError(
            f"{encoder_name}: force_gates needs {len(slots)} decisions (one per "
            f"gated module, see gate_slots()), got {flat.numel()}"
        )
    return flat


class I3DGatingMixin(AuxRecorder):
    """Mixed into an ESPnet encoder with ``self.encoders`` (its blocks) and
    ``self.embed`` (its input layer), listed before the ESPnet class.

    State-dict layout: ESPnet's keys unchanged, plus ``gate_predictor.*`` (global:
    one :class:`GatePredictor`; local: ``gate_predictor.<block>.*``) and the buffer
    ``gate_step`` (training forwards seen, drives the temperature schedule and is
    saved, so a resumed run continues the schedule).
    """

    def _install_gates(
        self,
        encoder_name: str,
        gate_type: str,
        gate_threshold: float,
        gate_cost_weight: float,
        gate_target_fraction: Optional[float],
        gate_tau_init: float,
        gate_tau_min: float,
        gate_tau_decay: float,
        gate_hidden_units: int,
        gate_init_bias: float,
    ) -> None:
        check_gate_options(
            encoder_name,
            gate_type,
            gate_threshold,
            gate_target_fraction,
            gate_cost_weight,
            gate_tau_init,
            gate_tau_min,
            gate_tau_decay,
            gate_hidden_units,
        )
        self._i3d_name = encoder_name
        self.gate_type = gate_type
        self.gate_threshold = float(gate_threshold)
        self.gate_cost_weight = float(gate_cost_weight)
        self.gate_target_fraction = gate_target_fraction
        self.gate_tau_init = float(gate_tau_init)
        self.gate_tau_min = float(gate_tau_min)
        self.gate_tau_decay = float(gate_tau_decay)
        self._gate_override: Optional[torch.Tensor] = None

        slots: List[Tuple[int, str, str]] = []
        offsets = [0]
        for index, block in enumerate(self.encoders):
            for attr, kind in GATED_ATTRS:
                module = getattr(block, attr, None)
                if module is None:
                    continue
                setattr(block, attr, GatedModule(module, kind))
                slots.append((index, attr, kind))
            offsets.append(len(slots))
            block.register_forward_pre_hook(_LayerGateHook(index), with_kwargs=True)
        self._gate_slots = slots
        self._gate_offsets = offsets
        d = self.output_size()
        if gate_type == "local":
            self.gate_predictor = torch.nn.ModuleList(
                GatePredictor(
                    d, offsets[i + 1] - offsets[i], gate_hidden_units, gate_init_bias
                )
                for i in range(len(offsets) - 1)
            )
        else:
            self.gate_predictor = GatePredictor(
                d, len(slots), gate_hidden_units, gate_init_bias
            )
            self.embed.register_forward_hook(_embed_gate_hook)
        self.register_buffer("gate_step", torch.zeros((), dtype=torch.long))
        self.last_gates: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.reset_gate_summary()

    # ----- public controls -----------------------------------------------------------
    def gate_slots(self) -> List[Tuple[int, str, str]]:
        """``[(block index, attribute, kind), ...]``, one per gated module, in the
        order of the columns of :attr:`last_gates` and of :meth:`force_gates`."""
        return list(self._gate_slots)

    def set_gate_threshold(self, threshold: float) -> None:
        """Change the inference threshold (no retraining): a module runs when its
        predicted P(open) >= threshold."""
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(
                f"{self._i3d_name}: gate_threshold must be in (0, 1), got "
                f"{threshold!r}"
            )
        self.gate_threshold = float(threshold)

    def force_gates(
        self, decisions: Union[None, str, Sequence[bool], torch.Tensor]
    ) -> None:
        """Override the predictors: ``"open"`` (the plain encoder), ``"closed"``,
        one bool per :meth:`gate_slots` entry (same for every utterance), or
        ``None`` to predict again."""
        self._gate_override = _resolve_override(
            decisions, self._gate_slots, self._i3d_name
        )

    def temperature(self) -> float:
        """The Gumbel-sigmoid temperature of the next training step."""
        return float(self._tau_tensor())

    def reset_gate_summary(self) -> None:
        self._summary = {"utterances": 0, **{k: 0.0 for k in KINDS}}

    def gate_summary(self) -> Dict[str, float]:
        """Mean executed modules per utterance of each kind over every evaluation
        forward since :meth:`reset_gate_summary` (the decoding-log numbers)."""
        n = max(self._summary["utterances"], 1)
        out = {k: self._summary[k] / n for k in KINDS if self._num_of(k)}
        out["utterances"] = self._summary["utterances"]
        return out

    # ----- forward plumbing ----------------------------------------------------------
    def _num_of(self, kind: str) -> int:
        return sum(1 for _, _, k in self._gate_slots if k == kind)

    def _tau_tensor(self) -> torch.Tensor:
        step = self.gate_step.to(torch.float32)
        tau = self.gate_tau_init * torch.exp(-self.gate_tau_decay * step)
        return tau.clamp(min=self.gate_tau_min)

    def forward(
        self,
        xs_pad: torch.Tensor,
        ilens: torch.Tensor,
        prev_states: torch.Tensor = None,
        masks: torch.Tensor = None,
        ctc=None,
        return_all_hs: bool = False,
    ):
        """ESPnet's encoder forward (the next class in the MRO) with the gates live,
        then the depth cost and statistics recorded. Same arguments and outputs."""
        clear_aux(self, owner=f"encoder {self._i3d_name!r}")
        if masks is None:
            input_mask = (
                torch.arange(xs_pad.size(1), device=xs_pad.device)[None, :]
                < ilens.to(xs_pad.device)[:, None]
            ).unsqueeze(1)
        else:
            input_mask = ~masks[:, None, :]
        tau = None
        if self.training and self._gate_override is None:
            tau = self._tau_tensor().to(xs_pad.device)
            with torch.no_grad():
                self.gate_step += 1
        ctx = _GateContext(self, input_mask, tau)
        carriers = [*self.encoders, self.embed]
        for m in carriers:
            m.__dict__["_i3d_ctx"] = ctx
        try:
            out = super().forward(
                xs_pad,
                ilens,
                prev_states,
                masks=masks,
                ctc=ctc,
                return_all_hs=return_all_hs,
            )
        finally:
            for m in carriers:
                m.__dict__.pop("_i3d_ctx", None)
        self._record_gates(ctx, xs_pad.size(0))
        return out

    def _record_gates(self, ctx: _GateContext, batch: int) -> None:
        if not ctx.probs:  # every block skipped (layer drop): nothing was gated
            return
        layers = sorted(ctx.probs)
        cols = [
            c
            for i in layers
            for c in range(self._gate_offsets[i], self._gate_offsets[i + 1])
        ]
        probs = torch.cat([ctx.probs[i] for i in layers], dim=1)  # (B, G')
        dec = torch.cat([ctx.decisions[i] for i in layers], dim=1)  # (B, G')
        num_gates = len(self._gate_slots)
        full_probs = probs.new_zeros(batch, num_gates)
        full_dec = dec.new_zeros(batch, num_gates)
        full_probs[:, cols] = probs.detach().to(full_probs.dtype)
        full_dec[:, cols] = dec.detach()
        self.last_gates = (full_probs, full_dec)
        kinds = [self._gate_slots[c][2] for c in cols]
        executed = {}
        for kind in KINDS:
            sel = [j for j, k in enumerate(kinds) if k == kind]
            if sel:
                # mean over utterances of the executed modules of this kind
                executed[kind] = dec.detach()[:, sel].sum(dim=1).float().mean()
                self.record_aux_stat(f"enc_i3d_{kind}", executed[kind])
        frac = dec.detach().float().mean()
        self.record_aux_stat("enc_i3d_frac", frac)
        if ctx.override is None:
            # Expected fraction of executed modules of each utterance (B,), from
            # the gate probabilities: differentiable, normalised by the number of
            # gates so that one weight fits any depth.
            expected = probs.float().mean(dim=1).mean()
            if self.gate_target_fraction is None:
                cost = expected
            else:
                cost = (expected - self.gate_target_fraction) ** 2
            self.record_aux_loss("enc_i3d_depth", cost, self.gate_cost_weight)
        if ctx.tau is not None:
            self.record_aux_stat("enc_i3d_tau", ctx.tau)
        if not self.training:
            self._summary["utterances"] += batch
            for kind, value in executed.items():
                self._summary[kind] += float(value) * batch
            totals = ", ".join(
                f"{k} {float(v):.2f}/{self._num_of(k)}" for k, v in executed.items()
            )
            logger.info(
                f"{self._i3d_name}: executed modules per utterance ({batch} "
                f"utterance(s), threshold {self.gate_threshold}): {totals}"
            )
