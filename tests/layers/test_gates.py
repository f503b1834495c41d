"""I3D gate primitives: straight-through Gumbel-sigmoid, temperature schedule, and the
gated module (skips closed rows, keeps the wrapped module's state-dict keys)."""

import math

import pytest
import torch

from espnet_ext.layers.gates import (
    GatedModule,
    GatePredictor,
    check_gate_options,
    gumbel_sigmoid,
    masked_mean,
    temperature,
)


def test_gumbel_sigmoid_is_hard_in_forward_and_opens_with_probability_sigmoid():
    logits = torch.tensor([-1.0, 0.0, 2.0]).repeat(20000, 1).requires_grad_()
    g = gumbel_sigmoid(logits, tau=0.7, generator=torch.Generator().manual_seed(0))
    assert set(g.detach().unique().tolist()) <= {0.0, 1.0}
    rate = g.detach().mean(0)
    assert torch.allclose(rate, torch.sigmoid(logits[0].detach()), atol=0.015), rate
    g.sum().backward()  # straight-through: the relaxed sample's gradient
    assert (logits.grad > 0).all()


def test_temperature_decays_exponentially_to_its_floor():
    assert temperature(0, 1.0, 0.5, 1e-4) == 1.0
    assert math.isclose(temperature(1000, 1.0, 0.1, 1e-3), math.exp(-1.0))
    assert temperature(10**6, 1.0, 0.5, 1e-4) == 0.5


def test_masked_mean_ignores_padding():
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    mask = torch.tensor([[[True, True, False]]])
    assert masked_mean(x, mask).item() == 2.0


def test_predictor_starts_open_and_espnet_init_keeps_the_bias():
    p = GatePredictor(8, 3, 4, init_bias=2.0)
    torch.nn.init.zeros_(p.net[-1].bias)  # what ESPnet's init: xavier_* does
    p.espnet_initialization_fn()  # what ESPnet calls after it
    assert torch.all(p.net[-1].bias == 2.0)


class _Count(torch.nn.Module):
    """FFN-like module that counts its calls and the rows it saw."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.rows = []

    def forward(self, x):
        self.rows.append(x.size(0))
        return self.lin(x)


def test_gated_module_runs_open_rows_only_and_skips_when_none_is_open():
    inner = _Count()
    gated = GatedModule(inner, "ffn").eval()
    x = torch.randn(3, 5, 4)
    gated.set_gate(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 2]))
    y = gated(x)
    assert inner.rows == [2]
    assert torch.allclose(y[[0, 2]], inner.lin(x[[0, 2]]), atol=1e-6)
    assert torch.equal(y[1], torch.zeros(5, 4))
    gated.set_gate(torch.zeros(3), torch.zeros(0, dtype=torch.long))
    assert torch.equal(gated(x), torch.zeros_like(x)) and inner.rows == [2]


def test_gated_module_scales_by_the_gate_in_training():
    inner = _Count()
    gated = GatedModule(inner, "ffn").train()
    x = torch.randn(2, 5, 4)
    gate = torch.tensor([1.0, 0.0], requires_grad=True)
    gated.set_gate(gate)
    y = gated(x)
    assert torch.equal(y[1], torch.zeros(5, 4))
    y.sum().backward()
    assert gate.grad[1] != 0  # the closed module still tells its gate its value


def test_gated_module_keeps_the_wrapped_modules_state_dict_keys():
    inner = torch.nn.Linear(4, 4)
    parent = torch.nn.Module()
    parent.ff = GatedModule(inner, "ffn")
    assert list(parent.state_dict()) == ["ff.weight", "ff.bias"]
    plain = torch.nn.Module()
    plain.ff = torch.nn.Linear(4, 4)
    parent.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(inner.weight, plain.ff.weight)


@pytest.mark.parametrize(
    "key,kwargs",
    [
        ("gate_threshold", dict(gate_threshold=0.0)),
        ("gate_threshold", dict(gate_threshold=1.0)),
        ("gate_type", dict(gate_type="layer")),
        ("gate_target_fraction", dict(gate_target_fraction=0.0)),
        ("gate_target_fraction", dict(gate_target_fraction=1.5)),
        ("gate_cost_weight", dict(gate_cost_weight=-1.0)),
        ("gate_tau_min", dict(gate_tau_min=2.0)),
    ],
)
def test_bad_gate_options_raise_naming_the_key(key, kwargs):
    opts = dict(
        gate_type="local",
        gate_threshold=0.5,
        gate_target_fraction=None,
        gate_cost_weight=1.0,
        gate_tau_init=1.0,
        gate_tau_min=0.5,
        gate_tau_decay=1e-4,
        gate_hidden_units=8,
    )
    opts.update(kwargs)
    with pytest.raises(ValueError, match=key):
        check_gate_options("i3d_conformer", **opts)
