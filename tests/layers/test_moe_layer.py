"""MoEFeedForward: exactness of routing and dispatch, aux losses, bad configs."""

import functools
import math
import warnings

import pytest
import torch
from espnet.nets.pytorch_backend.transformer.positionwise_feed_forward import (
    PositionwiseFeedForward,
)
from torch.utils._python_dispatch import TorchDispatchMode

from espnet_ext.layers import moe as moe_module
from espnet_ext.layers.aux_loss import collect_aux
from espnet_ext.layers.moe import DISPATCH, MoEFeedForward, dispatch_sorted

D, F, E = 8, 16, 4

# ``sorted`` picks its layout by device; test both layouts on CPU.
VARIANTS = {
    **DISPATCH,
    "sorted[gather]": functools.partial(dispatch_sorted, layout="gather"),
    "sorted[stream]": functools.partial(dispatch_sorted, layout="stream"),
}


@pytest.fixture(autouse=True)
def _all_dispatch_variants(monkeypatch):
    for name, fn in VARIANTS.items():
        monkeypatch.setitem(DISPATCH, name, fn)


def dense_oracle(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, combined with the sparse top-k weights."""
    tokens = x.reshape(-1, x.size(-1))
    _, weights, indices = moe.route(tokens)
    full = torch.zeros(tokens.size(0), moe.num_experts, dtype=tokens.dtype)
    full.scatter_(1, indices, weights)  # (N, E), zero for unselected experts
    outs = torch.stack([expert(tokens) for expert in moe.experts], dim=1)  # (N, E, D)
    return (full.unsqueeze(-1) * outs).sum(1).view_as(x)


def _moe(impl="reference", num_experts=E, top_k=2, seed=0, **kw):
    torch.manual_seed(seed)
    return MoEFeedForward(
        D, F, num_experts=num_experts, top_k=top_k, dropout_rate=0.0, impl=impl, **kw
    )


def _grads(module, x, fn):
    module.zero_grad()
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {
        n: p.grad.clone() if p.grad is not None else None
        for n, p in module.named_parameters()
    }
    return out.detach(), x.grad.clone(), grads


def assert_same_grads(got, expected):
    """Every parameter's gradient equal (``None`` only where expected is ``None``)."""
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_one_expert_top1_equals_espnet_dense_ffn():
    torch.manual_seed(0)
    dense = PositionwiseFeedForward(D, F, 0.0, torch.nn.ReLU())
    moe = _moe(num_experts=1, top_k=1)
    moe.experts[0].load_state_dict(dense.state_dict())
    x = torch.randn(3, 5, D)
    out_d, gx_d, _ = _grads(dense, x, dense)
    out_m, gx_m, g_m = _grads(moe, x, moe)
    torch.testing.assert_close(out_m, out_d, rtol=0, atol=0)
    torch.testing.assert_close(gx_m, gx_d, rtol=0, atol=0)
    # one expert: its weight is the constant 1, nothing for the router to learn
    assert g_m["router.weight"].abs().sum() == 0


@pytest.mark.parametrize("impl", sorted(VARIANTS))
@pytest.mark.parametrize("skew", [0.0, 20.0])
def test_dispatch_matches_dense_oracle_outputs_and_gradients(impl, skew):
    moe = _moe(impl)
    with torch.no_grad():  # skew: experts 0 and 1 take (almost) every token
        moe.router.weight[:2] += skew
    x = torch.randn(2, 7, D).abs()
    out, gx, g = _grads(moe, x, moe)
    ref_out, ref_gx, ref_g = _grads(moe, x, lambda t: dense_oracle(moe, t))
    if skew:
        assert all(g[f"experts.{e}.w_1.weight"].abs().sum() == 0 for e in (2, 3))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gx, ref_gx)
    assert_same_grads(g, ref_g)


@pytest.mark.parametrize("impl", sorted(VARIANTS))
def test_unused_experts_get_zero_not_missing_gradients(impl):
    moe = _moe(impl)
    with torch.no_grad():
        moe.router.weight[:2] += 100.0
    _, _, g = _grads(moe, torch.randn(4, D).abs(), moe)
    assert all(v is not None for v in g.values())  # DDP needs every parameter used


def test_token_output_does_not_depend_on_other_tokens():
    moe = _moe()
    x = torch.randn(6, D)
    torch.testing.assert_close(moe(x)[2:3], moe(x[2:3]))


def test_router_runs_in_fp32_and_weights_sum_to_one():
    moe = _moe().to(torch.bfloat16)
    logits, weights, indices = moe.route(torch.randn(5, D, dtype=torch.bfloat16))
    assert logits.dtype == torch.float32 and indices.shape == (5, 2)
    torch.testing.assert_close(
        weights.float().sum(-1), torch.ones(5), atol=1e-2, rtol=0
    )


def test_uniform_router_gives_balance_one_and_z_log_e_squared():
    moe = _moe().train()
    torch.nn.init.zeros_(moe.router.weight)
    moe(torch.randn(10, D))
    aux = collect_aux(moe)
    torch.testing.assert_close(aux.losses["moe_balance"], torch.tensor(1.0))
    torch.testing.assert_close(aux.losses["moe_z"], torch.tensor(math.log(E) ** 2))


def test_padded_frames_are_left_out_of_aux_losses():
    moe = _moe().train()
    x = torch.randn(2, 5, D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    moe.set_token_mask(mask)
    moe(x)
    masked = collect_aux(moe)
    moe.set_token_mask(None)
    moe(x[mask])  # the real frames only
    real = collect_aux(moe)
    for name in ("moe_balance", "moe_z"):
        torch.testing.assert_close(masked.losses[name], real.losses[name])


def test_nothing_is_recorded_in_eval_mode():
    moe = _moe().eval()
    moe(torch.randn(4, D))
    assert collect_aux(moe).losses == {}


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=2, top_k=3), "top_k"),
        (dict(impl="fast"), "moe_impl must be one of"),
    ],
)
def test_bad_configuration_raises(kw, message):
    with pytest.raises(ValueError, match=message):
        MoEFeedForward(D, F, **kw)


@pytest.mark.parametrize("impl", ["sorted[gather]", "sorted[stream]"])
def test_sorted_equals_reference_outputs_and_gradients_with_empty_experts(impl):
    ref = _moe("reference", num_experts=8, top_k=2, seed=3)
    fast = _moe(impl, num_experts=8, top_k=2, seed=4)
    fast.load_state_dict(ref.state_dict())
    with torch.no_grad():  # experts 5..7 get no token at all
        ref.router.weight[5:] -= 50.0
        fast.router.weight.copy_(ref.router.weight)
    x = torch.randn(3, 11, D).abs()  # positive inputs: the -50 rows never win
    out_r, gx_r, g_r = _grads(ref, x, ref)
    out_f, gx_f, g_f = _grads(fast, x, fast)
    assert g_f["experts.7.w_2.weight"].abs().sum() == 0
    torch.testing.assert_close(out_f, out_r)
    torch.testing.assert_close(gx_f, gx_r)
    assert_same_grads(g_f, g_r)


@pytest.mark.parametrize("impl", sorted(VARIANTS))
def test_utterance_output_independent_of_batch_neighbours_and_padding(impl):
    # Routing is per token, so an utterance's frames get the same output alone or
    # inside a padded batch. (ESPnet's conformer as a whole is not padding invariant:
    # its convolution module does not mask padded frames; the MoE layers add nothing.)
    moe = _moe(impl).eval()
    utt = torch.randn(1, 5, D)
    batch = torch.cat([torch.cat([utt, torch.zeros(1, 4, D)], 1), torch.randn(1, 9, D)])
    torch.testing.assert_close(moe(batch)[:1, :5], moe(utt))


def test_unknown_sorted_layout_raises():
    moe = _moe()
    x = torch.randn(4, D)
    _, weights, indices = moe.route(x)
    with pytest.raises(ValueError, match="layout"):
        dispatch_sorted(x, weights, indices, moe.experts, layout="scatter")


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_task_loss_trains_the_router_for_every_top_k(top_k):
    moe = _moe(top_k=top_k)
    _, _, g = _grads(moe, torch.randn(6, D), moe)
    assert g["router.weight"].abs().sum() > 0


def test_top1_weight_is_the_full_softmax_probability_of_the_chosen_expert():
    moe = _moe(top_k=1)
    logits, weights, indices = moe.route(torch.randn(5, D))
    probs = logits.softmax(-1)
    torch.testing.assert_close(weights[:, 0], probs.max(-1).values)
    assert torch.equal(indices[:, 0], probs.argmax(-1))


@pytest.mark.parametrize("impl", sorted(VARIANTS))
@pytest.mark.parametrize("shape", [(0, D), (2, 0, D)])
def test_empty_input_gives_empty_output_and_finite_aux(impl, shape):
    moe = _moe(impl).train()
    x = torch.randn(*shape, requires_grad=True)
    out = moe(x)
    out.sum().backward()
    aux = collect_aux(moe)
    assert out.shape == shape and x.grad.shape == shape
    assert all(torch.isfinite(v) for v in [*aux.losses.values(), *aux.stats.values()])


@pytest.mark.parametrize("impl", sorted(VARIANTS))
def test_autocast_output_matches_reference_under_bf16(impl):
    # The weighted k-way sum runs in fp32 in every dispatch; only the experts run in
    # bf16, on the same rows, so every dispatch gives the reference's result.
    ref = _moe("reference")
    fast = _moe(impl)
    x = torch.randn(3, 11, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_r, out_f = ref(x), fast(x)
    assert out_f.dtype == torch.float32
    torch.testing.assert_close(out_f, out_r)


# Ops that make the host wait for a CUDA device: data-dependent output sizes
# (nonzero, boolean indexing, unique, bincount, tensor repeat_interleave) or a value
# read back (item / _local_scalar_dense, is_nonzero, equal).
_SYNCING_OPS = {
    "aten::nonzero",
    "aten::masked_select",
    "aten::bincount",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim",
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::equal",
    "aten::repeat_interleave",
}


class _SyncingOps(TorchDispatchMode):
    """Records the ops below autograd that would synchronise on CUDA."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_index = name in ("aten::index", "aten::index_put", "aten::index_put_")
        if name in _SYNCING_OPS or (
            bool_index
            and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] or ())
            )
        ):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


def _count_syncs(moe, x, monkeypatch):
    """(syncing aten ops, block_sizes calls) in one training forward and backward."""
    calls = []

    def counting_block_sizes(counts):
        calls.append(counts.shape)
        return counts.tolist()

    monkeypatch.setattr(moe_module, "block_sizes", counting_block_sizes)
    with _SyncingOps() as mode:
        moe(x).sum().backward()
    return mode.found, len(calls)


@pytest.mark.parametrize("impl", ["sorted", "sorted[gather]", "sorted[stream]"])
def test_sorted_training_step_has_one_host_sync(impl, monkeypatch):
    moe = _moe(impl).train()
    moe.set_token_mask(torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))
    ops, block_size_syncs = _count_syncs(
        moe, torch.randn(2, 4, D, requires_grad=True), monkeypatch
    )
    assert ops == [] and block_size_syncs == 1


def test_sync_counter_sees_the_reference_loops_nonzero_per_expert(monkeypatch):
    ops, _ = _count_syncs(_moe("reference").eval(), torch.randn(5, D), monkeypatch)
    assert ops == ["aten::nonzero"] * E


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sorted_training_forward_has_one_cuda_sync():
    moe = _moe("sorted").cuda().train()
    x = torch.randn(2, 7, D, device="cuda")
    moe.set_token_mask(torch.ones(2, 7, dtype=torch.bool, device="cuda"))
    moe(x)  # warm-up: one-time initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            moe(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


def test_data_parallel_replicas_keep_their_own_aux_records():
    # nn.DataParallel builds replicas with _replicate_for_data_parallel, which copies
    # __dict__ shallowly; a record list kept there would be shared by all replicas
    # once the original module has one (any direct forward creates it, e.g.
    # ESPnet's attention plots run the unreplicated model).
    moe = _moe().train()
    moe(torch.randn(3, D))
    collect_aux(moe)
    first, second = (moe._replicate_for_data_parallel() for _ in range(2))
    first._parameters = second._parameters = dict(moe._parameters)
    first(torch.randn(3, D))
    assert len(first._aux_buffer()) > 0
    assert second._aux_buffer() == [] and moe._aux_buffer() == []


def test_mismatched_token_mask_is_an_error_in_training():
    moe = _moe().train()
    moe.set_token_mask(torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"token mask of shape \(2, 5\)"):
        moe(torch.randn(2, 4, D))
