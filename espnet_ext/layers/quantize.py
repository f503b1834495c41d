"""Weight-only quantisation of a frozen linear map: block-wise NF4 and int8.

A :class:`FrozenLinear` is ``y = x W^T + b`` whose weight ``W`` (out, in) never trains.
It stores ``W`` in one of three formats (``fmt``):

- ``"none"``: a plain fp32 ``weight`` parameter with ``requires_grad=False`` (its state
  dict key is ``weight``, as ``nn.Linear``'s).
- ``"nf4"``: 4-bit NormalFloat (QLoRA, Dettmers et al. 2023) through torchao's
  ``NF4Tensor``: the flattened weight is cut into blocks of ``block_size`` values, each
  block scaled by its absmax and rounded to the nearest of 16 normal quantiles; the
  per-block scales are themselves quantised to int8 in groups of ``scaler_block_size``
  (double quantisation). Stored as four plain buffers (``weight_nf4_codes`` uint8, two
  codes per byte; ``weight_nf4_scalers`` int8; ``weight_nf4_factor`` and
  ``weight_nf4_mean`` float) so ``state_dict``/``torch.load(weights_only=True)`` and
  ESPnet's checkpoint code see ordinary tensors; the ``NF4Tensor`` is rebuilt around
  them (no copy) at each forward and applied with torchao's ``linear_nf4``.
- ``"int8"``: symmetric int8 with one fp32 scale per block of ``block_size`` consecutive
  input features of a row (``absmax / 127``; written here: torchao's int8 weight-only
  path targets GPUs and has no plain state-dict layout). Buffers ``weight_int8_codes``
  (out, in) int8 and ``weight_int8_scales`` (out, in // block_size) fp32.

The bias stays fp32 and frozen. Loading a state dict that holds an fp32 ``weight``
into a quantised layer quantises it on the fly: ESPnet creates adapters *before* it
loads ``--init_param``, so a full-precision checkpoint must land in a quantised model.
The opposite (quantised buffers into an fp32 layer) is refused with a message naming
the format: silently dequantising would hide that the model is not the one trained.

The same storage serves convolutions (:class:`FrozenConv`: the weight
(out, in/groups, *kernel) is quantised as the (out, in/groups * prod(kernel)) matrix)
and embeddings (:class:`FrozenEmbedding`: the (num, dim) table). The forward
dequantises the whole weight and calls ``F.conv1d``/``F.conv2d``/``F.embedding``; only
the linear layer has a fused NF4 kernel (torchao's ``linear_nf4``).
:func:`quantize_modules` swaps them into a model.

torchao constraints: ``in*out`` must be a multiple of ``block_size``; the number of
blocks must be a multiple of ``scaler_block_size``. Where it is not, the largest divisor
of the number of blocks not above the requested ``scaler_block_size`` is used (e.g. a
144x144 weight has 324 blocks of 64: scaler groups of 162), recorded in the layer.
"""

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "FORMATS",
    "FrozenLinear",
    "FrozenConv",
    "FrozenEmbedding",
    "KINDS",
    "quantize_modules",
    "nf4_quantize",
    "nf4_dequantize",
    "int8_quantize",
    "int8_dequantize",
    "NF4_TABLE",
]

FORMATS = ("none", "nf4", "int8")

# QLoRA's NF4 code book as torchao 0.18 writes it (4 decimals): codes are chosen and
# decoded with these values.
NF4_TABLE = (
    -1.0000,
    -0.6962,
    -0.5251,
    -0.3949,
    -0.2844,
    -0.1848,
    -0.0911,
    0.0000,
    0.0796,
    0.1609,
    0.2461,
    0.3379,
    0.4407,
    0.5626,
    0.7230,
    1.0000,
)

_NF4_KEYS = ("nf4_codes", "nf4_scalers", "nf4_factor", "nf4_mean")
_INT8_KEYS = ("int8_codes", "int8_scales")
_KEYS = {"none": ("weight",), "nf4": _NF4_KEYS, "int8": _INT8_KEYS}
_COUNT_KEY = "qcount"


def _nf4_module():
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "quantize: nf4 needs torchao (pip install -c constraints.txt "
            "'espnet_ext[saml]')"
        ) from e
    return nf4_tensor


def _scaler_block(n_blocks: int, requested: int) -> int:
    """Largest divisor of ``n_blocks`` that is <= ``requested`` (torchao needs one)."""
    for d in range(min(requested, n_blocks), 0, -1):
        if n_blocks % d == 0:
            return d
    return 1


def nf4_quantize(
    weight: torch.Tensor, block_size: int = 64, scaler_block_size: int = 256
) -> Dict[str, torch.Tensor]:
    """NF4 buffers of a 2-D weight (out, in), through torchao's ``to_nf4``.

    Returns ``{"nf4_codes": (in*out/2,) uint8, "nf4_scalers": (n_blocks,) int8,
    "nf4_factor": (n_blocks/scaler_block,) float, "nf4_mean": () float}``.
    """
    if weight.dim() != 2:
        raise ValueError(f"nf4 quantises 2-D weights, got shape {tuple(weight.shape)}")
    if weight.numel() % block_size != 0:
        raise ValueError(
            f"quantize_block_size={block_size} must divide the weight's "
            f"{weight.numel()} values (shape {tuple(weight.shape)})"
        )
    n_blocks = weight.numel() // block_size
    sb = _scaler_block(n_blocks, scaler_block_size)
    t = _nf4_module().to_nf4(weight.detach().float().contiguous(), block_size, sb)
    return {
        "nf4_codes": t.quantized_data.clone(),
        "nf4_scalers": t.quantized_scalers.clone(),
        "nf4_factor": t.quantization_factor.clone(),
        "nf4_mean": t.scaler_mean.clone().reshape(()),
    }


def _nf4_tensor(bufs: Dict[str, torch.Tensor], shape: Tuple[int, int]):
    """Wrap stored NF4 buffers in torchao's ``NF4Tensor`` (no copy)."""
    m = _nf4_module()
    scalers, factor = bufs["nf4_scalers"], bufs["nf4_factor"]
    n_blocks = scalers.numel()
    block_size = shape[0] * shape[1] // n_blocks
    meta = m.SubclassTensorArgs(
        torch.Size(shape),
        (shape[1], 1),
        0,
        factor.dtype,
        factor.device,
        False,
    )
    nf4 = torch.tensor(NF4_TABLE, dtype=factor.dtype, device=factor.device)
    return m.NF4Tensor(
        meta,
        block_size,
        n_blocks,
        n_blocks // factor.numel(),
        scalers,
        factor,
        bufs["nf4_mean"],
        bufs["nf4_codes"],
        nf4,
    )


def nf4_dequantize(
    bufs: Dict[str, torch.Tensor], shape: Tuple[int, int]
) -> torch.Tensor:
    """The (out, in) float weight the NF4 buffers stand for."""
    return _nf4_tensor(bufs, shape).get_original_weight()


def int8_quantize(
    weight: torch.Tensor, block_size: int = 64
) -> Dict[str, torch.Tensor]:
    """Symmetric int8, one scale per ``block_size`` input features of each row.

    Returns ``{"int8_codes": (out, in) int8, "int8_scales": (out, in/block) fp32}``.
    """
    if weight.dim() != 2:
        raise ValueError(f"int8 quantises 2-D weights, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if in_f % block_size != 0:
        raise ValueError(
            f"quantize_block_size={block_size} must divide in_features={in_f} "
            f"for int8 (blocks run along the input features of a row)"
        )
    w = weight.detach().float().reshape(out_f, in_f // block_size, block_size)
    absmax = w.abs().amax(dim=-1)
    # An all-zero block keeps scale 1 (codes 0): avoids 0/0.
    scales = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    codes = torch.round(w / scales.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return {"int8_codes": codes.reshape(out_f, in_f), "int8_scales": scales}


def int8_dequantize(bufs: Dict[str, torch.Tensor]) -> torch.Tensor:
    codes, scales = bufs["int8_codes"], bufs["int8_scales"]
    out_f, in_f = codes.shape
    block = in_f // scales.shape[1]
    w = codes.to(scales.dtype).reshape(out_f, -1, block) * scales.unsqueeze(-1)
    return w.reshape(out_f, in_f)


class FrozenLinear(torch.nn.Module):
    """``y = x W^T + b`` with a frozen weight stored as fp32, NF4 or int8.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        fmt: ``"none"`` | ``"nf4"`` | ``"int8"``.
        block_size: values per quantisation block (NF4: of the flattened weight;
            int8: of a row's input features).
        scaler_block_size: NF4 only, scales per int8 group of the double
            quantisation (reduced to a divisor of the number of blocks).

    Input (..., in) -> output (..., out).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        fmt: str = "none",
        block_size: int = 64,
        scaler_block_size: int = 256,
    ):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"quantize must be one of {FORMATS}, got {fmt!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = fmt
        self.block_size = block_size
        self.scaler_block_size = scaler_block_size
        w = torch.empty(out_features, in_features)
        torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if fmt == "none":
            self.weight = torch.nn.Parameter(w, requires_grad=False)
        else:
            self._store(w)
        if bias:
            b = torch.empty(out_features)
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            torch.nn.init.uniform_(b, -bound, bound)
            self.bias = torch.nn.Parameter(b, requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # --- construction -----------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        linear: torch.nn.Linear,
        fmt: str = "none",
        block_size: int = 64,
        scaler_block_size: int = 256,
    ) -> "FrozenLinear":
        """A frozen copy of ``linear`` (its weight quantised when ``fmt`` says so)."""
        new = cls.__new__(cls)
        FrozenLinear._init_from(new, linear, fmt, block_size, scaler_block_size)
        return new

    @staticmethod
    def _init_from(new, linear, fmt, block_size, scaler_block_size) -> None:
        FrozenLinear._init_weight(
            new, linear.weight, linear.bias, fmt, block_size, scaler_block_size
        )

    @staticmethod
    def _init_weight(new, weight, bias, fmt, block_size, scaler_block_size) -> None:
        """Set up ``new`` (built with ``__new__``) around ``weight`` (out, ...),
        stored as the matrix (out, prod(rest))."""
        torch.nn.Module.__init__(new)
        if fmt not in FORMATS:
            raise ValueError(f"quantize must be one of {FORMATS}, got {fmt!r}")
        w = weight.detach().reshape(weight.shape[0], -1)
        new.out_features, new.in_features = w.shape
        new.fmt = fmt
        new.block_size = block_size
        new.scaler_block_size = scaler_block_size
        if fmt == "none":
            new.weight = torch.nn.Parameter(w.clone(), requires_grad=False)
        else:
            new._store(w)
        if bias is not None:
            new.bias = torch.nn.Parameter(bias.detach().clone(), False)
        else:
            new.register_parameter("bias", None)

    def _quantize(self, w: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.fmt == "nf4":
            q = nf4_quantize(w, self.block_size, self.scaler_block_size)
        else:
            q = int8_quantize(w, self.block_size)
        # A counter that stays 1 in every checkpoint we write. ESPnet's n-best model
        # averaging (valid.acc.ave.pth) *adds* integer tensors and divides the others:
        # it would silently corrupt the integer codes; this counter then reads n.
        q[_COUNT_KEY] = torch.ones((), dtype=torch.int64)
        return q

    def _store(self, w: torch.Tensor) -> None:
        for k, v in self._quantize(w).items():
            name = "weight_" + k
            if name in self._buffers:
                self._buffers[name] = v.to(self._buffers[name].device)
            else:
                self.register_buffer(name, v)

    # --- weight access ----------------------------------------------------------
    def _bufs(self) -> Dict[str, torch.Tensor]:
        return {k: self._buffers["weight_" + k] for k in _KEYS[self.fmt]}

    def base_weight(self) -> torch.Tensor:
        """The (out, in) float weight used in the forward (dequantised if needed)."""
        if self.fmt == "none":
            return self._parameters["weight"]
        if self.fmt == "nf4":
            return nf4_dequantize(self._bufs(), (self.out_features, self.in_features))
        return int8_dequantize(self._bufs())

    def __getattr__(self, name):
        # Code written for nn.Linear reads ``.weight`` (dtype, device, shape): give it
        # the dequantised matrix when the layer is quantised.
        if name == "weight" and self.__dict__.get("fmt", "none") != "none":
            return self.base_weight()
        return super().__getattr__(name)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out) through the frozen base alone."""
        if self.fmt == "nf4":
            nf4 = _nf4_tensor(self._bufs(), (self.out_features, self.in_features))
            y = _nf4_module().linear_nf4(x, nf4)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        w = self.base_weight()
        b = self.bias
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x)

    def base_nbytes(self) -> int:
        """Bytes of the stored base weight (codes + scales) and bias."""
        n = sum(t.numel() * t.element_size() for t in self._bufs().values())
        if self.bias is not None:
            n += self.bias.numel() * self.bias.element_size()
        return n

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quantize={self.fmt}"
        )

    # --- checkpoints ------------------------------------------------------------
    def _load_from_state_dict(
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ):
        has_fp = prefix + "weight" in state_dict
        stored = [
            f
            for f in ("nf4", "int8")
            if any(prefix + "weight_" + k in state_dict for k in _KEYS[f])
        ]
        if self.fmt == "none":
            if stored:
                raise RuntimeError(
                    f"{prefix or 'model.'}: the checkpoint holds a {stored[0]}-"
                    f"quantised base weight but this model was built with "
                    f"quantize: none (full precision); build it with the same "
                    f"quantize setting as the checkpoint"
                )
        elif has_fp:
            # A full-precision weight (e.g. ESPnet's --init_param from an fp32
            # model, loaded after the adapter was created): quantise it.
            w = state_dict.pop(prefix + "weight")
            w = w.reshape(self.out_features, -1)  # a conv's (out, in, *k): a matrix
            for k, v in self._quantize(w).items():
                state_dict[prefix + "weight_" + k] = v
        elif stored and self.fmt not in stored:
            raise RuntimeError(
                f"{prefix or 'model.'}: the checkpoint holds a {stored[0]}-quantised "
                f"base weight but this model was built with quantize: {self.fmt}"
            )
        else:
            self._check_not_averaged(state_dict, prefix)
            self._resize_buffers_like(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict,
            prefix,
            local_metadata,
            strict,
            missing_keys,
            unexpected_keys,
            error_msgs,
        )

    def _check_not_averaged(self, state_dict, prefix) -> None:
        """Refuse codes that ESPnet's checkpoint averaging summed; undo its harmless
        n=1 case (an ``int / 1`` division turned uint8 codes into exact floats)."""
        count = state_dict.get(prefix + "weight_" + _COUNT_KEY)
        if count is not None and int(count) != 1:
            raise RuntimeError(
                f"{prefix or 'model.'}: this checkpoint's {self.fmt} base weights are "
                f"the sum of {int(count)} checkpoints (ESPnet's n-best averaging, e.g. "
                f"valid.acc.ave.pth, adds integer tensors): its codes are corrupted. "
                f"With a quantised base use keep_nbest_models: 1 or load one "
                f"'<N>epoch.pth' checkpoint"
            )
        for k in _KEYS[self.fmt]:
            key = prefix + "weight_" + k
            want = self._buffers["weight_" + k].dtype
            v = state_dict.get(key)
            if v is None or v.dtype == want or want.is_floating_point:
                continue
            info = torch.iinfo(want)
            if (
                v.is_floating_point()
                and torch.equal(v, v.round())
                and (v.numel() == 0 or (v.min() >= info.min and v.max() <= info.max))
            ):
                state_dict[key] = v.to(want)
            else:
                raise RuntimeError(
                    f"{key}: expected {want} codes, the checkpoint has {v.dtype} "
                    f"values that are not codes (averaged or converted checkpoint)"
                )

    def _resize_buffers_like(self, state_dict, prefix) -> None:
        # The NF4 scaler grouping (and so the factor's length) depends on the weight
        # shape only, but a checkpoint made with another scaler_block_size has other
        # lengths: take the stored ones.
        for k in _KEYS[self.fmt]:
            key = prefix + "weight_" + k
            if key in state_dict and self._buffers["weight_" + k].shape != (
                state_dict[key].shape
            ):
                self._buffers["weight_" + k] = torch.empty_like(state_dict[key])


class FrozenConv(FrozenLinear):
    """A ``Conv1d``/``Conv2d`` with a frozen weight stored as fp32, NF4 or int8.

    The weight (out, in/groups, *kernel) is stored as the (out, in/groups *
    prod(kernel)) matrix of :class:`FrozenLinear`; ``.weight`` reads back the
    convolution's shape. Build with :meth:`from_conv`. Input and output as the
    convolution it replaces: (B, C_in, T) or (B, C_in, H, W).
    """

    @classmethod
    def from_conv(
        cls,
        conv: torch.nn.modules.conv._ConvNd,
        fmt: str = "none",
        block_size: int = 64,
        scaler_block_size: int = 256,
    ) -> "FrozenConv":
        if not isinstance(conv, (torch.nn.Conv1d, torch.nn.Conv2d)):
            raise ValueError(f"FrozenConv takes Conv1d or Conv2d, got {type(conv)}")
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"FrozenConv supports padding_mode='zeros', got {conv.padding_mode!r}"
            )
        new = cls.__new__(cls)
        FrozenLinear._init_weight(
            new, conv.weight, conv.bias, fmt, block_size, scaler_block_size
        )
        new.weight_shape = tuple(conv.weight.shape)
        new.stride, new.padding = conv.stride, conv.padding
        new.dilation, new.groups = conv.dilation, conv.groups
        return new

    def base_weight(self) -> torch.Tensor:
        """The convolution's float weight (out, in/groups, *kernel)."""
        return super().base_weight().view(self.weight_shape)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if len(self.weight_shape) == 3 else F.conv2d
        b = self.bias
        return conv(
            x,
            self.base_weight().to(x.dtype),
            None if b is None else b.to(x.dtype),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def extra_repr(self) -> str:
        return (
            f"weight_shape={self.weight_shape}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, "
            f"bias={self.bias is not None}, quantize={self.fmt}"
        )


class FrozenEmbedding(FrozenLinear):
    """An ``nn.Embedding`` with a frozen (num, dim) table stored as fp32, NF4 or int8.

    Build with :meth:`from_embedding`. ``forward`` maps ids (...) -> (..., dim);
    ``.weight`` reads back the table (Whisper ties it to its output layer).
    """

    @classmethod
    def from_embedding(
        cls,
        emb: torch.nn.Embedding,
        fmt: str = "none",
        block_size: int = 64,
        scaler_block_size: int = 256,
    ) -> "FrozenEmbedding":
        if emb.max_norm is not None or emb.sparse:
            raise ValueError(
                "FrozenEmbedding supports embeddings without max_norm or sparse "
                "gradients"
            )
        new = cls.__new__(cls)
        FrozenLinear._init_weight(
            new, emb.weight, None, fmt, block_size, scaler_block_size
        )
        new.padding_idx = emb.padding_idx
        return new

    def base_forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.base_weight(), self.padding_idx)

    def extra_repr(self) -> str:
        return (
            f"{self.out_features}, {self.in_features}, "
            f"padding_idx={self.padding_idx}, quantize={self.fmt}"
        )


# The module kinds ``quantize_modules`` can store quantised.
KINDS = ("linear", "conv", "embedding")


def quantize_modules(
    module: torch.nn.Module,
    fmt: str,
    block_size: int = 64,
    scaler_block_size: int = 256,
    skip=(),
    kinds=KINDS,
) -> int:
    """Store the weight of every plain module of ``kinds`` under ``module`` quantised.

    ``kinds``: any of ``"linear"`` (``nn.Linear`` -> :class:`FrozenLinear`),
    ``"conv"`` (``nn.Conv1d``/``nn.Conv2d`` -> :class:`FrozenConv`) and
    ``"embedding"`` (``nn.Embedding`` -> :class:`FrozenEmbedding`). ``skip``:
    module-name prefixes left alone (e.g. the routers). Weights whose size the format
    cannot block (``block_size`` not dividing them) stay in fp32. Returns the number
    of modules replaced.
    """
    if fmt == "none":
        return 0
    if fmt not in FORMATS:
        raise ValueError(f"quantize must be one of {FORMATS}, got {fmt!r}")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(
            f"quantize_modules: unknown kind(s) {sorted(unknown)}; {KINDS}"
        )
    n = 0
    for name, child in list(module.named_modules()):
        for cname, sub in list(child.named_children()):
            full = f"{name}.{cname}" if name else cname
            if any(full == s or full.startswith(s + ".") for s in skip):
                continue
            new = _frozen_copy(sub, fmt, block_size, scaler_block_size, kinds)
            if new is None:
                continue
            new.to(sub.weight.device)
            setattr(child, cname, new)
            n += 1
    return n


def _frozen_copy(sub, fmt, block_size, scaler_block_size, kinds):
    """The quantised replacement of ``sub``, or None to leave it alone."""
    if not _plain(sub) or not _blockable(sub.weight, fmt, block_size):
        return None
    args = (fmt, block_size, scaler_block_size)
    if "linear" in kinds and isinstance(sub, torch.nn.Linear):
        return FrozenLinear.from_linear(sub, *args)
    if (
        "conv" in kinds
        and isinstance(sub, (torch.nn.Conv1d, torch.nn.Conv2d))
        and sub.padding_mode == "zeros"
    ):
        return FrozenConv.from_conv(sub, *args)
    if (
        "embedding" in kinds
        and isinstance(sub, torch.nn.Embedding)
        and sub.max_norm is None
        and not sub.sparse
    ):
        return FrozenEmbedding.from_embedding(sub, *args)
    return None


def _plain(m: torch.nn.Module) -> bool:
    """A module of a kind we store, adding no parameters or children (Whisper's
    ``Linear``/``Conv1d`` subclasses only cast dtypes); LoRA-style subclasses are
    left alone."""
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Embedding)
    return (
        isinstance(m, kinds)
        and set(m._parameters) <= {"weight", "bias"}
        and not m._modules
    )


def _blockable(weight: torch.Tensor, fmt: str, block_size: int) -> bool:
    if fmt == "nf4":
        return weight.numel() % block_size == 0
    return weight[0].numel() % block_size == 0
