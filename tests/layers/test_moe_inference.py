"""MoE inference fast path: stacked experts, padded and grouped dispatch."""

import pytest
import torch

from espnet_ext.layers.moe import (
    MoEFeedForward,
    dispatch_reference,
    dispatch_stacked,
    expert_stack,
    prepare_moe_inference,
    stacked_layout,
)

D, F, E = 8, 16, 4


def _moe(seed=0, skew=0.0, **kw):
    torch.manual_seed(seed)
    moe = MoEFeedForward(
        D, F, num_experts=E, top_k=2, dropout_rate=0.0, impl="sorted", **kw
    )
    with torch.no_grad():
        moe.router.weight[0] += skew  # skew > 0: expert 0 takes most tokens
    return moe.eval()


@pytest.mark.parametrize("tokens", [0, 1, 5, 40])
@pytest.mark.parametrize("skew", [0.0, 5.0])
def test_stacked_inference_equals_reference(tokens, skew):
    moe = _moe(skew=skew)
    x = torch.randn(tokens, D)
    with torch.no_grad():
        _, weights, indices = moe.route(x)
        expected = dispatch_reference(x, weights, indices, moe.experts)
        assert prepare_moe_inference(moe) == 1
        got = moe(x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["padded", "grouped"])
@pytest.mark.parametrize("skew", [0.0, 5.0])
def test_each_stacked_layout_equals_reference(layout, skew):
    moe = _moe(skew=skew)
    prepare_moe_inference(moe)
    x = torch.randn(9, D)
    with torch.no_grad():
        _, weights, indices = moe.route(x)
        expected = dispatch_reference(x, weights, indices, moe.experts)
        stack, act = expert_stack(moe.experts), moe.experts[0].activation
        got = dispatch_stacked(x, weights, indices, stack, act, layout=layout)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["padded", "grouped"])
def test_stacked_dispatch_gradients_equal_reference(layout):
    """The stacked math itself is differentiable (given a differentiable stack)."""
    moe = _moe(skew=2.0)
    x = torch.randn(12, D, requires_grad=True)
    _, weights, indices = moe.route(x.detach())
    weights = weights.detach()  # the router is not part of the dispatch
    ex = moe.experts

    def stack():
        return (
            torch.stack([e.w_1.weight.t() for e in ex]),
            torch.stack([e.w_1.bias for e in ex]),
            torch.stack([e.w_2.weight.t() for e in ex]),
            torch.stack([e.w_2.bias for e in ex]),
        )

    probe = torch.randn(12, D)
    grads = []
    for fn in (
        lambda: dispatch_reference(x, weights, indices, ex),
        lambda: dispatch_stacked(
            x, weights, indices, stack(), ex[0].activation, layout=layout
        ),
    ):
        x.grad = None
        moe.zero_grad()
        (fn() * probe).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in ex.parameters()])
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "counts, max_pairs, layout",
    [
        ([4, 4, 4, 4], 256, "padded"),  # balanced: one GEMM pair
        ([6, 2, 4, 4], 256, "padded"),  # padding doubles the rows at most
        ([10, 2, 2, 2], 256, "grouped"),  # padding would be 2.5x the rows
        ([8, 8, 0, 0], 256, "grouped"),  # unused experts are never read
        ([4, 4, 4, 4], 8, "grouped"),  # above padded_max_pairs
        ([4, 4, 4, 4], 0, "grouped"),  # padding switched off
    ],
)
def test_stacked_layout_pads_only_balanced_small_calls(counts, max_pairs, layout):
    assert stacked_layout(counts, max_pairs) == layout


def test_unknown_stacked_layout_is_an_error():
    moe = _moe()
    prepare_moe_inference(moe)
    x = torch.randn(3, D)
    _, weights, indices = moe.route(x)
    with pytest.raises(ValueError, match="layout"):
        dispatch_stacked(
            x, weights, indices, expert_stack(moe.experts), torch.nn.ReLU(), "bmm"
        )


def test_stacking_keeps_state_dict_and_follows_load_state_dict():
    moe = _moe()
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    prepare_moe_inference(moe)
    after = moe.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    # loading another model's weights writes into the stack: the padded path sees it
    other = _moe(seed=1)
    moe.load_state_dict(other.state_dict())
    assert expert_stack(moe.experts) is not None
    x = torch.randn(6, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), other(x), rtol=1e-6, atol=1e-6)


def test_moved_parameters_fall_back_to_the_per_expert_dispatch():
    moe = _moe()
    prepare_moe_inference(moe)
    moe.double()  # new tensors: the stack no longer holds the parameters
    assert expert_stack(moe.experts) is None
    x = torch.randn(6, D, dtype=torch.float64)
    with torch.no_grad():
        _, weights, indices = moe.route(x)
        expected = dispatch_reference(x, weights, indices, moe.experts)
        torch.testing.assert_close(moe(x), expected)


@pytest.mark.parametrize("replace", ["expert", "linear", "parameter"])
def test_replaced_module_after_stacking_falls_back(replace):
    moe = _moe()
    prepare_moe_inference(moe)
    torch.manual_seed(3)
    if replace == "expert":
        moe.experts[2] = _moe(seed=4).experts[2]
    elif replace == "linear":
        moe.experts[2].w_2 = torch.nn.Linear(F, D)
    else:
        moe.experts[2].w_1.bias = torch.nn.Parameter(torch.randn(F))
    assert expert_stack(moe.experts) is None
    x = torch.randn(6, D)
    with torch.no_grad():
        _, weights, indices = moe.route(x)
        expected = dispatch_reference(x, weights, indices, moe.experts)
        torch.testing.assert_close(moe(x), expected)


def test_training_after_stacking_updates_the_stacked_weights():
    moe = _moe()
    prepare_moe_inference(moe)
    x = torch.randn(10, D)
    with torch.no_grad():
        start = moe(x).clone()
    moe.train()
    opt = torch.optim.SGD(moe.parameters(), lr=0.1)
    moe(x).pow(2).sum().backward()
    assert all(e.w_1.weight.grad is not None for e in moe.experts)
    opt.step()
    moe.eval()
    assert expert_stack(moe.experts) is not None  # updated in place
    with torch.no_grad():
        got = moe(x)
        _, weights, indices = moe.route(x)
        expected = dispatch_reference(x, weights, indices, moe.experts)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, start)


def test_shared_expert_bank_is_stacked_once():
    first = _moe()
    second = MoEFeedForward(D, F, num_experts=E, top_k=2, experts=first.experts)
    model = torch.nn.ModuleList([first, second]).eval()
    assert prepare_moe_inference(model) == 1
    assert expert_stack(second.experts) is expert_stack(first.experts)


def test_wrapped_experts_are_not_stacked():
    moe = _moe()
    moe.experts[1].w_1 = torch.nn.Sequential(moe.experts[1].w_1)
    assert prepare_moe_inference(moe) == 0
    assert expert_stack(moe.experts) is None


def test_autograd_uses_the_per_expert_dispatch(monkeypatch):
    import espnet_ext.layers.moe as moe_module

    moe = _moe()
    prepare_moe_inference(moe)
    calls = []
    monkeypatch.setattr(
        moe_module, "dispatch_stacked", lambda *a, **kw: calls.append(1) or a[0]
    )
    x = torch.randn(4, D)
    moe(x)  # autograd on: not the inference path
    assert not calls
    with torch.no_grad():
        moe(x)
    assert calls
