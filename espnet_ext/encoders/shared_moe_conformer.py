"""``encoder: shared_moe_conformer``: MoE conformer blocks sharing weights in groups.

Bai et al., "Parameter-efficient conformers via sharing sparsely-gated experts for
end-to-end speech recognition" (arXiv 2209.08326): the conformer's FFNs are sparse
mixtures of experts, and groups of blocks share their parameters, while every block
keeps its own router and its own normalisation layers.

Built on :class:`~espnet_ext.encoders.moe_conformer.MoEConformerEncoder` (every key,
same outputs, masks, inter-CTC, ``return_all_hs``): after it is constructed, each
block of a group takes the module OBJECTS of the group's first block for

- ``self_attn``: every weight of the attention (q/k/v/out and rel-pos projections,
  ``pos_bias_u/v``); the ``qk_norm`` LayerNorms stay per block,
- ``conv``: the convolution module's pointwise and depthwise convolutions; its
  BatchNorm stays per block,
- ``ffn``: the expert bank of each MoE FFN (``feed_forward.experts``,
  ``feed_forward_macaron.experts``, two banks); the routers stay per block. A dense
  FFN (``dense_block_idx``) is shared with the other dense blocks of its group.

A shared tensor is one ``Parameter``: counted once by ``parameters()``, updated once
by the optimizer, its gradient summed over the blocks using it. The state dict holds
it once, under the group's first block (``encoders.<first>.<path>``); the other
blocks' copies are dropped on saving and restored from it on loading, so ESPnet's
checkpoint averaging (which adds the tensors key by key) also keeps one copy.
"""

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from espnet.nets.pytorch_backend.transformer.layer_norm import LayerNorm
from typeguard import typechecked

from espnet_ext.encoders.moe_conformer import MoEConformerEncoder
from espnet_ext.layers.moe import MoEFeedForward
from espnet_ext.layers.residual_linear import group_of_layers

__all__ = ["SharedMoEConformerEncoder", "SHAREABLE"]

# The three families of the paper; ``shared_modules`` selects among them.
SHAREABLE = ("self_attn", "conv", "ffn")
_NORMS = (torch.nn.LayerNorm, LayerNorm, torch.nn.modules.batchnorm._BatchNorm)


def _has_params(m: torch.nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _shared_paths(layer: torch.nn.Module, families: Sequence[str]) -> List[str]:
    """Dotted paths (inside one ESPnet ``EncoderLayer``) of what a group shares.

    A path names a sub-module or a parameter owned directly by a module (the
    attention's ``pos_bias_u``); norms are never in the list.
    """
    paths: List[str] = []
    if "self_attn" in families:
        attn = layer.self_attn
        for name, child in attn.named_children():
            if _has_params(child) and not isinstance(child, _NORMS):
                paths.append(f"self_attn.{name}")
        for name, _ in attn.named_parameters(recurse=False):
            paths.append(f"self_attn.{name}")
    if "conv" in families and layer.conv_module is not None:
        for name, child in layer.conv_module.named_children():
            if _has_params(child) and not isinstance(child, _NORMS):
                paths.append(f"conv_module.{name}")
    if "ffn" in families:
        for attr in ("feed_forward", "feed_forward_macaron"):
            ffn = getattr(layer, attr, None)
            if isinstance(ffn, MoEFeedForward):
                paths.append(f"{attr}.experts")
            elif ffn is not None and _has_params(ffn):
                paths.append(attr)  # a dense FFN of a dense_block_idx block
    return paths


def _resolve(root: torch.nn.Module, path: str):
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    return parent, leaf


class _DropSharedCopies:
    """state_dict post-hook: keep each shared tensor once, under its owner block.

    A small class rather than a bound method: ``register_state_dict_post_hook``
    sets an attribute on the hook, and ``torch.save(model)`` must pickle it.
    """

    def __init__(self, copies: List[Tuple[int, str, int]]):
        self.copies = copies  # (block, path, owner block)

    def __call__(self, module, state_dict, prefix, local_metadata) -> None:
        for block, path, _ in self.copies:
            key = f"{prefix}encoders.{block}.{path}"
            for k in [k for k in state_dict if k == key or k.startswith(key + ".")]:
                del state_dict[k]


class _RestoreSharedCopies:
    """load_state_dict pre-hook: give every sharing block its owner's tensors.

    A checkpoint that holds the copies too (e.g. saved without the post-hook) loads
    as well; ``load_state_dict`` copies the same values into the one tensor.
    """

    def __init__(self, copies: List[Tuple[int, str, int]]):
        self.copies = copies

    def __call__(self, module, state_dict, prefix, *args) -> None:
        for block, path, owner in self.copies:
            src = f"{prefix}encoders.{owner}.{path}"
            dst = f"{prefix}encoders.{block}.{path}"
            for k in [k for k in state_dict if k == src or k.startswith(src + ".")]:
                state_dict.setdefault(dst + k[len(src) :], state_dict[k])


class SharedMoEConformerEncoder(MoEConformerEncoder):
    """MoE conformer whose blocks share attention, convolution and experts per group.

    Args: every ``MoEConformerEncoder`` argument (so every ``ConformerEncoder`` one),
    with the same meaning, plus
        share_group_size: K adjacent blocks per group (1 = no sharing, exactly
            ``moe_conformer``). The paper's value could not be read; default 2.
        share_remainder: when ``num_blocks`` is not a multiple of K: ``"error"``
            (default), ``"last_smaller"`` or ``"merge_last"`` (as
            ``residual_conformer``).
        share_groups: explicit group of each block, ``num_blocks`` ints >= 0 (e.g.
            ``[0, 0, 0, 1, 1, 2]``); blocks with the same number share, adjacent or
            not. Overrides ``share_group_size`` / ``share_remainder``.
        shared_modules: which families a group shares, from ``self_attn``, ``conv``,
            ``ffn`` (default: all three, as the paper). Routers, LayerNorms and the
            convolution's BatchNorm are never shared.

    Shapes: ``forward(xs_pad (B, T, input_size), ilens (B,))`` ->
    ``(B, T', output_size), (B,), None`` exactly as ``ConformerEncoder``.
    Compute is that of ``moe_conformer`` with the same keys; only memory shrinks.
    """

    @typechecked
    def __init__(
        self,
        input_size: int,
        output_size: int = 256,
        attention_heads: int = 4,
        linear_units: int = 2048,
        num_blocks: int = 6,
        dropout_rate: float = 0.1,
        positional_dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        input_layer: Optional[str] = "conv2d",
        normalize_before: bool = True,
        concat_after: bool = False,
        positionwise_layer_type: str = "linear",
        positionwise_conv_kernel_size: int = 3,
        macaron_style: bool = False,
        rel_pos_type: str = "legacy",
        pos_enc_layer_type: str = "rel_pos",
        selfattention_layer_type: str = "rel_selfattn",
        activation_type: str = "swish",
        use_cnn_module: bool = True,
        zero_triu: bool = False,
        cnn_module_kernel: int = 31,
        padding_idx: int = -1,
        interctc_layer_idx: List[int] = [],
        interctc_use_conditioning: bool = False,
        ctc_trim: bool = False,
        stochastic_depth_rate: Union[float, List[float]] = 0.0,
        layer_drop_rate: float = 0.0,
        max_pos_emb_len: int = 5000,
        qk_norm: bool = False,
        use_flash_attn: bool = True,
        num_experts: int = 8,
        top_k: int = 2,
        expert_units: Optional[int] = None,
        moe_impl: str = "sorted",
        moe_balance_weight: float = 0.0,
        moe_z_weight: float = 0.0,
        dense_block_idx: List[int] = [],
        share_group_size: int = 2,
        share_remainder: str = "error",
        share_groups: Optional[List[int]] = None,
        shared_modules: List[str] = list(SHAREABLE),
    ):
        # Validate before building: a bad key should not cost a model construction.
        groups = self._groups(
            num_blocks, share_group_size, share_remainder, share_groups
        )
        families = list(dict.fromkeys(shared_modules))
        unknown = [f for f in families if f not in SHAREABLE]
        if unknown:
            raise ValueError(
                f"shared_moe_conformer: unknown shared_modules {unknown}; choose from "
                f"{list(SHAREABLE)}"
            )
        super().__init__(
            input_size=input_size,
            output_size=output_size,
            attention_heads=attention_heads,
            linear_units=linear_units,
            num_blocks=num_blocks,
            dropout_rate=dropout_rate,
            positional_dropout_rate=positional_dropout_rate,
            attention_dropout_rate=attention_dropout_rate,
            input_layer=input_layer,
            normalize_before=normalize_before,
            concat_after=concat_after,
            positionwise_layer_type=positionwise_layer_type,
            positionwise_conv_kernel_size=positionwise_conv_kernel_size,
            macaron_style=macaron_style,
            rel_pos_type=rel_pos_type,
            pos_enc_layer_type=pos_enc_layer_type,
            selfattention_layer_type=selfattention_layer_type,
            activation_type=activation_type,
            use_cnn_module=use_cnn_module,
            zero_triu=zero_triu,
            cnn_module_kernel=cnn_module_kernel,
            padding_idx=padding_idx,
            interctc_layer_idx=interctc_layer_idx,
            interctc_use_conditioning=interctc_use_conditioning,
            ctc_trim=ctc_trim,
            stochastic_depth_rate=stochastic_depth_rate,
            layer_drop_rate=layer_drop_rate,
            max_pos_emb_len=max_pos_emb_len,
            qk_norm=qk_norm,
            use_flash_attn=use_flash_attn,
            num_experts=num_experts,
            top_k=top_k,
            expert_units=expert_units,
            moe_impl=moe_impl,
            moe_balance_weight=moe_balance_weight,
            moe_z_weight=moe_z_weight,
            dense_block_idx=dense_block_idx,
        )
        self.layer_groups = groups
        self.shared_modules = families
        self._share(families)
        paper_setup = (
            selfattention_layer_type == "rel_selfattn"
            and set(families) == set(SHAREABLE)
            and not dense_block_idx
            and not qk_norm
            and not concat_after
        )
        self._formula_keys = (
            dict(
                d=output_size,
                f=expert_units or linear_units,
                E=num_experts,
                M=2 if macaron_style else 1,
                c=cnn_module_kernel,
                cnn=use_cnn_module,
            )
            if paper_setup
            else None
        )

    @staticmethod
    def _groups(
        num_blocks: int,
        share_group_size: int,
        share_remainder: str,
        share_groups: Optional[List[int]],
    ) -> List[int]:
        if share_groups is None:
            return group_of_layers(num_blocks, share_group_size, share_remainder)
        if len(share_groups) != num_blocks or any(g < 0 for g in share_groups):
            raise ValueError(
                f"shared_moe_conformer: share_groups must give a group number >= 0 "
                f"for each of the num_blocks={num_blocks} blocks, got {share_groups}"
            )
        # Renumber 0, 1, ... in order of first appearance.
        first: Dict[int, int] = {}
        return [first.setdefault(g, len(first)) for g in share_groups]

    def _share(self, families: Sequence[str]) -> None:
        """Point every block's shared paths at its group owner's objects.

        The owner of (group, path) is the group's first block having that path (a
        dense block's FFN is owned by the first dense block of its group).
        """
        owners: Dict[Tuple[int, str], int] = {}
        copies: List[Tuple[int, str, int]] = []
        for idx, (layer, g) in enumerate(zip(self.encoders, self.layer_groups)):
            for path in _shared_paths(layer, families):
                owner = owners.setdefault((g, path), idx)
                if owner == idx:
                    continue
                parent, leaf = _resolve(layer, path)
                src_parent, _ = _resolve(self.encoders[owner], path)
                # setattr registers a Module as a child and a Parameter as a parameter:
                # the same object now sits at both places.
                setattr(parent, leaf, getattr(src_parent, leaf))
                copies.append((idx, path, owner))
        self._shared_copies = copies
        self.register_state_dict_post_hook(_DropSharedCopies(copies))
        self.register_load_state_dict_pre_hook(_RestoreSharedCopies(copies))

    # ----- introspection -------------------------------------------------------------
    def shared_copies(self) -> List[Tuple[int, str, int]]:
        """``(block, path, owner block)`` for every module/parameter a block borrows."""
        return list(self._shared_copies)

    def parameter_formula(self) -> Tuple[int, str]:
        """Closed-form parameter count from the keys, and the formula with its numbers.

        With d = output_size, f = expert_units, E experts, M FFNs per block (2 with
        macaron_style), c = cnn_module_kernel, L blocks in G groups:

            N = N_rest + G * (A + C + M*E*(2*d*f + f + d)) + L * (M*E*d + n_norm*2*d)

        A = 5d^2 + 6d (rel-pos attention: q, k, v, out with bias, pos without, two
        d-sized position biases), C = 3d^2 + c*d + 4d (pointwise 1 (d -> 2d, GLU),
        depthwise, pointwise 2), the per-block part the M routers and the norms
        (LayerNorms and BatchNorm, 2d each). N_rest (subsampling, final norm) is
        ESPnet's and taken as counted. Covers the paper's setup: rel_selfattn,
        every family shared, no dense_block_idx, no qk_norm or concat_after.
        """
        c = self._formula_keys
        if c is None:
            raise ValueError(
                "parameter_formula covers rel_selfattn encoders sharing every family, "
                "without dense_block_idx, qk_norm or concat_after"
            )
        d, f, e, m, k = c["d"], c["f"], c["E"], c["M"], c["c"]
        num_layers, num_groups = len(self.layer_groups), max(self.layer_groups) + 1
        attn = 5 * d * d + 6 * d
        conv = 3 * d * d + k * d + 4 * d if c["cnn"] else 0
        experts = m * e * (2 * d * f + f + d)
        n_norm = 2 + (1 if m == 2 else 0) + (3 if c["cnn"] else 0)  # + conv BN
        per_block = m * e * d + n_norm * 2 * d
        rest = sum(
            p.numel()
            for n, p in self.named_parameters()
            if not n.startswith("encoders.")
        )
        n = rest + num_groups * (attn + conv + experts) + num_layers * per_block
        text = (
            f"N_rest + G*(A + C + M*E*(2df+f+d)) + L*(M*E*d + {n_norm}*2d) = {rest} + "
            f"{num_groups}*({attn} + {conv} + {experts}) + {num_layers}*{per_block} "
            f"= {n}"
        )
        return n, text
