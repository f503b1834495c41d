"""Sparse top-k mixture-of-experts feed-forward layer (U2++ MoE, arXiv 2404.16407).

For a token ``x`` (size D) with router logits ``r = W_r x`` (no bias, fp32):

    y = sum_{e in topk(r)} softmax(r[topk])_e * FFN_e(x)

as WeNet's ``MoEFFNLayer``: the softmax runs over the k selected logits only, and
routing is dropless (no capacity, every token reaches its k experts). Each expert is
ESPnet's own ``PositionwiseFeedForward``, so one expert with top-1 *is* ESPnet's dense
FFN and a dense checkpoint's FFN weights load into ``experts.0``.

*What* is computed (router + experts) is separate from *how* tokens are dispatched:
``impl`` selects a function from ``DISPATCH``; every implementation must give the same
outputs and gradients as ``"reference"``.
"""

import math
from typing import Callable, Dict, Optional

import torch
from espnet.nets.pytorch_backend.transformer.positionwise_feed_forward import (
    PositionwiseFeedForward,
)

from espnet_ext.layers.aux import AuxRecorder

__all__ = ["MoEFeedForward", "DISPATCH", "dispatch_reference"]


def dispatch_reference(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    experts: torch.nn.ModuleList,
) -> torch.Tensor:
    """Plain per-expert loop; the behaviour every faster dispatch must match.

    Args:
        x: (N, D) tokens.
        weights: (N, k) combination weights of the selected experts.
        indices: (N, k) selected expert ids.
        experts: E modules mapping (n, D) -> (n, D).

    Returns:
        (N, D) weighted sum of each token's k expert outputs.
    """
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        token, slot = torch.where(indices == e)  # (n_e,), (n_e,)
        # An expert with no tokens still runs on 0 rows: its parameters stay in the
        # graph (zero gradients), so DDP needs no find_unused_parameters.
        y = expert(x[token]) * weights[token, slot].unsqueeze(-1)  # (n_e, D)
        out.index_add_(0, token, y.to(out.dtype))
    return out


DISPATCH: Dict[str, Callable[..., torch.Tensor]] = {
    "reference": dispatch_reference,
}


class MoEFeedForward(AuxRecorder, torch.nn.Module):
    """Top-k mixture of ``num_experts`` position-wise FFNs.

    Args:
        idim: model dimension D.
        hidden_units: hidden size F of each expert.
        num_experts: E.
        top_k: experts per token k (1 <= k <= E).
        dropout_rate: dropout inside each expert (as ESPnet's FFN).
        activation: the experts' activation module.
        impl: dispatch implementation, a key of ``DISPATCH``.
        balance_loss_weight: default weight of the ``moe_balance`` aux loss
            (Switch-style ``E * sum_e f_e P_e``; 1.0 when perfectly balanced).
            U2++ MoE uses none: 0.0.
        z_loss_weight: default weight of the ``moe_z`` router z-loss
            (``mean(logsumexp(r)^2)``, ST-MoE). 0.0 by default.

    Shapes: ``forward`` maps (..., D) -> (..., D).

    Aux outputs (training mode only; see :mod:`espnet_ext.layers.aux`): losses
    ``moe_balance`` and ``moe_z``. If :meth:`set_token_mask` was given a (B, T) mask
    for a (B, T, D) input, padded frames are left out of them; the outputs never
    depend on the mask.
    """

    def __init__(
        self,
        idim: int,
        hidden_units: int,
        num_experts: int = 8,
        top_k: int = 2,
        dropout_rate: float = 0.1,
        activation: Optional[torch.nn.Module] = None,
        impl: str = "reference",
        balance_loss_weight: float = 0.0,
        z_loss_weight: float = 0.0,
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if impl not in DISPATCH:
            raise ValueError(f"moe_impl must be one of {sorted(DISPATCH)}, got {impl!r}")
        if activation is None:
            activation = torch.nn.ReLU()
        self.num_experts = num_experts
        self.top_k = top_k
        self.impl = impl
        self.balance_loss_weight = balance_loss_weight
        self.z_loss_weight = z_loss_weight
        self.router = torch.nn.Linear(idim, num_experts, bias=False)
        self.experts = torch.nn.ModuleList(
            PositionwiseFeedForward(idim, hidden_units, dropout_rate, activation)
            for _ in range(num_experts)
        )
        self._token_mask: Optional[torch.Tensor] = None

    def set_token_mask(self, mask: Optional[torch.Tensor]) -> None:
        """(B, T) bool, True for real frames; used for aux losses/stats only."""
        self._token_mask = mask

    def route(self, x: torch.Tensor):
        """Router in fp32 (low-precision logits flip expert choices).

        Args:
            x: (N, D).

        Returns:
            logits (N, E) fp32, weights (N, k) in x's dtype, indices (N, k) int64.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = torch.nn.functional.linear(x.float(), self.router.weight.float())
        top_logits, indices = logits.topk(self.top_k, dim=-1)
        weights = top_logits.softmax(dim=-1).to(x.dtype)
        return logits, weights, indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (N, D)
        logits, weights, indices = self.route(tokens)
        if self.training:
            self._record_aux(logits, indices, shape)
        out = DISPATCH[self.impl](tokens, weights, indices, self.experts)
        return out.view(shape)

    def _record_aux(self, logits: torch.Tensor, indices: torch.Tensor, shape) -> None:
        mask = self._token_mask
        if mask is not None and mask.shape == shape[:-1]:
            keep = mask.reshape(-1)
            logits, indices = logits[keep], indices[keep]
        n = max(logits.size(0), 1)
        # f_e: fraction of routing slots taken by expert e; P_e: mean router prob.
        counts = torch.bincount(indices.reshape(-1), minlength=self.num_experts)
        frac = counts.float() / (n * self.top_k)  # (E,)
        prob = logits.softmax(dim=-1).mean(dim=0)  # (E,)
        self.record_aux_loss(
            "moe_balance", self.num_experts * (frac * prob).sum(), self.balance_loss_weight
        )
        z = torch.logsumexp(logits, dim=-1).pow(2).mean() if logits.numel() else logits.sum()
        self.record_aux_loss("moe_z", z, self.z_loss_weight)
        # Routing-collapse monitors: 1.0 = uniform load, 0.0 = one expert takes all.
        entropy = -(frac * frac.clamp_min(1e-9).log()).sum()
        self.record_aux_stat("moe_load_entropy", entropy / math.log(max(self.num_experts, 2)))
        self.record_aux_stat("moe_load_max", frac.max() * self.num_experts)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, impl={self.impl!r}"
