"""Residual-shared linear maps (ResidualTransformer, arXiv 2310.02489).

Layer ``l`` of a group of K adjacent layers computes ``y = x W_l^T + b_l`` with

    W_l = W_shared(group of l) + A_l B_l + diag(d_l)

- ``W_shared`` (out, in): ONE parameter per group, owned by a :class:`SharedWeight`
  that the encoder keeps in one place; the K :class:`ResidualLinear` layers of the
  group only hold a reference to it, so it is counted once and saved once.
- ``A_l`` (out, r), ``B_l`` (r, in): the layer's own rank-r part. ``A_l`` starts at zero
  (as LoRA's up-projection), so a fresh layer computes exactly ``W_shared``.
- ``d_l`` (min(in, out),): the layer's diagonal, zero at start. For a non-square
  matrix it sits on the leading ``min(in, out)`` entries of the main diagonal,
  ``W[i, i] += d[i]`` for ``i < min(in, out)`` (the paper does not say; this is the
  diagonal of the rectangle, what ``torch.diagonal`` returns).
  ``use_diagonal=False`` drops it.
- ``b_l``: the layer's own bias (biases and norms are never shared).

*What* is computed is separate from *how* (``impl``, a key of :data:`IMPLS`):
``"reference"`` builds ``W_l`` literally from the formula; ``"materialized"`` (default)
builds it with one ``addmm`` and an in-place diagonal add, then one dense GEMM;
``"factored"`` never builds it (``x W_s^T + (x B^T) A^T + x*d``). All give the
reference's outputs and gradients. Measured on CPU (144x576, r=8, 16 to 2000 rows,
forward and forward+backward), ``materialized`` was as fast as or faster than
``factored`` at every size: building W costs out*r*in once, less than one GEMM.

Inference (*merge*): in eval mode, when no gradient is needed (``torch.no_grad``,
``torch.inference_mode``, or frozen parameters), the layer materialises ``W_l`` once
and caches it (a plain attribute, never in the state dict), then runs a plain dense
``F.linear`` / ``F.conv1d``: dense speed, compact checkpoint. The cache is keyed by
each source tensor's storage, dtype, device and ``_version`` counter, so in-place
updates (``load_state_dict``'s ``copy_``, an optimiser step) and ``.to()`` invalidate
it; ``train()`` drops it. Training after a merge is therefore *undone explicitly* by
``train()`` (and an eval-mode forward that needs gradients never uses the cache);
:meth:`ResidualLinear.merge` in training mode is an error.
"""

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "SharedWeight",
    "ResidualLinear",
    "ResidualConv1x1",
    "IMPLS",
    "effective_weight",
    "effective_weight_reference",
    "group_of_layers",
    "REMAINDER_RULES",
    "svd_residual_init",
]


def _param(module: torch.nn.Module, name: str) -> Optional[torch.Tensor]:
    """``getattr(module, name)`` for a parameter without nn.Module.__getattr__'s cost;
    nn.DataParallel replicas keep their (non-leaf) parameters as plain attributes."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


class SharedWeight(torch.nn.Module):
    """``W_shared`` (out, in) of one group of layers, initialised as ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
        # nn.Linear's default: a fresh residual layer starts as a default dense layer.
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def effective_weight_reference(
    shared: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    d: Optional[torch.Tensor],
) -> torch.Tensor:
    """``W_shared + A B + diag(d)`` written out literally; (out, in).

    Args:
        shared: (out, in). a: (out, r). b: (r, in). d: (min(in, out),) or None.
    """
    out_f, in_f = shared.shape
    w = shared + a @ b
    if d is not None:
        m = d.numel()
        # diag(d) padded to the (out, in) rectangle: d on the leading m diagonal entries
        w = w + F.pad(torch.diag(d), (0, in_f - m, 0, out_f - m))
    return w


def effective_weight(
    shared: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    d: Optional[torch.Tensor],
) -> torch.Tensor:
    """Same as :func:`effective_weight_reference` with one fused GEMM and no
    (out, in) diagonal matrix: ``addmm`` then an in-place add on the diagonal view
    (legal for autograd: ``addmm``'s backward does not need its output)."""
    if a.shape[1] == 0 and d is None:
        return shared
    w = torch.addmm(shared, a, b)  # (out, in), a fresh tensor
    if d is not None:
        w.diagonal().add_(d)  # the leading min(in, out) diagonal entries
    return w


def _linear_reference(layer: "ResidualLinear", x: torch.Tensor) -> torch.Tensor:
    return layer._project(x, effective_weight_reference(*layer._sources()))


def _linear_materialized(layer: "ResidualLinear", x: torch.Tensor) -> torch.Tensor:
    return layer._project(x, effective_weight(*layer._sources()))


def _linear_factored(layer: "ResidualLinear", x: torch.Tensor) -> torch.Tensor:
    """``x W_s^T + (x B^T) A^T + [x*d, 0] + b`` without building W; x (..., in)."""
    shared, a, b, d = layer._sources()
    y = F.linear(x, shared, layer.bias)  # (..., out)
    if a.shape[1] > 0:
        y = y + F.linear(F.linear(x, b), a)  # (..., r) -> (..., out)
    if d is not None:
        m = d.numel()
        # the diagonal touches only the first m inputs and outputs
        y = y + F.pad(x[..., :m] * d, (0, layer.out_features - m))
    return y


IMPLS: Dict[str, Callable[["ResidualLinear", torch.Tensor], torch.Tensor]] = {
    "reference": _linear_reference,
    "materialized": _linear_materialized,
    "factored": _linear_factored,
}


class ResidualLinear(torch.nn.Module):
    """Linear map (..., in) -> (..., out) with ``W_l = W_shared + A_l B_l + diag(d_l)``.

    Args:
        shared: the group's :class:`SharedWeight`. Only referenced (not registered
            as a submodule): whoever groups the layers must own it, once.
        rank: r of ``A_l B_l``, ``0 <= r < min(in, out)`` (0: no low-rank part; at
            r >= min(in, out) the factors cost as much as a dense matrix).
        use_diagonal: learn ``d_l`` (the leading min(in, out) diagonal entries).
        bias: learn a per-layer bias ``b_l`` (out,).
        impl: a key of :data:`IMPLS`; same results, different cost.

    Parameters: ``lowrank_a`` (out, r) zeros, ``lowrank_b`` (r, in) ``nn.Linear``-style
    uniform, ``diag`` (min(in, out),) zeros, ``bias`` (out,) ``nn.Linear``-style.
    """

    def __init__(
        self,
        shared: SharedWeight,
        rank: int,
        use_diagonal: bool = True,
        bias: bool = True,
        impl: str = "materialized",
    ):
        super().__init__()
        in_f, out_f = shared.in_features, shared.out_features
        if not isinstance(rank, int) or not 0 <= rank < min(in_f, out_f):
            raise ValueError(
                f"lowrank_rank must be an int in [0, min(in, out)={min(in_f, out_f)}) "
                f"for a {out_f}x{in_f} matrix, got {rank!r}"
            )
        if impl not in IMPLS:
            raise ValueError(
                f"residual_impl must be one of {sorted(IMPLS)}, got {impl!r}"
            )
        self.in_features = in_f
        self.out_features = out_f
        self.rank = rank
        self.impl = impl
        # A plain attribute, not a submodule: W_shared is registered (and saved) once,
        # by its owner. The module is kept, not its Parameter, so that .to() or
        # load_state_dict(assign=True) replacing the Parameter is seen here.
        object.__setattr__(self, "_shared_owner", shared)
        self.lowrank_a = torch.nn.Parameter(torch.zeros(out_f, rank))
        self.lowrank_b = torch.nn.Parameter(torch.empty(rank, in_f))
        if rank > 0:
            torch.nn.init.kaiming_uniform_(self.lowrank_b, a=math.sqrt(5))
        self.diag = (
            torch.nn.Parameter(torch.zeros(min(in_f, out_f))) if use_diagonal else None
        )
        if bias:
            bound = 1.0 / math.sqrt(in_f)
            self.bias = torch.nn.Parameter(torch.empty(out_f).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self._merged: Optional[Tuple[tuple, torch.Tensor]] = None
        # False: always compute from the factors, also in eval (benchmarks, debugging)
        self.auto_merge = True

    @property
    def shared(self) -> SharedWeight:
        return self._shared_owner

    def _sources(self):
        """(W_shared (out, in), A (out, r), B (r, in), d (m,) or None)."""
        # _parameters directly: nn.Module.__getattr__ costs ~1 us per lookup, paid
        # by every merged forward (132 layers in a 12-block conformer)
        return (
            _param(self._shared_owner, "weight"),
            _param(self, "lowrank_a"),
            _param(self, "lowrank_b"),
            _param(self, "diag"),
        )

    def _project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Apply an (out, in) weight and the bias to x (..., in) -> (..., out)."""
        return F.linear(x, weight, _param(self, "bias"))

    def _merged_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def effective_weight(self) -> torch.Tensor:
        """``W_l`` (out, in), differentiable."""
        return effective_weight(*self._sources())

    # ----- merge ---------------------------------------------------------------------
    def _cache_key(self) -> tuple:
        # Storage address and in-place version counter of each source tensor: any
        # in-place update (load_state_dict, optimiser step, .data edits) or new
        # tensor changes it. Conversions (.to/.half) also drop the cache (_apply).
        # Checked on every merged forward, so kept cheap.
        key = []
        for t in self._sources():
            if t is not None:
                key += (t.data_ptr(), t._version)
        return tuple(key)

    def _use_merged(self) -> bool:
        """Eval mode, auto_merge on, and no gradient wanted for any parameter."""
        return not self.training and self.auto_merge and not self._needs_grad()

    def _needs_grad(self) -> bool:
        if not torch.is_grad_enabled():  # no_grad / inference_mode: decoding
            return False
        return any(
            t is not None and t.requires_grad
            for t in (*self._sources(), _param(self, "bias"))
        )

    def _merged_weight(self) -> torch.Tensor:
        key = self._cache_key()
        if self._merged is None or self._merged[0] != key:
            # a normal tensor even under torch.inference_mode: an inference tensor
            # could not be saved for backward by a later eval forward that needs
            # gradients for its input only (frozen parameters)
            with torch.inference_mode(False), torch.no_grad():
                w = effective_weight(*self._sources())
                # contiguous copy even when W is W_shared itself (rank 0, no diagonal):
                # the cache must not alias a parameter
                w = self._merged_layout(w.detach().clone().contiguous())
            self._merged = (key, w)
        return self._merged[1]

    @property
    def merged(self) -> bool:
        """True when the cached dense weight exists and matches the parameters."""
        return self._merged is not None and self._merged[0] == self._cache_key()

    def merge(self) -> None:
        """Materialise ``W_l`` now (eval mode only; ``forward`` also does it lazily).

        Raises:
            RuntimeError: in training mode (a merged weight would not be trained).
        """
        if self.training:
            raise RuntimeError(
                "ResidualLinear.merge() needs eval mode: a merged weight is a constant "
                "copy and would not be trained; call .eval() first"
            )
        self._merged_weight()

    def unmerge(self) -> None:
        """Drop the cached dense weight (``train()`` does this too)."""
        self._merged = None

    def train(self, mode: bool = True):
        if mode:
            self._merged = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        # .to()/.half() make new tensors: drop the old copy instead of holding it
        self._merged = None
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = self.__dict__.copy()  # a copy: the live cache must survive
        state["_merged"] = None  # never pickle or deep-copy the cache
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out); merged dense weight when no gradient is needed."""
        if self._use_merged():
            return self._project(x, self._merged_weight())
        return IMPLS[self.impl](self, x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, diagonal={self.diag is not None}, "
            f"bias={self.bias is not None}, impl={self.impl}"
        )


class ResidualConv1x1(ResidualLinear):
    """A kernel-1 ``Conv1d`` (B, in, T) -> (B, out, T) as a :class:`ResidualLinear`.

    For the conformer's pointwise convolutions. Materialised weights run through
    ``F.conv1d`` with an (out, in, 1) kernel, exactly as ESPnet's ``Conv1d`` does.
    """

    def _project(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if weight.dim() == 2:
            weight = weight.unsqueeze(-1)  # (out, in) -> (out, in, 1)
        return F.conv1d(x, weight, _param(self, "bias"))

    def _merged_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.unsqueeze(-1)  # cache the kernel in conv layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in, T) -> (B, out, T)."""
        if self._use_merged():
            return self._project(x, self._merged_weight())
        if self.impl == "factored":
            # (B, in, T) -> (B, T, in) -> (B, T, out) -> (B, out, T)
            return _linear_factored(self, x.transpose(1, 2)).transpose(1, 2)
        if self.impl == "reference":
            return _linear_reference(self, x)
        return _linear_materialized(self, x)


# ----- grouping --------------------------------------------------------------------

REMAINDER_RULES = ("error", "last_smaller", "merge_last")


def group_of_layers(num_layers: int, group_size: int, remainder: str) -> List[int]:
    """Group index of each layer: K adjacent layers per group.

    When ``num_layers`` is not a multiple of K, ``remainder`` says what happens to
    the last ``num_layers % K`` layers: ``"error"`` (ValueError),
    ``"last_smaller"`` (they form a smaller last group), ``"merge_last"`` (they join
    the previous group, which then has K + num_layers % K layers).

    Example: 7 layers, K=3: last_smaller -> [0,0,0,1,1,1,2]; merge_last ->
    [0,0,0,1,1,1,1].
    """
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"share_group_size must be an int >= 1, got {group_size!r}")
    if group_size > num_layers:
        raise ValueError(
            f"share_group_size={group_size} is larger than num_blocks={num_layers}"
        )
    if remainder not in REMAINDER_RULES:
        raise ValueError(
            f"share_remainder must be one of {REMAINDER_RULES}, got {remainder!r}"
        )
    rest = num_layers % group_size
    if rest and remainder == "error":
        raise ValueError(
            f"num_blocks={num_layers} is not divisible by share_group_size="
            f"{group_size}; set share_remainder to 'last_smaller' or 'merge_last'"
        )
    groups = [layer // group_size for layer in range(num_layers)]
    if rest and remainder == "merge_last" and num_layers > group_size:
        last_full = num_layers // group_size - 1
        groups = [min(g, last_full) for g in groups]
    return groups


@torch.no_grad()
def svd_residual_init(
    dense_weights: Sequence[torch.Tensor],
    layers: Sequence[ResidualLinear],
) -> None:
    """Initialise one group from dense weights: shared = group mean, ``A_l B_l`` =
    rank-r truncated SVD of ``W_l - mean`` (singular values split evenly between the
    factors), ``d_l`` = 0.

    By Eckart-Young, each layer's error ``||W_l - W_eff_l||_F`` is then the smallest
    any rank-r correction can reach: the root sum of squares of the dropped singular
    values of its residual. Biases are left to the caller.

    Args:
        dense_weights: K tensors (out, in) (kernel-1 conv kernels (out, in, 1) are
            accepted), the dense weights of the group's layers in order.
        layers: the K :class:`ResidualLinear` of the group (same shared weight).
    """
    if len(dense_weights) != len(layers):
        raise ValueError("one dense weight per layer of the group is needed")
    ws = [w.reshape(w.shape[0], -1).double() for w in dense_weights]  # (out, in)
    mean = torch.stack(ws).mean(0)
    shared = layers[0].shared.weight
    if mean.shape != shared.shape:
        raise ValueError(
            f"dense weight {tuple(mean.shape)} does not match the shared weight "
            f"{tuple(shared.shape)}"
        )
    shared.copy_(mean)
    for w, layer in zip(ws, layers):
        if layer.shared is not layers[0].shared:
            raise ValueError("all layers of a group must share one SharedWeight")
        r = layer.rank
        u, s, vh = torch.linalg.svd(w - mean, full_matrices=False)
        root = s[:r].sqrt()
        layer.lowrank_a.copy_(u[:, :r] * root)  # (out, r)
        layer.lowrank_b.copy_(root[:, None] * vh[:r])  # (r, in)
        if layer.diag is not None:
            layer.diag.zero_()
