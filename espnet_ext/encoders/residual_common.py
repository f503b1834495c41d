"""What ``residual_conformer`` and ``residual_transformer`` share: after ESPnet's
encoder is built, swap the chosen weight matrices of every block for
:class:`~espnet_ext.layers.residual_linear.ResidualLinear` layers grouped K at a time
(ResidualTransformer, arXiv 2310.02489), and manage merging and dense initialisation.

The block skeleton stays ESPnet's (``EncoderLayer`` calls
``self.self_attn.linear_q(x)``,
``self.feed_forward.w_1(x)``, ``self.conv_module.pointwise_conv1(x)``, ...), so only
those leaf modules are replaced; no ESPnet layer code is repeated here.
"""

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from espnet_ext.layers.residual_linear import (
    IMPLS,
    ResidualConv1x1,
    ResidualLinear,
    SharedWeight,
    group_of_layers,
    svd_residual_init,
)

__all__ = ["TARGETS", "ResidualSharingMixin"]

# Option name -> the leaf modules it selects inside one ESPnet EncoderLayer. Each path
# is its own family of matrices: the two macaron FFNs get separate shared weights.
TARGETS: Dict[str, Tuple[str, ...]] = {
    "attn_q": ("self_attn.linear_q",),
    "attn_k": ("self_attn.linear_k",),
    "attn_v": ("self_attn.linear_v",),
    "attn_out": ("self_attn.linear_out",),
    # the relative-position projection of rel_selfattn (d x d, no bias)
    "attn_pos": ("self_attn.linear_pos",),
    "ffn_in": ("feed_forward.w_1", "feed_forward_macaron.w_1"),
    "ffn_out": ("feed_forward.w_2", "feed_forward_macaron.w_2"),
    "conv_pw1": ("conv_module.pointwise_conv1",),
    "conv_pw2": ("conv_module.pointwise_conv2",),
}


def _get(module: torch.nn.Module, path: str) -> Optional[torch.nn.Module]:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _is_pointwise_conv(m: torch.nn.Module) -> bool:
    return (
        isinstance(m, torch.nn.Conv1d)
        and m.kernel_size == (1,)
        and m.stride == (1,)
        and m.groups == 1
        and m.dilation == (1,)
        and m.padding in ((0,), "valid")
    )


def _resolve_targets(
    layer: torch.nn.Module, targets: Sequence[str], encoder_name: str
) -> List[Tuple[str, str]]:
    """(target name, module path) pairs present in ``layer``.

    Raises:
        ValueError: naming ``residual_targets`` (or the key that makes a target
            impossible).
    """
    names = list(dict.fromkeys(targets))  # de-duplicated, order kept
    if not names:
        raise ValueError(
            f"{encoder_name}: residual_targets is empty; name matrices from "
            f"{sorted(TARGETS)} or 'all'"
        )
    unknown = [n for n in names if n != "all" and n not in TARGETS]
    if unknown:
        raise ValueError(
            f"{encoder_name}: unknown residual_targets {unknown}; choose from "
            f"{sorted(TARGETS)} or 'all'"
        )
    explicit = "all" not in names
    if not explicit:
        names = list(TARGETS)
    out = []
    for name in names:
        found = []
        for path in TARGETS[name]:
            m = _get(layer, path)
            if m is None:
                continue
            if not isinstance(m, torch.nn.Linear) and not _is_pointwise_conv(m):
                raise ValueError(
                    f"{encoder_name}: residual_targets {name!r}: {path} is a "
                    f"{type(m).__name__}, not a linear map (ffn_in/ffn_out need "
                    "positionwise_layer_type: linear); leave it out of residual_targets"
                )
            found.append((name, path))
        if explicit and not found:
            raise ValueError(
                f"{encoder_name}: residual_targets {name!r}: this encoder has no "
                f"{' / '.join(TARGETS[name])} (e.g. attn_pos needs rel_selfattn, "
                "conv_pw1/conv_pw2 need use_cnn_module: true)"
            )
        out += found
    return out


def _loaded_state(module, incompatible_keys) -> None:
    """load_state_dict post-hook: weights that were loaded win over init_from_dense."""
    module._dense_init_pending = None


class ResidualSharingMixin:
    """Mixed into an ESPnet encoder that has ``self.encoders`` (its blocks).

    State-dict layout: ``residual_shared.<path>.<group>.weight`` holds each group's
    ``W_shared`` once (``<path>`` as in the blocks, e.g. ``self_attn.linear_q``);
    ``encoders.<l>.<path>.{lowrank_a, lowrank_b, diag, bias}`` the per-layer parts.
    """

    def _install_residual(
        self,
        encoder_name: str,
        residual_targets: Sequence[str],
        share_group_size: int,
        share_remainder: str,
        lowrank_rank: int,
        use_diagonal: bool,
        residual_impl: str,
        init_from_dense: Optional[str],
    ) -> None:
        if residual_impl not in IMPLS:
            raise ValueError(
                f"{encoder_name}: residual_impl must be one of {sorted(IMPLS)}, "
                f"got {residual_impl!r}"
            )
        if not isinstance(lowrank_rank, int) or lowrank_rank < 0:
            raise ValueError(
                f"{encoder_name}: lowrank_rank must be an int >= 0, "
                f"got {lowrank_rank!r}"
            )
        blocks = list(self.encoders)
        groups = group_of_layers(len(blocks), share_group_size, share_remainder)
        pairs = _resolve_targets(blocks[0], residual_targets, encoder_name)
        self.share_group_size = share_group_size
        self.lowrank_rank = lowrank_rank
        self._layer_groups = groups
        self._residual_paths = [path for _, path in pairs]
        self.residual_shared = torch.nn.ModuleDict()
        for path in self._residual_paths:
            first = _get(blocks[0], path)
            in_f, out_f = first.weight.shape[1], first.weight.shape[0]
            if not lowrank_rank < min(in_f, out_f):
                raise ValueError(
                    f"{encoder_name}: lowrank_rank={lowrank_rank} must be smaller than "
                    f"min(in, out)={min(in_f, out_f)} of every reparameterised matrix "
                    f"({path} is {out_f}x{in_f}); at that rank the low-rank factors "
                    "cost as much as a dense matrix"
                )
            bank = torch.nn.ModuleList(
                SharedWeight(in_f, out_f) for _ in range(max(groups) + 1)
            )
            self._bank_dict(path)[path.rsplit(".", 1)[-1]] = bank
            for block, g in zip(blocks, groups):
                parent_path, _, leaf = path.rpartition(".")
                parent = _get(block, parent_path)
                old = getattr(parent, leaf)
                cls = (
                    ResidualConv1x1
                    if isinstance(old, torch.nn.Conv1d)
                    else ResidualLinear
                )
                setattr(
                    parent,
                    leaf,
                    cls(
                        bank[g],
                        lowrank_rank,
                        use_diagonal=use_diagonal,
                        bias=old.bias is not None,
                        impl=residual_impl,
                    ),
                )
        # init_from_dense is applied at the first training-mode forward, not here:
        # ESPnet calls initialize() (``init:``) and loads ``--init_param`` after
        # building the model, and decoding rebuilds the model from config.yaml (the
        # dense file may be gone) before loading the trained weights. Any
        # load_state_dict reaching this encoder cancels it (see _loaded_state).
        self.init_from_dense = init_from_dense
        self._dense_init_pending = init_from_dense
        self.register_load_state_dict_post_hook(_loaded_state)

    def _bank_dict(self, path: str) -> torch.nn.ModuleDict:
        """Nested ModuleDicts mirroring ``path``'s parents (keys cannot hold dots)."""
        node = self.residual_shared
        for part in path.split(".")[:-1]:
            if part not in node:
                node[part] = torch.nn.ModuleDict()
            node = node[part]
        return node

    # ----- introspection -------------------------------------------------------------
    def residual_layers(self) -> Iterator[ResidualLinear]:
        """Every ResidualLinear of the blocks, block by block."""
        for block in self.encoders:
            for path in self._residual_paths:
                yield _get(block, path)

    def shared_weights(self) -> Dict[str, List[torch.nn.Parameter]]:
        """``{path: [W_shared of group 0, 1, ...]}``."""
        return {
            path: [
                sw.weight
                for sw in self._bank_dict(path)[path.rsplit(".", 1)[-1]].children()
            ]
            for path in self._residual_paths
        }

    def parameter_formula(self, dense_params: int) -> Tuple[int, str]:
        """Expected parameter count of this encoder from the dense one's, and the
        formula with its numbers.

        ``N = N_dense - (L - G) * sum_f in_f*out_f
        + L * sum_f (r*(in_f + out_f) + [diag] min(in_f, out_f))``: every matrix family
        f keeps G shared matrices instead of L dense ones and gains a rank-r pair and a
        diagonal per layer; biases, norms and everything else are unchanged.
        """
        num_layers, num_groups = len(self._layer_groups), max(self._layer_groups) + 1
        sizes = [(m.in_features, m.out_features) for m in self._first_block_layers()]
        use_diag = self._first_block_layers()[0].diag is not None
        full = sum(i * o for i, o in sizes)
        per_layer = sum(
            self.lowrank_rank * (i + o) + (min(i, o) if use_diag else 0)
            for i, o in sizes
        )
        n = dense_params - (num_layers - num_groups) * full + num_layers * per_layer
        text = (
            f"N_dense - (L-G)*sum(in*out) + L*sum(r*(in+out)"
            f"{' + min(in,out)' if use_diag else ''}) = {dense_params} - "
            f"({num_layers}-{num_groups})*{full} + {num_layers}*{per_layer} = {n}"
        )
        return n, text

    def _first_block_layers(self) -> List[ResidualLinear]:
        return [_get(self.encoders[0], p) for p in self._residual_paths]

    # ----- merge ---------------------------------------------------------------------
    @property
    def merged(self) -> bool:
        """True when every ResidualLinear holds a current dense weight."""
        return all(layer.merged for layer in self.residual_layers())

    def merge(self) -> None:
        """Materialise every block's effective weights now (eval mode only).

        Decoding needs no call: in eval mode without gradients each layer merges
        itself on its first forward. Raises RuntimeError in training mode.
        """
        for layer in self.residual_layers():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.residual_layers():
            layer.unmerge()

    # ----- initialisation ------------------------------------------------------------
    def espnet_initialization_fn(self) -> None:
        """Called by ESPnet's ``initialize`` (``init: xavier_uniform`` etc.) after it
        re-drew every matrix: zero the low-rank up-projections and diagonals again,
        so that a fresh layer still computes its group's shared weight."""
        with torch.no_grad():
            for layer in self.residual_layers():
                layer.lowrank_a.zero_()
                if layer.diag is not None:
                    layer.diag.zero_()

    def load_dense(
        self, source: Union[str, Path, Dict[str, torch.Tensor]]
    ) -> Dict[str, float]:
        """Initialise from a dense ESPnet encoder of the same architecture, now.

        Shared weight = mean of the group's dense weights; ``A_l B_l`` = rank-r
        truncated SVD of ``W_l - mean``; diagonal = 0; biases and every other
        parameter copied. With K=1 this reproduces the dense encoder exactly; for
        K>1 each matrix is off by the dropped singular values of its residual.

        Args:
            source: a model file (``valid.acc.ave.pth``: a whole ESPnet model's state
                dict, ``encoder.``-prefixed keys are used) or an encoder state dict.

        Returns:
            ``{path-of-layer: relative Frobenius error of its effective weight}``.
        """
        if isinstance(source, (str, Path)):
            if not Path(source).is_file():
                raise FileNotFoundError(f"init_from_dense: no such file {source!r}")
            source = torch.load(source, map_location="cpu", weights_only=True)
            if isinstance(source.get("model"), dict):  # an ESPnet checkpoint.pth
                source = source["model"]
        if any(k.startswith("encoder.") for k in source):
            source = {
                k[len("encoder.") :]: v
                for k, v in source.items()
                if k.startswith("encoder.")
            }
        own = self.state_dict()
        dense_keys = [k for k in own if not k.startswith("residual_shared.")]
        residual_prefixes = tuple(
            f"encoders.{i}.{path}."
            for i in range(len(self.encoders))
            for path in self._residual_paths
        )
        plain = [k for k in dense_keys if not k.startswith(residual_prefixes)]
        expected = set(plain) | {
            f"encoders.{i}.{path}.{leaf}"
            for i in range(len(self.encoders))
            for path in self._residual_paths
            for leaf in ("weight", "bias")
            if leaf == "weight" or _get(self.encoders[i], path).bias is not None
        }
        missing = sorted(expected - set(source))
        unexpected = sorted(set(source) - expected)
        if missing or unexpected:
            raise ValueError(
                "init_from_dense: the checkpoint is not a dense encoder of this "
                f"architecture; missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        bad = [k for k in plain if source[k].shape != own[k].shape]
        if bad:
            raise ValueError(f"init_from_dense: shape mismatch for {bad[:5]}")
        errors = {}
        with torch.no_grad():
            self.load_state_dict({k: source[k] for k in plain}, strict=False)
            for path in self._residual_paths:
                for g in sorted(set(self._layer_groups)):
                    idx = [i for i, x in enumerate(self._layer_groups) if x == g]
                    layers = [_get(self.encoders[i], path) for i in idx]
                    weights = [source[f"encoders.{i}.{path}.weight"] for i in idx]
                    svd_residual_init(weights, layers)
                    for i, layer, w in zip(idx, layers, weights):
                        if layer.bias is not None:
                            layer.bias.copy_(source[f"encoders.{i}.{path}.bias"])
                        w = w.reshape(w.shape[0], -1).to(layer.lowrank_a.dtype)
                        err = (layer.effective_weight() - w).norm() / w.norm()
                        errors[f"encoders.{i}.{path}"] = err.item()
        self._dense_init_pending = None
        return errors

    def _before_forward(self) -> None:
        """Run by both encoders' ``forward`` before ESPnet's."""
        if getattr(self, "_is_replica", False):
            # nn.DataParallel replicas copy each module's __dict__, so the layers'
            # plain references still point at the original (device 0) shared
            # weights: point them at this replica's own bank.
            self._bind_shared()
        if self.training and self._dense_init_pending is not None:
            path, self._dense_init_pending = self._dense_init_pending, None
            self.load_dense(path)

    def _bind_shared(self) -> None:
        for block, g in zip(self.encoders, self._layer_groups):
            for path in self._residual_paths:
                bank = self._bank_dict(path)[path.rsplit(".", 1)[-1]]
                object.__setattr__(_get(block, path), "_shared_owner", bank[g])
