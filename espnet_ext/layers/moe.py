"""Sparse top-k mixture-of-experts feed-forward layer (U2++ MoE, arXiv 2404.16407).

For a token ``x`` (size D) with router logits ``r = W_r x`` (no bias, fp32):

    y = sum_{e in topk(r)} w_e * FFN_e(x)

    k >= 2:  w = softmax(r[topk])          (WeNet's ``MoEFFNLayer``: over the k
                                             selected logits only)
    k == 1:  w_e = softmax(r)_e            (Switch Transformer: the full softmax's
                                             probability of the chosen expert)

A softmax over one selected logit is the constant 1, so with k = 1 the task loss
would give the router no gradient at all; Switch's weight keeps it trained. Routing
is dropless (no capacity, every token reaches its k experts). Each expert is ESPnet's
own ``PositionwiseFeedForward``, so one expert with top-1 computes ESPnet's dense FFN
(``swish`` as the same function in one kernel, see :func:`expert_activation`) and a
dense checkpoint's FFN weights load into ``experts.0``.

Precision: the router, the combination weights and the weighted k-way sum run in
fp32 in every dispatch (also under autocast and for bf16/fp16 modules); only the
experts run in the input's (or autocast's) dtype. The output has the input's dtype.

*What* is computed (router + experts) is separate from *how* tokens are dispatched:
``impl`` selects a function from ``DISPATCH``; every implementation must give the same
outputs and gradients as ``"reference"``.
"""

import contextlib
import itertools
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from espnet.nets.pytorch_backend.transformer.positionwise_feed_forward import (
    PositionwiseFeedForward,
)

from espnet_ext.layers.aux_loss import AuxRecorder

__all__ = [
    "MoEFeedForward",
    "ShareLayerMask",
    "DISPATCH",
    "dispatch_reference",
    "dispatch_sorted",
    "dispatch_stacked",
    "stacked_layout",
    "expert_stack",
    "stack_experts",
    "prepare_moe_inference",
    "default_layout",
    "expert_activation",
    "sort_pairs",
    "expert_counts",
    "block_sizes",
    "install_moe_ffns",
    "moe_ffn_factory",
]


def dispatch_reference(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    experts: torch.nn.ModuleList,
) -> torch.Tensor:
    """Plain per-expert loop; the behaviour every faster dispatch must match.

    One host sync per expert (``torch.where`` is a ``nonzero``).

    Args:
        x: (N, D) tokens.
        weights: (N, k) combination weights of the selected experts (fp32).
        indices: (N, k) selected expert ids.
        experts: E modules mapping (n, D) -> (n, D).

    Returns:
        (N, D) in x's dtype: weighted sum of each token's k expert outputs, summed
        in fp32.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e, expert in enumerate(experts):
        token, slot = torch.where(indices == e)  # (n_e,), (n_e,)
        # An expert with no tokens still runs on 0 rows: its parameters stay in the
        # graph (zero gradients), so DDP needs no find_unused_parameters.
        y = expert(x[token]).float() * weights[token, slot].float().unsqueeze(-1)
        out.index_add_(0, token, y)  # (n_e, D) rows; a token at most once per expert
    return out.to(x.dtype)


def expert_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routing slots per expert, on the device and without a host sync.

    ``torch.bincount`` would synchronise on CUDA (it reads the maximum to size its
    output); a ``scatter_add_`` into E zeros does not (integer adds: exact).

    Args:
        indices: (N, k) selected expert ids.
        num_experts: E.

    Returns:
        (E,) int64 counts.
    """
    flat = indices.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def block_sizes(counts: torch.Tensor) -> List[int]:
    """(E,) counts -> Python ints: THE host sync of :func:`dispatch_sorted`.

    ``split`` needs its sizes on the host; every other step of the sorted dispatch
    (and of the training statistics) stays on the device. Kept as its own function so
    that tests can count the syncs.
    """
    return counts.tolist()


def sort_pairs(
    indices: torch.Tensor, num_experts: int
) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Group the (token, slot) pairs by expert: one stable argsort, one host sync.

    Args:
        indices: (N, k) selected expert ids.
        num_experts: E.

    Returns:
        order (N*k,): pair ids (``token * k + slot``) grouped by expert, token order
        kept within an expert; token (N*k,): the token of each sorted pair; counts:
        list of E Python ints, the block sizes (:func:`block_sizes`, the one host
        sync).
    """
    flat = indices.reshape(-1)  # (N*k,) expert of each (token, slot) pair
    order = flat.argsort(stable=True)
    counts = block_sizes(expert_counts(indices, num_experts))
    return order, order // indices.size(1), counts


def default_layout(device: torch.device) -> str:
    """The layout :func:`dispatch_sorted` uses on ``device`` when none is given."""
    return "stream" if torch.device(device).type == "cpu" else "gather"


def dispatch_sorted(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    experts: torch.nn.ModuleList,
    layout: Optional[str] = None,
) -> torch.Tensor:
    """Sorted dropless dispatch: one argsort, one host sync, one GEMM pair per expert.

    The N*k (token, slot) pairs are sorted by expert, so each expert's pairs form one
    contiguous block, and the block sizes come to the host in one sync
    (:func:`block_sizes`; a per-expert ``torch.where`` loop pays one ``nonzero`` sync
    per expert). Each expert then runs once on its block. Two layouts of the same
    computation:

    - ``"gather"`` (default on accelerators): gather all N*k rows at once, run the
      experts on contiguous slices, un-sort with the inverse permutation (a gather; a
      scatter is ~10x slower) and sum the k slots in fp32 in a fixed order. Few,
      large kernels, and the forward has no atomics: bitwise reproducible on GPU. The
      backward is not: the gradient of the row gather adds each token's k rows with
      ``index_add`` (atomic adds on CUDA) unless
      ``torch.use_deterministic_algorithms(True)`` picks PyTorch's deterministic kernel.
    - ``"stream"`` (default on CPU): gather, run and add one expert block at a time
      into an fp32 (N, D) sum. The N*k x D buffers of ``"gather"`` (4 MB at 2000
      tokens, d=256, k=2) outgrow the L2 cache; one expert's block stays in it
      (measured at 2000 tokens: 0.95x a dense FFN of the same active size, against
      1.08-1.14x for ``"gather"``). Each ``index_add_`` has distinct rows (a token
      meets an expert at most once), so it is reproducible on GPU as well.

    Experts with no rows still run on an empty block, keeping their parameters in the
    graph (zero gradients) as the reference does. N = 0 tokens is fine.

    Args:
        x, weights, indices, experts: as :func:`dispatch_reference`.
        layout: ``"gather"`` or ``"stream"``; ``None``: :func:`default_layout` of
            ``x.device``.

    Returns:
        (N, D) in x's dtype, as :func:`dispatch_reference`.
    """
    if layout is None:
        layout = default_layout(x.device)
    if layout not in ("gather", "stream"):
        raise ValueError(f"layout must be 'gather', 'stream' or None, got {layout!r}")
    n, k = indices.shape
    order, token, counts = sort_pairs(indices, len(experts))
    pair_weights = weights.float().reshape(-1)  # (N*k,) in (token, slot) order
    if layout == "stream":
        pair_weights = pair_weights.index_select(0, order).unsqueeze(-1)  # (N*k, 1)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for expert, tok, w in zip(
            experts, token.split(counts), pair_weights.split(counts)
        ):
            out.index_add_(0, tok, expert(x.index_select(0, tok)).float() * w)
        return out.to(x.dtype)
    inverse = torch.empty_like(order).scatter_(
        0, order, torch.arange(order.numel(), device=order.device)
    )  # (N*k,) sorted position of each (token, slot) pair
    rows = x.index_select(0, token)  # (N*k, D), sorted by expert
    ys = torch.cat(
        [expert(block) for expert, block in zip(experts, rows.split(counts))]
    )  # (N*k, D)
    # Back in (token, slot) order: (N, k, D); D spelt out so that N = 0 works.
    ys = ys.index_select(0, inverse).view(n, k, x.size(-1))
    out = (ys.float() * pair_weights.view(n, k, 1)).sum(dim=1)  # (N, D) fp32
    return out.to(x.dtype)


def _plain_expert_params(experts: torch.nn.ModuleList) -> Optional[List[torch.Tensor]]:
    """[w_1.weight, w_1.bias, w_2.weight, w_2.bias] of every expert, in order, or
    ``None`` unless every expert is ESPnet's ``PositionwiseFeedForward`` with plain
    biased ``Linear`` layers of one dtype and device (not wrapped or quantised)."""
    params = _linear_params(experts)
    if params is None or len({(p.dtype, p.device) for p in params}) != 1:
        return None
    return params


def _linear_params(experts: torch.nn.ModuleList) -> Optional[List[torch.Tensor]]:
    """:func:`_plain_expert_params` without the dtype/device check.

    Reads the modules' ``_modules`` / ``_parameters`` dicts directly: every
    inference call checks its stack with it (:func:`expert_stack`), and
    ``nn.Module.__getattr__`` made that check cost ~100 us per call, as much as a
    hot expert's GEMM pair at a chunk's few tokens.
    """
    params = []
    for expert in experts._modules.values():
        if type(expert) is not PositionwiseFeedForward:
            return None
        for name in ("w_1", "w_2"):
            lin = expert._modules[name]
            if type(lin) is not torch.nn.Linear:
                return None
            weight, bias = lin._parameters["weight"], lin._parameters["bias"]
            if bias is None:
                return None
            params += (weight, bias)
    return params


def stack_experts(experts: torch.nn.ModuleList) -> bool:
    """Lay the experts' weights out as one stack for inference; no copy is kept.

    The weights are stacked *transposed*, ``w_1`` as (E, D, H) and ``w_2`` as
    (E, H, D), and each expert's parameters become views of their slice
    (``param.data = stack[e].t()``: same shape and values, column-major), so the
    stack *is* the parameters: ``load_state_dict`` writes into it and the state dict
    keeps its keys and values. Batched GEMMs read (E, D, H) blocks about 1.7x
    faster than (E, H, D) ones (measured on CPU at 4-16 rows per expert). Called
    for decoding (:func:`prepare_moe_inference`), never in training, where a
    column-major parameter would not match DDP's gradient buckets.

    Returns:
        whether the experts are of the plain kind that can be stacked.
    """
    params = _plain_expert_params(experts)
    if params is None:
        return False
    if expert_stack(experts) is not None:
        return True
    with torch.no_grad():
        stack = tuple(
            torch.stack([p.data.t() if p.dim() == 2 else p.data for p in params[i::4]])
            for i in range(4)
        )  # w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D)
    for i, p in enumerate(params):
        view = stack[i % 4][i // 4]
        p.data = view.t() if view.dim() == 2 else view
    ptrs = tuple(p.data_ptr() for p in params)
    experts.__dict__["_moe_stack"] = (ptrs, stack)
    return True


def expert_stack(
    experts: torch.nn.ModuleList,
) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The stack of :func:`stack_experts` while every parameter still lies in it.

    A ``.to()``, a replaced parameter or an expert swapped for another module puts
    a parameter elsewhere; then ``None`` (and the per-expert dispatch is used).

    Returns:
        (w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D)) or ``None``.
    """
    cached = experts.__dict__.get("_moe_stack")
    if cached is None:
        return None
    # A new dtype or device always means new tensors, so the addresses suffice.
    params = _linear_params(experts)
    if params is None or tuple(p.data_ptr() for p in params) != cached[0]:
        return None
    return cached[1]


def prepare_moe_inference(model: torch.nn.Module) -> int:
    """:func:`stack_experts` for every MoE layer of ``model`` (once per expert
    bank); returns how many banks were stacked. Decoding entry points call it."""
    banks = {
        id(m.experts): m.experts
        for m in model.modules()
        if isinstance(m, MoEFeedForward)
    }
    return sum(stack_experts(bank) for bank in banks.values())


def stacked_layout(counts: Sequence[int], padded_max_pairs: int) -> str:
    """The layout :func:`dispatch_stacked` picks for these expert block sizes.

    ``"padded"`` runs every expert on a block padded to the largest one, so it pays
    for E x max(counts) rows and reads every expert's weights, but issues just two
    GEMMs; ``"grouped"`` runs only the experts that got pairs, each on its exact
    block (two GEMMs per used expert). Padded wins only when every expert is used
    and padding at most doubles the rows (a balanced chunk); otherwise reading the
    unused experts' weights and computing the padding costs more than the extra GEMM
    calls. Measured on CPU (one thread, CPU time, beside two training jobs) for a
    16-token chunk, d=144, 8 experts of 576, top-2: 4 pairs on every expert, padded
    0.77x the grouped time; 7 experts used, largest block 10 (an untrained router),
    grouped 0.8x padded; two experts with 16 pairs each, grouped 0.3x padded. The
    recipe's trained U2++ MoE model routes a 16-frame chunk to ~5 of its 8 experts.

    Args:
        counts: (E,) pairs per expert, as :func:`sort_pairs` returns them.
        padded_max_pairs: never pad more than this many pairs (0: never pad).
    """
    pairs = sum(counts)
    if (
        0 < pairs <= padded_max_pairs
        and min(counts) > 0
        and len(counts) * max(counts) <= 2 * pairs
    ):
        return "padded"
    return "grouped"


def dispatch_stacked(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    stack: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    activation: torch.nn.Module,
    layout: str = "auto",
    padded_max_pairs: int = 256,
) -> torch.Tensor:
    """Inference dispatch on the stacked expert weights (:func:`expert_stack`).

    The pairs are sorted by expert once (:func:`sort_pairs`), then one of two
    layouts runs (``"auto"``: :func:`stacked_layout` picks by the block sizes):

    - ``"padded"``: each expert's pairs padded to the largest block, two batched
      GEMMs over the (E, C, D) blocks. For few balanced tokens (a streaming chunk)
      the per-expert GEMM pairs would cost their fixed overhead E times over; here
      it is paid once, at the price of the padded rows.
    - ``"grouped"``: the experts that got pairs, one after the other, each a GEMM
      pair on its exact rows with slices of the stack (the ``"gather"`` layout of
      :func:`dispatch_sorted` without module calls). Unused experts' weights are
      never read, which is what a chunk routed to a few experts gains.

    Dropout is not applied (inference). The weighted k-way sum is in fp32.

    Args:
        x: (N, D) tokens; weights, indices: (N, k) as :func:`dispatch_reference`.
        stack: :func:`expert_stack` of the experts (w_1 and w_2 transposed).
        activation: the experts' activation.
        layout: ``"auto"``, ``"padded"`` or ``"grouped"``.
        padded_max_pairs: ``"auto"`` never pads more pairs than this.

    Returns:
        (N, D) in x's dtype, equal to :func:`dispatch_reference` in eval mode.
    """
    if layout not in ("auto", "padded", "grouped"):
        raise ValueError(
            f"layout must be 'auto', 'padded' or 'grouped', got {layout!r}"
        )
    w1, b1, w2, b2 = stack
    num_experts = w1.size(0)
    order, token, counts = sort_pairs(indices, num_experts)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if order.numel() == 0:
        return out.to(x.dtype)
    if layout == "auto":
        layout = stacked_layout(counts, padded_max_pairs)
    pair_weights = weights.float().reshape(-1).index_select(0, order).unsqueeze(-1)
    starts = list(itertools.accumulate(counts[:-1], initial=0))  # first sorted pair
    rows = x.index_select(0, token)  # (N*k, D), sorted by expert
    if layout == "grouped":
        # One gather and one index_add for all experts: per-expert ones cost more
        # than their rows at a chunk's few tokens. Likewise one unbind per tensor
        # rather than four indexing ops per used expert.
        w1s, b1s, w2s, b2s = (t.unbind(0) for t in stack)
        y = torch.cat(
            [
                torch.addmm(
                    b2s[e],
                    activation(
                        torch.addmm(b1s[e], rows[first : first + count], w1s[e])
                    ),
                    w2s[e],
                )
                for e, (first, count) in enumerate(zip(starts, counts))
                if count
            ]
        ).float()  # (N*k, D) fp32, sorted by expert; cat's own tensor: scaled in place
        out.index_add_(0, token, y.mul_(pair_weights))
        return out.to(x.dtype)
    capacity = max(counts)
    expert = indices.reshape(-1).index_select(0, order)  # (N*k,) sorted
    start = torch.tensor(starts, device=x.device)  # (E,)
    rank = torch.arange(expert.numel(), device=x.device) - start.index_select(0, expert)
    slot = expert * capacity + rank  # (N*k,) row of each pair in the padded blocks
    blocks = x.new_zeros(num_experts * capacity, x.size(-1))
    blocks = blocks.index_copy(0, slot, rows)
    blocks = blocks.view(num_experts, capacity, -1)  # (E, C, D)
    h = activation(torch.baddbmm(b1.unsqueeze(1), blocks, w1))  # (E, C, H)
    y = torch.baddbmm(b2.unsqueeze(1), h, w2).flatten(0, 1)  # (E * C, D)
    out.index_add_(0, token, y.index_select(0, slot).float() * pair_weights)
    return out.to(x.dtype)


DISPATCH: Dict[str, Callable[..., torch.Tensor]] = {
    "reference": dispatch_reference,
    "sorted": dispatch_sorted,
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
        impl: dispatch implementation, a key of ``DISPATCH`` (training, autograd,
            and inference before :func:`prepare_moe_inference` stacked the experts).
        padded_max_pairs: once :func:`prepare_moe_inference` stacked the experts,
            inference (eval mode, no autograd) runs :func:`dispatch_stacked`, which
            pads balanced calls of at most this many routing pairs (tokens x k) into
            one batched GEMM pair (streaming chunks) and otherwise runs only the
            used experts on the stack. 0: never pad. Same results as ``impl`` up to
            float rounding.
        balance_loss_weight: default weight of the ``moe_balance`` aux loss
            (Switch-style ``E * sum_e f_e P_e``; 1.0 when perfectly balanced).
            U2++ MoE uses none: 0.0.
        z_loss_weight: default weight of the ``moe_z`` router z-loss
            (``mean(logsumexp(r)^2)``, ST-MoE). 0.0 by default.
        aux_prefix: prefix of the aux loss and statistic names (``"enc_"``,
            ``"dec_"``), so encoder and decoder losses get their own weights.
        experts: an existing bank of ``num_experts`` expert modules to use instead of
            building new ones. Passing one bank to several layers shares the expert
            weights between them (one tensor, one gradient accumulated from every
            layer) while each layer keeps its own router (arXiv 2209.08326).

    Shapes: ``forward`` maps (..., D) -> (..., D); zero tokens are fine.

    Aux outputs (training mode only; see :mod:`espnet_ext.layers.aux_loss`): losses
    ``<prefix>moe_balance`` and ``<prefix>moe_z``; statistics
    ``<prefix>moe_load_entropy`` (load entropy / log E: 1 = uniform, 0 = collapse),
    ``<prefix>moe_load_max`` (busiest expert's load x E: 1 = uniform) and
    ``<prefix>moe_frac_e<i>`` (fraction of routing slots taken by expert i). If
    :meth:`set_token_mask` was given a (B, T) mask for a (B, T, D) input, padded
    frames are left out of them; the outputs never depend on the mask. They are
    computed on the device without host syncs, so a training forward with
    ``impl="sorted"`` has exactly one host sync (:func:`block_sizes`).
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
        aux_prefix: str = "",
        experts: Optional[torch.nn.ModuleList] = None,
        padded_max_pairs: int = 256,
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts={num_experts}], got {top_k}"
            )
        if impl not in DISPATCH:
            raise ValueError(
                f"moe_impl must be one of {sorted(DISPATCH)}, got {impl!r}"
            )
        if activation is None:
            activation = torch.nn.ReLU()
        self.num_experts = num_experts
        self.top_k = top_k
        self.impl = impl
        self.padded_max_pairs = padded_max_pairs
        self.balance_loss_weight = balance_loss_weight
        self.z_loss_weight = z_loss_weight
        self.aux_prefix = aux_prefix
        self.router = torch.nn.Linear(idim, num_experts, bias=False)
        if experts is None:
            experts = torch.nn.ModuleList(
                PositionwiseFeedForward(idim, hidden_units, dropout_rate, activation)
                for _ in range(num_experts)
            )
        elif len(experts) != num_experts:
            raise ValueError(
                f"a shared expert bank of {len(experts)} experts was given to an MoE "
                f"layer with num_experts={num_experts}"
            )
        self.experts = experts
        self._token_mask: Optional[torch.Tensor] = None

    def set_token_mask(self, mask: Optional[torch.Tensor]) -> None:
        """(B, T) bool, True for real frames; used for aux losses/stats only.

        It must match the next training input's (B, T, D) leading dimensions.
        """
        self._token_mask = mask

    def route(self, x: torch.Tensor):
        """Router in fp32 (low-precision logits flip expert choices).

        Args:
            x: (N, D).

        Returns:
            logits (N, E) fp32, weights (N, k) fp32, indices (N, k) int64.
        """
        # Entering an autocast context costs as much as the router itself (~7 us
        # on CPU), so it is entered only when autocast is on.
        no_autocast = (
            torch.autocast(device_type=x.device.type, enabled=False)
            if torch.is_autocast_enabled(x.device.type)
            else contextlib.nullcontext()
        )
        with no_autocast:
            logits = torch.nn.functional.linear(x.float(), self.router.weight.float())
        top_logits, indices = logits.topk(self.top_k, dim=-1)
        if self.top_k == 1:
            # Switch Transformer: the softmax over one selected logit is the
            # constant 1, which would leave the router without gradient.
            weights = logits.softmax(dim=-1).gather(-1, indices)
        else:
            weights = top_logits.softmax(dim=-1)
        return logits, weights, indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (N, D)
        logits, weights, indices = self.route(tokens)
        if self.training:
            self._record_aux(logits, indices, shape)
        elif not torch.is_grad_enabled():
            stack = expert_stack(self.experts)
            if stack is not None:
                out = dispatch_stacked(
                    tokens,
                    weights,
                    indices,
                    stack,
                    self.experts[0].activation,
                    padded_max_pairs=self.padded_max_pairs,
                )
                return out.view(shape)
        out = DISPATCH[self.impl](tokens, weights, indices, self.experts)
        return out.view(shape)

    def _record_aux(self, logits: torch.Tensor, indices: torch.Tensor, shape) -> None:
        """Balance and z-losses and load statistics of real (unmasked) tokens.

        Padded tokens are weighted 0 rather than dropped by boolean indexing, and the
        loads are counted with :func:`expert_counts`-style ``scatter_add_`` rather
        than ``bincount``: both alternatives synchronise with the host on CUDA.

        Args:
            logits: (N, E) fp32 router logits.
            indices: (N, k) selected experts.
            shape: the input's shape (..., D); N = prod(shape[:-1]).
        """
        num_tokens, k, num_experts = logits.size(0), self.top_k, self.num_experts
        mask = self._token_mask
        if mask is None:
            keep = logits.new_ones(num_tokens)
        elif tuple(mask.shape) == tuple(shape[:-1]):
            keep = mask.reshape(-1).to(logits.dtype)  # (N,) 1.0 = real token
        else:
            raise ValueError(
                f"token mask of shape {tuple(mask.shape)} does not match the MoE "
                f"input of shape {tuple(shape)} (expected {tuple(shape[:-1])})"
            )
        n = keep.sum().clamp_min(1.0)  # real tokens, as a tensor: no host sync
        slot_keep = keep.unsqueeze(1).expand(num_tokens, k).reshape(-1)  # (N*k,)
        load = logits.new_zeros(num_experts).scatter_add_(
            0, indices.reshape(-1), slot_keep
        )  # (E,) real routing slots per expert
        # f_e: fraction of routing slots taken by expert e; P_e: mean router prob.
        frac = load / (n * k)  # (E,)
        prob = (logits.softmax(dim=-1) * keep.unsqueeze(1)).sum(dim=0) / n  # (E,)
        p = self.aux_prefix
        self.record_aux_loss(
            f"{p}moe_balance",
            num_experts * (frac * prob).sum(),
            self.balance_loss_weight,
        )
        z = (torch.logsumexp(logits, dim=-1).pow(2) * keep).sum() / n
        self.record_aux_loss(f"{p}moe_z", z, self.z_loss_weight)
        # Routing-collapse monitors: 1.0 = uniform load, 0.0 = one expert takes all.
        entropy = -(frac * frac.clamp_min(1e-9).log()).sum()
        self.record_aux_stat(
            f"{p}moe_load_entropy", entropy / math.log(max(num_experts, 2))
        )
        self.record_aux_stat(f"{p}moe_load_max", frac.max() * num_experts)
        for e in range(num_experts):
            self.record_aux_stat(f"{p}moe_frac_e{e}", frac[e])

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, impl={self.impl!r}"


def expert_activation(activation_type: str) -> torch.nn.Module:
    """ESPnet's activation for ``activation_type``, with ``swish`` as ``torch.nn.SiLU``.

    ESPnet's ``Swish`` computes ``x * sigmoid(x)`` in two kernels and keeps both ``x``
    and ``sigmoid(x)`` for backward; ``SiLU`` is the same function in one kernel that
    keeps only ``x`` (as WeNet's experts use). Measured on an expert of 500 rows,
    d=256, f=1024: 14% faster, and one (N*k, F) activation less per MoE layer in
    training. Results agree with ``Swish`` to float rounding.
    """
    if activation_type == "swish":
        return torch.nn.SiLU()
    from espnet.nets.pytorch_backend.nets_utils import get_activation

    return get_activation(activation_type)


def moe_ffn_factory(
    idim: int,
    linear_units: int,
    expert_units: Optional[int],
    num_experts: int,
    top_k: int,
    dropout_rate: float,
    activation_type: str,
    moe_impl: str,
    moe_balance_weight: float,
    moe_z_weight: float,
    aux_prefix: str,
) -> Callable[..., MoEFeedForward]:
    """Map our encoders'/decoders' YAML MoE options to a builder of MoE FFNs.

    One place for the rules they share: experts default to the dense FFN size
    (``expert_units=None`` -> ``linear_units``, as in U2++ MoE) and take their
    activation from :func:`expert_activation`. ``make_moe(experts)`` builds a layer
    around an existing expert bank (a new router, shared experts).
    """

    def make_moe(experts: Optional[torch.nn.ModuleList] = None) -> MoEFeedForward:
        return MoEFeedForward(
            idim=idim,
            hidden_units=expert_units or linear_units,
            num_experts=num_experts,
            top_k=top_k,
            dropout_rate=dropout_rate,
            activation=expert_activation(activation_type),
            impl=moe_impl,
            balance_loss_weight=moe_balance_weight,
            z_loss_weight=moe_z_weight,
            aux_prefix=aux_prefix,
            experts=experts,
        )

    return make_moe


class ShareLayerMask:
    """Forward pre-hook of an ESPnet layer: hands its padding mask to its MoE FFNs.

    ESPnet's ``EncoderLayer.forward(x, mask (B, 1, T), ...)`` and
    ``DecoderLayer.forward(tgt, tgt_mask (B, L, L), ...)`` both take the mask as the
    second argument; it is read positionally or by keyword. Its last query row is
    the (B, T) padding mask (for the decoder's causal ``tgt_mask`` too: the last
    position sees every real token). Without a mask the statistics would silently
    include padding, so a layer in training mode called without one raises.

    A small class rather than a closure: ``torch.save(model)`` must pickle hooks.

    Args:
        mask_arg: the layer's keyword name of the mask (``"mask"``, ``"tgt_mask"``).
        attrs: the layer attributes holding FFNs.
    """

    def __init__(self, mask_arg: str, attrs: Sequence[str]):
        self.mask_arg = mask_arg
        self.attrs = tuple(attrs)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        mask = args[1] if len(args) > 1 else kwargs.get(self.mask_arg)
        if mask is not None and mask.dim() == 3:
            frames = mask[:, -1, :]  # (B, T) True = real frame/token
        elif module.training:
            got = "none" if mask is None else f"shape {tuple(mask.shape)}"
            raise ValueError(
                f"{type(module).__name__} in training mode needs its mask "
                f"{self.mask_arg!r} (2nd positional or keyword argument) of shape "
                f"(B, T_query, T), got {got}: MoE routing statistics use it to leave "
                f"padding out"
            )
        else:
            frames = None  # nothing is recorded outside training
        for attr in self.attrs:
            ffn = getattr(module, attr, None)
            if isinstance(ffn, MoEFeedForward):
                ffn.set_token_mask(frames)


def install_moe_ffns(
    layers: Sequence[torch.nn.Module],
    make_moe: Callable[[], MoEFeedForward],
    dense_block_idx: Sequence[int],
    mask_arg: str,
    attrs: Sequence[str] = ("feed_forward", "feed_forward_macaron"),
) -> None:
    """Swap the FFN modules of ESPnet layers for MoE ones, in place.

    ESPnet's encoder and decoder layers call ``self.feed_forward(x)`` (and
    ``self.feed_forward_macaron(x)``), so replacing those attributes after the
    standard constructor ran is all it takes; the rest of the layer stays ESPnet's.

    Args:
        layers: the layer stack (``encoders`` / ``decoders``).
        make_moe: builds one MoE FFN.
        dense_block_idx: 1-based blocks to leave dense (ESPnet's convention).
        mask_arg: keyword name of the layers' mask argument (their 2nd argument),
            see :class:`ShareLayerMask`.
        attrs: the FFN attributes to replace when present and not ``None``.
    """
    bad = [i for i in dense_block_idx if not 1 <= i <= len(layers)]
    if bad:
        raise ValueError(f"dense_block_idx {bad} out of range 1..{len(layers)}")
    for block_idx, layer in enumerate(layers, start=1):
        if block_idx in dense_block_idx:
            continue
        for attr in attrs:
            if getattr(layer, attr, None) is not None:
                setattr(layer, attr, make_moe())
        layer.register_forward_pre_hook(
            ShareLayerMask(mask_arg, attrs), with_kwargs=True
        )
