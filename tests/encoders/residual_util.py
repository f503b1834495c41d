"""Helpers shared by the residual_conformer / residual_transformer tests."""

import torch


def copy_dense_into_k1(residual, dense) -> None:
    """Load a dense ESPnet encoder's weights into a K=1 residual encoder by hand:
    each block's dense matrix becomes its group's shared weight, biases are copied,
    and the low-rank up-projection and diagonal are zero, so W_l = W_dense_l."""
    assert residual.share_group_size == 1
    dense_state = dense.state_dict()
    state = {}
    for key, value in residual.state_dict().items():
        if key.startswith("residual_shared."):
            # residual_shared.<path>.<group>.weight <- encoders.<group>.<path>.weight
            path, group = key[len("residual_shared.") : -len(".weight")].rsplit(".", 1)
            w = dense_state[f"encoders.{group}.{path}.weight"]
            state[key] = w.reshape(w.shape[0], -1)  # conv (out, in, 1) -> (out, in)
        elif key.endswith((".lowrank_a", ".diag")):
            state[key] = torch.zeros_like(value)
        elif key.endswith(".lowrank_b"):
            state[key] = value
        else:
            state[key] = dense_state[key]
    missing, unexpected = residual.load_state_dict(state, strict=True)
    assert missing == [] and unexpected == []


def perturb(encoder, seed=3) -> None:
    """Non-zero low-rank and diagonal parts, so equivalences cannot pass vacuously."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in encoder.residual_layers():
            layer.lowrank_a.copy_(
                0.1 * torch.randn(layer.lowrank_a.shape, generator=gen)
            )
            if layer.diag is not None:
                layer.diag.copy_(0.1 * torch.randn(layer.diag.shape, generator=gen))


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
