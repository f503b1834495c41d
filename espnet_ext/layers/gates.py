"""I3D gates: per-utterance binary decisions that skip whole residual modules.

I3D (Peng, Lee, Watanabe, ICASSP 2023, arXiv 2303.07624) puts a binary gate in front
of every self-attention and feed-forward module of a transformer encoder; a closed
gate lets the residual stream pass unchanged, so a module only costs compute when its
gate is open. This file holds the layer-level parts:

- :func:`gumbel_sigmoid`: the training relaxation. Hard 0/1 decisions in the forward
  pass (straight-through), gradients of ``sigmoid((logit + logistic noise) / tau)``
  in the backward pass.
- :func:`temperature`: the documented exponential temperature schedule.
- :class:`GatePredictor`: the small MLP that maps a pooled (B, D) summary to gate
  logits (B, G).
- :class:`GatedModule`: wraps one ESPnet module (attention, FFN, convolution). In
  training it scales the module's output by the straight-through gate; in evaluation
  it runs the module only on the utterances whose gate is open and not at all when
  none is. Its state-dict keys are those of the wrapped module, so ESPnet
  checkpoints of the plain encoder load into a gated one and back.
"""

import math
from typing import Dict, List, Optional, Sequence

import torch

__all__ = [
    "GATE_TYPES",
    "GatePredictor",
    "GatedModule",
    "check_gate_options",
    "gumbel_sigmoid",
    "masked_mean",
    "temperature",
]

GATE_TYPES = ("local", "global")


def check_gate_options(
    encoder_name: str,
    gate_type: str,
    gate_threshold: float,
    gate_target_fraction: Optional[float],
    gate_cost_weight: float,
    gate_tau_init: float,
    gate_tau_min: float,
    gate_tau_decay: float,
    gate_hidden_units: int,
) -> None:
    """Raise ``ValueError`` naming the first bad I3D option."""
    if gate_type not in GATE_TYPES:
        raise ValueError(
            f"{encoder_name}: gate_type must be one of {list(GATE_TYPES)}, "
            f"got {gate_type!r}"
        )
    if not 0.0 < float(gate_threshold) < 1.0:
        raise ValueError(
            f"{encoder_name}: gate_threshold must be in (0, 1) (a probability above "
            f"which a module runs), got {gate_threshold!r}"
        )
    if gate_target_fraction is not None and not 0.0 < gate_target_fraction <= 1.0:
        raise ValueError(
            f"{encoder_name}: gate_target_fraction must be in (0, 1] (the fraction "
            f"of gated modules to execute) or null, got {gate_target_fraction!r}"
        )
    if gate_cost_weight < 0:
        raise ValueError(
            f"{encoder_name}: gate_cost_weight must be >= 0, got {gate_cost_weight!r}"
        )
    if not 0.0 < gate_tau_min <= gate_tau_init:
        raise ValueError(
            f"{encoder_name}: need 0 < gate_tau_min <= gate_tau_init, got "
            f"gate_tau_min={gate_tau_min!r}, gate_tau_init={gate_tau_init!r}"
        )
    if gate_tau_decay < 0:
        raise ValueError(
            f"{encoder_name}: gate_tau_decay must be >= 0, got {gate_tau_decay!r}"
        )
    if gate_hidden_units < 0:
        raise ValueError(
            f"{encoder_name}: gate_hidden_units must be >= 0 (0: one linear layer), "
            f"got {gate_hidden_units!r}"
        )


def temperature(step: int, tau_init: float, tau_min: float, decay: float) -> float:
    """``max(tau_min, tau_init * exp(-decay * step))``; ``step`` counts training
    forwards (mini-batches). With the defaults (1.0, 0.5, 1e-4) the temperature
    halves over the first ~6900 mini-batches and then stays at 0.5.

    The forward decisions do not depend on it (``sigmoid((l + n) / tau) > 0.5`` iff
    ``l + n > 0``); it only sharpens the straight-through gradient around the
    decision boundary as training goes on.
    """
    return max(tau_min, tau_init * math.exp(-decay * step))


def gumbel_sigmoid(
    logits: torch.Tensor, tau: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Straight-through Gumbel-sigmoid sample of binary gates.

    Args:
        logits: (..., G) gate logits; ``sigmoid(logits)`` is P(open).
        tau: temperature of the relaxation (> 0).

    Returns:
        (..., G) tensor of exact 0.0/1.0 values whose gradient is that of
        ``sigmoid((logits + L) / tau)``, ``L ~ Logistic(0, 1)`` (the difference of
        two Gumbel samples), so ``P(gate = 1) = sigmoid(logits)``.
    """
    u = torch.rand(
        logits.shape, dtype=logits.dtype, device=logits.device, generator=generator
    )
    # clamp keeps log() finite at u == 0 or 1 in low precision
    eps = torch.finfo(logits.dtype).tiny
    u = u.clamp(eps, 1.0 - torch.finfo(logits.dtype).eps)
    noise = torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid((logits + noise) / tau)
    return _StraightThrough.apply(soft)


class _StraightThrough(torch.autograd.Function):
    """Forward: ``soft > 0.5`` as exact 0.0/1.0; backward: the identity.

    ``hard + soft - soft.detach()`` would give the same gradient but values such as
    0.99999994 in the forward pass: an open module's output would be rescaled.
    """

    @staticmethod
    def forward(ctx, soft):
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over valid frames.

    Args:
        x: (B, T, D).
        mask: (B, 1, T) or (B, T), True on real frames; None = all frames.

    Returns:
        (B, D).
    """
    if mask is None:
        return x.mean(dim=1)
    if mask.dim() == 3:
        mask = mask[:, -1, :]  # (B, T): the last query row sees every real frame
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class GatePredictor(torch.nn.Module):
    """Pooled features (B, D) -> gate logits (B, G).

    ``Linear(D, H) -> ReLU -> Linear(H, G)``, or one ``Linear(D, G)`` with
    ``hidden_units=0``. The last bias starts at ``init_bias`` so that a fresh model
    opens most gates (sigmoid(2) = 0.88) and starts as the plain encoder would.
    """

    def __init__(self, idim: int, num_gates: int, hidden_units: int, init_bias: float):
        super().__init__()
        if hidden_units > 0:
            self.net = torch.nn.Sequential(
                torch.nn.Linear(idim, hidden_units),
                torch.nn.ReLU(),
                torch.nn.Linear(hidden_units, num_gates),
            )
        else:
            self.net = torch.nn.Sequential(torch.nn.Linear(idim, num_gates))
        self.init_bias = float(init_bias)
        self.reset_bias()

    def reset_bias(self) -> None:
        with torch.no_grad():
            self.net[-1].bias.fill_(self.init_bias)

    def espnet_initialization_fn(self) -> None:
        """Called by ESPnet's ``initialize`` (``init: xavier_uniform`` etc.) after
        it re-drew every parameter (biases zeroed): restore the opening bias."""
        self.reset_bias()

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, G) logits, computed in float32 (decisions must not flip
        under AMP)."""
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            return self.net(pooled.float())


def _strip_wrapper_keys(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: ``<prefix>module.<k>`` -> ``<prefix><k>``."""
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _add_wrapper_keys(
    module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
) -> None:
    """load_state_dict pre-hook: ``<prefix><k>`` -> ``<prefix>module.<k>``.

    A key already spelled with ``module.`` (an older in-memory state dict) is kept.
    """
    inner = prefix + "module."
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if not key.startswith(inner):
            state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)


class GatedModule(torch.nn.Module):
    """One ESPnet module (attention, FFN or convolution) behind a per-utterance gate.

    The layer's forward pre-hook sets :attr:`gate` before the layer runs:

    - ``None``: no gating, the module runs as ESPnet's (e.g. gates forced open);
    - training: a (B,) straight-through gate of exact 0/1 values; the module runs
      on the whole batch and its output is multiplied by the gate, so that the
      gradient reaches the gate predictor through ``d out / d gate = f(x)``;
    - evaluation: (B,) 0/1 decisions and :attr:`open_idx`, the indices of the open
      utterances (one host sync per layer made by the hook). The module runs on
      those rows only (every batch-sized tensor argument is row-selected; others,
      such as the (1, 2T-1, D) relative position embedding, pass as they are), the
      closed rows get zeros, and with no open row the module is not called at all.

    The caller (ESPnet's ``EncoderLayer``) adds the output to the residual, through
    dropout; zeros leave the residual unchanged.

    Output shape = the first argument's shape (B, T, D): true of ESPnet's
    attention (query), FFN and convolution modules.
    """

    def __init__(self, module: torch.nn.Module, kind: str):
        super().__init__()
        self.module = module
        self.kind = kind  # "attn", "ffn" or "conv"
        self.gate: Optional[torch.Tensor] = None
        self.open_idx: Optional[torch.Tensor] = None
        # Keys stay the wrapped module's (no ".module." level): plain ESPnet
        # checkpoints load, and ours load into plain ESPnet encoders.
        self.register_state_dict_post_hook(_strip_wrapper_keys)
        self.register_load_state_dict_pre_hook(_add_wrapper_keys)

    def set_gate(
        self, gate: Optional[torch.Tensor], open_idx: Optional[torch.Tensor] = None
    ) -> None:
        self.gate = gate
        self.open_idx = open_idx

    def forward(self, *args):
        gate = self.gate
        if gate is None:
            return self.module(*args)
        x = args[0]  # (B, T, D)
        if self.training:
            out = self.module(*args)
            return out * gate.to(out.dtype).view(-1, *([1] * (out.dim() - 1)))
        idx = self.open_idx
        batch = x.size(0)
        n_open = idx.numel()
        if n_open == batch:
            return self.module(*args)
        if n_open == 0:
            return torch.zeros_like(x)
        return self._run_on_rows(args, idx, batch)

    def _run_on_rows(self, args: Sequence, idx: torch.Tensor, batch: int):
        # Self-attention gets the same tensor as query, key and value: select once.
        selected: Dict[int, torch.Tensor] = {}
        sub: List = []
        for a in args:
            if torch.is_tensor(a) and a.dim() > 0 and a.size(0) == batch:
                if id(a) not in selected:
                    selected[id(a)] = a.index_select(0, idx)
                sub.append(selected[id(a)])
            else:
                sub.append(a)
        y = self.module(*sub)  # (n_open, T, D)
        out = y.new_zeros((batch,) + tuple(y.shape[1:]))
        return out.index_copy(0, idx, y)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
