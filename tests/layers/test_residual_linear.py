"""ResidualLinear: W_l = W_shared + A_l B_l + diag(d_l), fast paths and merge."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from espnet_ext.layers.residual_linear import (
    ResidualConv1x1,
    ResidualLinear,
    SharedWeight,
    effective_weight_reference,
    group_of_layers,
    svd_residual_init,
)

SHAPES = [(6, 6), (6, 10), (10, 6)]  # (in, out): square, wide, tall


def _layer(in_f=6, out_f=10, rank=2, cls=ResidualLinear, perturb=True, **kw):
    torch.manual_seed(0)
    layer = cls(SharedWeight(in_f, out_f), rank, **kw)
    if perturb:  # non-zero A and d, so no equivalence can pass vacuously
        with torch.no_grad():
            layer.lowrank_a.normal_()
            if layer.diag is not None:
                layer.diag.normal_()
    return layer


def _input(layer, n=7):
    torch.manual_seed(1)
    if isinstance(layer, ResidualConv1x1):
        return torch.randn(2, layer.in_features, n)  # (B, C, T)
    return torch.randn(2, n, layer.in_features)  # (B, T, D)


def _grads(layer, x, impl):
    layer.impl = impl
    x = x.clone().requires_grad_(True)
    for p in (*layer.parameters(), layer.shared.weight):
        p.grad = None
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    params = (layer.shared.weight, layer.lowrank_a, layer.lowrank_b, layer.diag)
    return y.detach(), x.grad, [p.grad.clone() for p in params if p is not None]


def test_fresh_layer_computes_exactly_the_shared_weight():
    layer = _layer(perturb=False)
    x = _input(layer)
    expected = F.linear(x, layer.shared.weight, layer.bias)
    assert torch.equal(layer.lowrank_a, torch.zeros_like(layer.lowrank_a))
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("impl", ["materialized", "factored"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cls", [ResidualLinear, ResidualConv1x1])
@pytest.mark.parametrize("use_diagonal", [True, False])
def test_fast_paths_match_reference_outputs_and_gradients(
    impl, shape, cls, use_diagonal
):
    layer = _layer(*shape, cls=cls, use_diagonal=use_diagonal)
    x = _input(layer)
    ref = _grads(layer, x, "reference")
    out = _grads(layer, x, impl)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1])
    for g, g_ref in zip(out[2], ref[2]):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("shape", SHAPES)
def test_diagonal_sits_on_the_leading_min_in_out_entries(shape):
    layer = _layer(*shape)
    w = (
        layer.effective_weight()
        - layer.shared.weight
        - layer.lowrank_a @ layer.lowrank_b
    )
    m = min(shape)
    expected = torch.zeros(shape[1], shape[0])
    expected[range(m), range(m)] = layer.diag
    torch.testing.assert_close(w, expected)


def test_reference_weight_is_the_literal_formula():
    layer = _layer(6, 10)
    d = torch.zeros(10, 6)
    d[:6, :6] = torch.diag(layer.diag)
    expected = layer.shared.weight + layer.lowrank_a @ layer.lowrank_b + d
    torch.testing.assert_close(effective_weight_reference(*layer._sources()), expected)


def test_use_diagonal_false_has_no_diagonal_parameter():
    layer = _layer(use_diagonal=False)
    assert layer.diag is None and "diag" not in dict(layer.named_parameters())


def test_gradients_reach_shared_lowrank_and_diagonal_parts():
    layer = _layer()
    layer(_input(layer)).square().sum().backward()
    for p in (layer.shared.weight, layer.lowrank_a, layer.lowrank_b, layer.diag):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_layers_of_a_group_add_their_gradients_into_one_shared_tensor():
    shared = SharedWeight(4, 4)
    a, b = ResidualLinear(shared, 1), ResidualLinear(shared, 1)
    x = torch.randn(3, 4)
    a(x).sum().backward()
    only_a = shared.weight.grad.clone()
    shared.weight.grad = None
    (a(x).sum() + b(x).sum()).backward()
    assert a.shared.weight is b.shared.weight
    # d/dW_shared of both layers: (sum over rows of x) per output, once per layer
    torch.testing.assert_close(shared.weight.grad, 2 * only_a)


def test_shared_weight_is_not_a_parameter_of_the_layer():
    layer = _layer()
    assert all(p is not layer.shared.weight for p in layer.parameters())
    assert set(layer.state_dict()) == {"lowrank_a", "lowrank_b", "diag", "bias"}


@pytest.mark.parametrize("cls", [ResidualLinear, ResidualConv1x1])
def test_merged_equals_unmerged(cls):
    layer = _layer(cls=cls)
    x = _input(layer)
    unmerged = layer(x)
    layer.eval()
    with torch.no_grad():
        merged = layer(x)
    assert layer.merged
    torch.testing.assert_close(merged, unmerged)


def test_merged_forward_is_one_dense_linear_with_the_cached_weight():
    layer = _layer().eval()
    x = _input(layer)
    with torch.inference_mode():
        layer(x)
        cached = layer._merged[1]
        assert torch.equal(layer(x), F.linear(x, cached, layer.bias))


def test_conv_merged_weight_is_a_conv1d_kernel():
    layer = _layer(cls=ResidualConv1x1).eval()
    with torch.no_grad():
        layer(_input(layer))
    assert layer._merged[1].shape == (layer.out_features, layer.in_features, 1)


def test_in_place_parameter_update_invalidates_the_merged_weight():
    layer = _layer().eval()
    x = _input(layer)
    with torch.no_grad():
        before = layer(x)
        state = {k: v + 1 for k, v in layer.state_dict().items()}
        layer.load_state_dict(state)  # in-place copy_: same tensors, new _version
        layer.shared.weight.add_(1)
        after = layer(x)
        expected = F.linear(
            x, effective_weight_reference(*layer._sources()), layer.bias
        )
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected)


def test_train_drops_the_merged_weight():
    layer = _layer().eval()
    layer.merge()
    assert layer.merged
    layer.train()
    assert not layer.merged and layer._merged is None


def test_merge_in_training_mode_is_an_error():
    with pytest.raises(RuntimeError, match="eval mode"):
        _layer().train().merge()


def test_eval_forward_that_needs_gradients_does_not_use_the_cache():
    layer = _layer().eval()
    layer(_input(layer)).sum().backward()
    assert layer.lowrank_b.grad is not None and not layer.merged


def test_merged_weight_is_never_saved_or_pickled():
    layer = _layer().eval()
    layer.merge()
    assert set(layer.state_dict()) == {"lowrank_a", "lowrank_b", "diag", "bias"}
    assert pickle.loads(pickle.dumps(layer))._merged is None
    assert copy.deepcopy(layer)._merged is None and layer.merged


def test_no_bias_and_rank_zero():
    layer = _layer(rank=0, bias=False)
    x = _input(layer)
    w = layer.shared.weight.clone()
    w.diagonal().add_(layer.diag)
    torch.testing.assert_close(layer(x), F.linear(x, w))


@pytest.mark.parametrize("rank", [6, 7, -1])
def test_rank_outside_zero_to_min_dim_raises_naming_the_key(rank):
    with pytest.raises(ValueError, match="lowrank_rank"):
        ResidualLinear(SharedWeight(6, 10), rank)


def test_unknown_impl_raises_naming_the_key():
    with pytest.raises(ValueError, match="residual_impl"):
        ResidualLinear(SharedWeight(6, 10), 1, impl="fast")


@pytest.mark.parametrize(
    "remainder, groups",
    [("last_smaller", [0, 0, 0, 1, 1, 1, 2]), ("merge_last", [0, 0, 0, 1, 1, 1, 1])],
)
def test_remainder_rules(remainder, groups):
    assert group_of_layers(7, 3, remainder) == groups
    assert group_of_layers(6, 3, "error") == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    "args, key",
    [
        ((7, 3, "error"), "share_group_size"),
        ((6, 0, "error"), "share_group_size"),
        ((6, 7, "last_smaller"), "share_group_size"),
        ((6, 3, "drop"), "share_remainder"),
    ],
)
def test_bad_grouping_raises_naming_the_key(args, key):
    with pytest.raises(ValueError, match=key):
        group_of_layers(*args)


def test_svd_init_error_is_the_dropped_singular_values_of_each_residual():
    torch.manual_seed(0)
    dense = [torch.randn(10, 6) for _ in range(3)]
    shared = SharedWeight(6, 10)
    layers = [ResidualLinear(shared, 2) for _ in range(3)]
    svd_residual_init(dense, layers)
    mean = torch.stack(dense).mean(0)
    torch.testing.assert_close(shared.weight, mean)
    for w, layer in zip(dense, layers):
        tail = torch.linalg.svdvals((w - mean).double())[2:]
        err = (layer.effective_weight() - w).double().norm()
        torch.testing.assert_close(err, tail.norm(), rtol=1e-4, atol=1e-5)
        assert torch.equal(layer.diag, torch.zeros_like(layer.diag))


def test_weight_merged_under_inference_mode_serves_input_gradients_later():
    layer = _layer().eval().requires_grad_(False)  # frozen: merged even with grad on
    x = torch.randn(5, layer.in_features)  # (N, in): F.linear saves the weight
    with torch.inference_mode():
        layer(x)
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.merged and x.grad is not None
