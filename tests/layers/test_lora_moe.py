"""SAML mixture-of-LoRA-experts linear and router."""

import pytest
import torch

from espnet_ext.layers.lora_moe import MoLoRALinear, SAMLRouter

MIXINGS = ["parameter", "output"]


def _layer(mixing, e=3, r=2, d_in=8, d_out=6, dropout=0.0):
    torch.manual_seed(0)
    base = torch.nn.Linear(d_in, d_out)
    return base, MoLoRALinear.from_linear(
        base, num_experts=e, rank=r, alpha=4.0, dropout_rate=dropout, mixing=mixing
    )


def _route(b, e, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, e, generator=g), -1)


def _step(layer, x, route):
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5)
    layer(x, route).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("mixing", MIXINGS)
def test_fresh_layer_equals_its_base(mixing):
    base, layer = _layer(mixing)
    x = torch.randn(2, 5, 8)
    assert torch.equal(layer(x, _route(2, 3)), base(x))


@pytest.mark.parametrize("mixing", MIXINGS)
def test_one_step_changes_output_and_trains_only_the_experts(mixing):
    base, layer = _layer(mixing)
    x, route = torch.randn(2, 5, 8), _route(2, 3)
    before = layer(x, route).detach()
    layer(x, route).pow(2).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_b.grad.abs().sum() > 0
    layer.zero_grad()
    _step(layer, x, route)
    assert not torch.allclose(layer(x, route), before, atol=1e-4)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_parameter_mixing_matches_its_formula(mixing):
    _, layer = _layer(mixing)
    torch.nn.init.normal_(layer.lora_b)
    x, route = torch.randn(3, 4, 8), _route(3, 3)
    want = []
    for i in range(3):
        p = route[i]
        if mixing == "parameter":
            a = torch.einsum("e,eri->ri", p, layer.lora_a)
            b = torch.einsum("e,eor->or", p, layer.lora_b)
            d = x[i] @ a.T @ b.T
        else:
            d = sum(
                p[e] * (x[i] @ layer.lora_a[e].T @ layer.lora_b[e].T) for e in range(3)
            )
        want.append(x[i] @ layer.weight.T + layer.bias + layer.scaling * d)
    torch.testing.assert_close(layer(x, route), torch.stack(want))


def test_soft_routes_differ_between_mixings_one_hot_routes_do_not():
    _, lp = _layer("parameter")
    _, lo = _layer("output")
    torch.nn.init.normal_(lp.lora_b)
    lo.load_state_dict(lp.state_dict())
    x = torch.randn(2, 4, 8)
    one_hot = torch.eye(3)[[0, 2]]
    torch.testing.assert_close(lp(x, one_hot), lo(x, one_hot))
    soft = _route(2, 3)
    assert not torch.allclose(lp(x, soft), lo(x, soft), atol=1e-4)


@pytest.mark.parametrize("mixing", MIXINGS)
def test_merged_equals_unmerged_for_a_fixed_route(mixing):
    _, layer = _layer(mixing)
    x = torch.randn(2, 5, 8)
    _step(layer, x, _route(2, 3))  # non-zero B, so the test cannot pass vacuously
    p = _route(1, 3, seed=7)[0]
    layer.eval()
    want = layer(x, p)
    assert not torch.allclose(want, layer.base_forward(x), atol=1e-4)
    layer.merge(p)
    assert layer.merged
    torch.testing.assert_close(layer(x), want)
    torch.testing.assert_close(layer.to_linear(p)(x), want)
    layer.unmerge()
    torch.testing.assert_close(layer(x, p), want)


def test_missing_route_and_bad_options_are_refused():
    _, layer = _layer("parameter")
    with pytest.raises(RuntimeError, match="routing probabilities"):
        layer(torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="mixing"):
        _layer("sum")
    with pytest.raises(ValueError, match="rank"):
        MoLoRALinear(8, 6, rank=7)


def test_router_is_a_distribution_and_padding_invariant():
    torch.manual_seed(0)
    router = SAMLRouter(8, 4, temperature=1.0)
    x = torch.randn(2, 7, 8)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    p = router(x, mask)
    torch.testing.assert_close(p.sum(-1), torch.ones(2))
    x2 = x.clone()
    x2[1, 4:] = 100.0  # padding content must not matter
    torch.testing.assert_close(router(x2, mask), p)
    torch.testing.assert_close(router(x[1:, :4]), p[1:])
    router.temperature = 0.1
    assert router(x, mask).max() > p.max()


def test_cross_router_reads_both_streams():
    torch.manual_seed(0)
    router = SAMLRouter(8, 4, d_memory=6)
    x, mem = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    p = router(x, None, mem, None)
    assert p.shape == (2, 4)
    assert not torch.allclose(router(x, None, mem * 3, None), p)
