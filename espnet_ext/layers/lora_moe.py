"""Mixture of LoRA experts over a frozen (optionally quantised) linear map (SAML).

SAML (Zhao et al., Interspeech 2024, arXiv 2406.19706) gives each attention projection
E LoRA experts ``(A_e, B_e)`` (``A_e``: (r, in), ``B_e``: (out, r)) and an
utterance-level soft router that outputs ``p`` (B, E) per utterance. With the default
*parameter-level* mixing (the public code's ``MoELinear``) utterance ``b`` computes

    A(b) = sum_e p_be A_e,    B(b) = sum_e p_be B_e
    y = x W^T + bias + (alpha / r) * x A(b)^T B(b)^T

and with *output-level* mixing (``mixing="output"``, an option; a mixture of the E
LoRA outputs) ``y = x W^T + bias + (alpha / r) * sum_e p_be x A_e^T B_e^T``. ``W`` and
``bias`` are frozen (:class:`~espnet_ext.layers.quantize.FrozenLinear`: fp32, NF4 or
int8); ``A_e`` are initialised as ``nn.Linear`` weights and ``B_e`` at zero, so a fresh
layer computes exactly its base.

The router (:class:`SAMLRouter`) is shared by every layer of one attention type and
applied to each layer's own input: Conv1d over time (kernel 3, same length) ->
attention pooling (a Linear(d, 1) score per frame, softmax over time, weighted sum) ->
Linear(d, E) -> softmax(logits / temperature). A cross-attention router pools the query
stream and the memory stream separately and concatenates them before the Linear.

*Merging for a fixed speaker*: with a fixed route ``p`` (E,), ``W' = W + (alpha/r)
B(p) A(p)`` (parameter mixing) or ``W + (alpha/r) sum_e p_e B_e A_e`` (output
mixing); :meth:`MoLoRALinear.merge` stores ``W'`` (a plain attribute, never in the state
dict) and the layer then runs one dense ``F.linear``; :meth:`MoLoRALinear.unmerge`
drops it; :meth:`MoLoRALinear.to_linear` returns a plain ``nn.Linear``.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from espnet_ext.layers.quantize import FrozenLinear

__all__ = ["MIXINGS", "MoLoRALinear", "SAMLRouter", "AttentionPooling"]

MIXINGS = ("parameter", "output")


class MoLoRALinear(FrozenLinear):
    """Frozen base linear + E LoRA experts mixed by per-utterance probabilities.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        num_experts: E.
        rank: r of every expert.
        alpha: LoRA scale numerator (scaling = alpha / r).
        dropout_rate: dropout on the input of the LoRA path only.
        mixing: ``"parameter"`` (SAML's code) or ``"output"``.
        fmt, block_size, scaler_block_size: base weight storage (FrozenLinear).

    Forward: ``x`` (B, T, in) or (B, in) and ``route`` (B, E) or (E,) -> (B, T, out)
    or (B, out). ``route`` defaults to what the owning attention module's router set
    (``self.route``) for the current call.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        num_experts: int = 10,
        rank: int = 4,
        alpha: float = 64.0,
        dropout_rate: float = 0.0,
        mixing: str = "parameter",
        fmt: str = "none",
        block_size: int = 64,
        scaler_block_size: int = 256,
    ):
        super().__init__(
            in_features, out_features, bias, fmt, block_size, scaler_block_size
        )
        self._init_experts(num_experts, rank, alpha, dropout_rate, mixing)

    @classmethod
    def from_linear(
        cls,
        linear: torch.nn.Linear,
        num_experts: int = 10,
        rank: int = 4,
        alpha: float = 64.0,
        dropout_rate: float = 0.0,
        mixing: str = "parameter",
        fmt: str = "none",
        block_size: int = 64,
        scaler_block_size: int = 256,
    ) -> "MoLoRALinear":
        """Wrap an existing linear (weights copied; its state-dict keys kept)."""
        new = cls.__new__(cls)
        FrozenLinear._init_from(new, linear, fmt, block_size, scaler_block_size)
        new._init_experts(num_experts, rank, alpha, dropout_rate, mixing)
        return new.to(linear.weight.device)

    def _init_experts(self, num_experts, rank, alpha, dropout_rate, mixing) -> None:
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= rank <= min(self.in_features, self.out_features):
            raise ValueError(
                f"rank must be in [1, {min(self.in_features, self.out_features)}] "
                f"for a {self.out_features}x{self.in_features} projection, got {rank}"
            )
        if mixing not in MIXINGS:
            raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
        self.num_experts = num_experts
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.mixing = mixing
        self.lora_dropout = torch.nn.Dropout(dropout_rate)
        self.lora_a = torch.nn.Parameter(
            torch.empty(num_experts, rank, self.in_features)
        )
        self.lora_b = torch.nn.Parameter(
            torch.zeros(num_experts, self.out_features, rank)
        )
        for e in range(num_experts):
            # nn.Linear's default init for A (as LoRA), B = 0: a fresh layer == base.
            torch.nn.init.kaiming_uniform_(self.lora_a.data[e], a=math.sqrt(5))
        self.route: Optional[torch.Tensor] = None  # (B, E), set per call by a router
        self._merged: Optional[torch.Tensor] = None

    def espnet_initialization_fn(self) -> None:
        """Called by ESPnet's ``initialize`` after ``init: xavier_uniform`` & co
        re-drew every matrix: restore LoRA's init so a fresh layer equals its base."""
        with torch.no_grad():
            for e in range(self.num_experts):
                torch.nn.init.kaiming_uniform_(self.lora_a.data[e], a=math.sqrt(5))
            self.lora_b.zero_()

    # --- mixing -----------------------------------------------------------------
    def _route_for(self, x: torch.Tensor, route: Optional[torch.Tensor]):
        if route is None:
            route = self.route
        if route is None:
            raise RuntimeError(
                "MoLoRALinear got no routing probabilities: call it with route=..., "
                "through the attention module its SAML router is attached to, or "
                "merge() it for a fixed speaker"
            )
        if route.dim() == 1:
            route = route.unsqueeze(0).expand(x.shape[0], -1)
        if route.shape != (x.shape[0], self.num_experts):
            raise ValueError(
                f"route must be (B={x.shape[0]}, E={self.num_experts}), got "
                f"{tuple(route.shape)}"
            )
        return route

    def lora_delta(
        self, x: torch.Tensor, route: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The experts' contribution (B, ..., out) for input (B, ..., in)."""
        route = self._route_for(x, route).to(x.dtype)
        xs = self.lora_dropout(x).reshape(x.shape[0], -1, self.in_features)
        a = self.lora_a.to(x.dtype)
        b = self.lora_b.to(x.dtype)
        if self.mixing == "parameter":
            # (B, E) x (E, r, in) -> (B, r, in); (B, E) x (E, out, r) -> (B, out, r)
            a_mix = torch.einsum("be,eri->bri", route, a)
            b_mix = torch.einsum("be,eor->bor", route, b)
            h = torch.bmm(xs, a_mix.transpose(1, 2))  # (B, T, r)
            d = torch.bmm(h, b_mix.transpose(1, 2))  # (B, T, out)
        else:
            h = torch.einsum("bti,eri->bter", xs, a)  # (B, T, E, r)
            d = torch.einsum("bter,eor,be->bto", h, b, route)  # (B, T, out)
        return (d * self.scaling).reshape(*x.shape[:-1], self.out_features)

    def forward(
        self, x: torch.Tensor, route: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if self._merged is not None:
            b = self.bias
            return F.linear(
                x, self._merged.to(x.dtype), None if b is None else b.to(x.dtype)
            )
        return self.base_forward(x) + self.lora_delta(x, route)

    # --- merging for a fixed speaker ---------------------------------------------
    def delta_weight(self, route: torch.Tensor) -> torch.Tensor:
        """(out, in) weight change of a fixed route (E,)."""
        p = route.to(self.lora_a.dtype).reshape(self.num_experts)
        if self.mixing == "parameter":
            a_mix = torch.einsum("e,eri->ri", p, self.lora_a)
            b_mix = torch.einsum("e,eor->or", p, self.lora_b)
            return self.scaling * b_mix @ a_mix
        return self.scaling * torch.einsum("e,eor,eri->oi", p, self.lora_b, self.lora_a)

    @torch.no_grad()
    def merge(self, route: torch.Tensor) -> None:
        """Fold the experts, mixed by the fixed ``route`` (E,), into one weight."""
        self._merged = (self.base_weight() + self.delta_weight(route)).detach()

    def unmerge(self) -> None:
        self._merged = None

    @property
    def merged(self) -> bool:
        return self._merged is not None

    @torch.no_grad()
    def to_linear(self, route: Optional[torch.Tensor] = None) -> torch.nn.Linear:
        """A plain ``nn.Linear`` computing this layer for a fixed route (E,)."""
        if route is not None:
            w = self.base_weight() + self.delta_weight(route)
        elif self._merged is not None:
            w = self._merged
        else:
            raise ValueError("to_linear needs a route (E,) or a merged layer")
        lin = torch.nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None
        )
        lin = lin.to(device=w.device, dtype=w.dtype)
        lin.weight.copy_(w)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def adapter_nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in (self.lora_a, self.lora_b))

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", num_experts={self.num_experts}, rank={self.rank}, "
            f"alpha={self.alpha}, mixing={self.mixing}"
        )


class AttentionPooling(torch.nn.Module):
    """Softmax-over-time weighted average: (B, T, D) [+ mask (B, T)] -> (B, D)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.score = torch.nn.Linear(d_model, 1)

    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        s = self.score(x).squeeze(-1)  # (B, T)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        w = torch.softmax(s, dim=-1)
        if mask is not None:
            w = w.masked_fill(~mask, 0.0)  # rows with no valid frame: weight 0
        return torch.einsum("bt,btd->bd", w, x)


class SAMLRouter(torch.nn.Module):
    """Utterance-level soft router: conv over time -> attention pooling -> softmax.

    Args:
        d_model: feature size of the attention input it reads.
        num_experts: E.
        temperature: softmax temperature (SAML: 1.0).
        kernel_size: Conv1d kernel over time (SAML: 3), odd (same length).
        d_memory: for a cross-attention router, the memory's feature size (its own
            conv and pooling; pooled vectors are concatenated); None = self.

    Forward: ``x`` (B, T, d_model), ``mask`` (B, T) bool (True = valid) or None,
    ``memory`` (B, S, d_memory), ``memory_mask`` (B, S) -> probabilities (B, E).
    Padded frames are zeroed before the convolution and excluded from the pooling
    (SAML's code pools whole padded batches; masks make a batch equal to one
    utterance at a time). Computed in the router's dtype (fp32 by default).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        temperature: float = 1.0,
        kernel_size: int = 3,
        d_memory: Optional[int] = None,
    ):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"router_kernel_size must be odd, got {kernel_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.conv = torch.nn.Conv1d(
            d_model, d_model, kernel_size, padding=kernel_size // 2
        )
        self.pool = AttentionPooling(d_model)
        self.is_cross = d_memory is not None
        if self.is_cross:
            self.memory_conv = torch.nn.Conv1d(
                d_memory, d_memory, kernel_size, padding=kernel_size // 2
            )
            self.memory_pool = AttentionPooling(d_memory)
        self.linear = torch.nn.Linear(d_model + (d_memory or 0), num_experts)
        self.num_experts = num_experts
        # A fixed route (E,) replacing the router's output (merging, evaluation).
        self.fixed_route: Optional[torch.Tensor] = None

    @staticmethod
    def _summarise(conv, pool, x, mask):
        if mask is not None:
            x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        h = conv(x.transpose(1, 2)).transpose(1, 2)  # (B, T, D): conv over time
        return pool(h, mask)  # (B, D)

    def logits(self, x, mask=None, memory=None, memory_mask=None) -> torch.Tensor:
        dt = self.linear.weight.dtype
        z = self._summarise(self.conv, self.pool, x.to(dt), mask)
        if self.is_cross:
            if memory is None:
                raise ValueError("a cross-attention router needs the memory")
            zm = self._summarise(
                self.memory_conv, self.memory_pool, memory.to(dt), memory_mask
            )
            z = torch.cat([z, zm], dim=-1)
        return self.linear(z)  # (B, E)

    def forward(self, x, mask=None, memory=None, memory_mask=None) -> torch.Tensor:
        if self.fixed_route is not None:
            p = self.fixed_route.to(device=x.device)
            return p.reshape(1, -1).expand(x.shape[0], -1)
        return torch.softmax(
            self.logits(x, mask, memory, memory_mask) / self.temperature, dim=-1
        )
