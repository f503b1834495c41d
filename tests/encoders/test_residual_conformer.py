"""residual_conformer: ESPnet's conformer with W = W_shared + A B + diag(d) matrices."""

import copy
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder
from espnet2.torch_utils.initialize import initialize
from residual_util import copy_dense_into_k1, n_params, perturb

from espnet_ext.encoders.residual_conformer import ResidualConformerEncoder
from espnet_ext.layers.residual_linear import ResidualConv1x1, ResidualLinear

CONF = dict(
    input_size=12,
    output_size=16,
    attention_heads=2,
    linear_units=24,
    num_blocks=3,
    macaron_style=True,
    rel_pos_type="latest",
    cnn_module_kernel=5,
    dropout_rate=0.0,
    positional_dropout_rate=0.0,
)
RESIDUAL_KEYS = (
    "share_group_size",
    "share_remainder",
    "lowrank_rank",
    "use_diagonal",
    "residual_targets",
    "residual_impl",
    "init_from_dense",
)


def _build(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"share_group_size": 3, "lowrank_rank": 2, **kw}
    return ResidualConformerEncoder(**{**CONF, **kw})


def _inputs():
    torch.manual_seed(1)
    return torch.randn(2, 40, 12), torch.tensor([40, 31])


def _dense(seed=5, **kw):
    torch.manual_seed(seed)
    return ConformerEncoder(**{**CONF, **kw})


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_k1_zero_lowrank_zero_diagonal_equals_espnet_conformer(mode):
    dense = _dense()
    res = _build(share_group_size=1)
    copy_dense_into_k1(res, dense)
    getattr(dense, mode)(), getattr(res, mode)()
    xs, ilens = _inputs()
    with torch.no_grad():  # eval: res runs merged weights, train: materialised ones
        ref, ref_lens, _ = dense(xs, ilens)
        out, out_lens, _ = res(xs, ilens)
    torch.testing.assert_close(out, ref)
    assert torch.equal(out_lens, ref_lens)
    assert res.merged == (mode == "eval")


def test_every_block_matrix_is_reparameterised_by_default():
    enc = _build()
    block = enc.encoders[0]
    for m in (
        block.self_attn.linear_q,
        block.self_attn.linear_k,
        block.self_attn.linear_v,
        block.self_attn.linear_out,
        block.self_attn.linear_pos,
        block.feed_forward.w_1,
        block.feed_forward.w_2,
        block.feed_forward_macaron.w_1,
        block.feed_forward_macaron.w_2,
    ):
        assert type(m) is ResidualLinear
    assert isinstance(block.conv_module.pointwise_conv1, ResidualConv1x1)
    assert isinstance(block.conv_module.pointwise_conv2, ResidualConv1x1)
    assert isinstance(block.conv_module.depthwise_conv, torch.nn.Conv1d)


def test_targets_subset_leaves_the_other_matrices_dense():
    enc = _build(residual_targets=["attn_q", "ffn_in"])
    block = enc.encoders[0]
    assert isinstance(block.self_attn.linear_q, ResidualLinear)
    assert isinstance(block.feed_forward_macaron.w_1, ResidualLinear)
    assert type(block.self_attn.linear_k) is torch.nn.Linear
    assert type(block.feed_forward.w_2) is torch.nn.Linear
    assert type(block.conv_module.pointwise_conv1) is torch.nn.Conv1d


def test_shared_weights_are_one_tensor_object_per_group():
    enc = _build(num_blocks=4, share_group_size=2)
    q = [block.self_attn.linear_q.shared.weight for block in enc.encoders]
    assert q[0] is q[1] and q[2] is q[3] and q[1] is not q[2]
    assert enc.shared_weights()["self_attn.linear_q"] == [q[0], q[2]]
    # counted once: named_parameters lists each shared tensor a single time
    named = [n for n, p in enc.named_parameters() if p is q[0]]
    assert named == ["residual_shared.self_attn.linear_q.0.weight"]


def test_macaron_ffns_have_separate_shared_weights():
    block = _build().encoders[0]
    assert block.feed_forward.w_1.shared is not block.feed_forward_macaron.w_1.shared


def test_gradients_reach_shared_lowrank_and_diagonal_parts():
    enc = _build().train()
    perturb(enc)  # A != 0, else B's gradient A^T dW is zero at the start
    out, _, _ = enc(*_inputs())
    out.square().sum().backward()
    for layer in enc.residual_layers():
        for p in (layer.shared.weight, layer.lowrank_a, layer.lowrank_b, layer.diag):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_state_dict_round_trips_with_no_missing_or_unexpected_keys():
    a = _build(seed=0).eval()
    perturb(a)
    b = _build(seed=1).eval()
    missing, unexpected = b.load_state_dict(a.state_dict(), strict=False)
    assert missing == [] and unexpected == []
    xs, ilens = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(b(xs, ilens)[0], a(xs, ilens)[0], rtol=0, atol=0)


def test_state_dict_saves_each_shared_weight_once():
    enc = _build(num_blocks=4, share_group_size=2)
    keys = [k for k in enc.state_dict() if k.startswith("residual_shared.")]
    # 11 matrix families (q k v out pos, 2x2 FFN, 2 pointwise convs) x 2 groups
    assert len(keys) == 11 * 2
    assert not any("merged" in k for k in enc.state_dict())


def test_merged_equals_unmerged_and_the_merge_happens_in_eval_without_grad():
    enc = _build().eval()
    perturb(enc)
    xs, ilens = _inputs()
    unmerged = enc(xs, ilens)[0]  # grad enabled: never the cache
    assert not enc.merged
    with torch.no_grad():
        merged = enc(xs, ilens)[0]
    assert enc.merged
    torch.testing.assert_close(merged, unmerged)


def test_load_state_dict_after_merge_is_picked_up():
    enc = _build(seed=0).eval()
    other = _build(seed=1).eval()
    perturb(other)
    xs, ilens = _inputs()
    with torch.no_grad():
        enc(xs, ilens)
        enc.load_state_dict(other.state_dict())
        torch.testing.assert_close(enc(xs, ilens)[0], other(xs, ilens)[0])


def test_merge_in_training_mode_is_an_error_and_train_unmerges():
    enc = _build()
    with pytest.raises(RuntimeError, match="eval mode"):
        enc.train().merge()
    enc.eval().merge()
    assert enc.merged
    enc.train()
    assert not enc.merged


def test_parameter_formula_matches_the_measured_count():
    dense = _dense(num_blocks=4)
    enc = _build(num_blocks=4, share_group_size=2)
    expected, text = enc.parameter_formula(n_params(dense))
    assert expected == n_params(enc) and str(expected) in text


def test_espnet_initialize_keeps_a_fresh_block_equal_to_its_shared_weight():
    enc = _build()
    initialize(enc, "xavier_uniform")
    for layer in enc.residual_layers():
        assert not layer.lowrank_a.any() and not layer.diag.any()


@pytest.mark.parametrize("layer_idx", [[1], [1, 2]])
def test_interctc_outputs_equal_espnet_with_copied_weights(layer_idx):
    dense = _dense(interctc_layer_idx=layer_idx).eval()
    res = _build(share_group_size=1, interctc_layer_idx=layer_idx).eval()
    copy_dense_into_k1(res, dense)
    xs, ilens = _inputs()
    with torch.no_grad():
        (ref, ref_inter), _, _ = dense(xs, ilens)
        (out, inter), _, _ = res(xs, ilens)
    torch.testing.assert_close(out, ref)
    assert [i for i, _ in inter] == [i for i, _ in ref_inter] == layer_idx
    for (_, h), (_, h_ref) in zip(inter, ref_inter):
        torch.testing.assert_close(h, h_ref)


def test_return_all_hs_equals_espnet_with_copied_weights():
    dense = _dense().eval()
    res = _build(share_group_size=1).eval()
    copy_dense_into_k1(res, dense)
    xs, ilens = _inputs()
    with torch.no_grad():
        (ref, ref_hs), _, _ = dense(xs, ilens, return_all_hs=True)
        (out, hs), _, _ = res(xs, ilens, return_all_hs=True)
    assert len(hs) == len(ref_hs) == CONF["num_blocks"]
    for h, h_ref in zip(hs, ref_hs):
        torch.testing.assert_close(h, h_ref)


def test_init_from_dense_with_k1_reproduces_the_dense_encoder():
    dense = _dense().eval()
    res = _build(share_group_size=1).eval()
    errors = res.load_dense(dense.state_dict())
    assert max(errors.values()) < 1e-6
    xs, ilens = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(res(xs, ilens)[0], dense(xs, ilens)[0])


def test_init_from_dense_error_is_the_truncated_svd_tail():
    dense = _dense()
    res = _build(share_group_size=3, lowrank_rank=2)
    res.load_dense({f"encoder.{k}": v for k, v in dense.state_dict().items()})
    for path in ("self_attn.linear_q", "conv_module.pointwise_conv1"):
        ws = [
            dense.encoders[i].get_submodule(path).weight.squeeze(-1) for i in range(3)
        ]
        mean = torch.stack(ws).mean(0)
        for i, w in enumerate(ws):
            layer = res.encoders[i].get_submodule(path)
            tail = torch.linalg.svdvals((w - mean).double())[2:].norm()
            err = (layer.effective_weight() - w).double().norm()
            torch.testing.assert_close(err, tail, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(
                layer.bias, dense.encoders[i].get_submodule(path).bias
            )


def test_init_from_dense_is_applied_at_the_first_training_forward(tmp_path):
    dense = _dense()
    path = tmp_path / "dense.pth"
    torch.save({f"encoder.{k}": v for k, v in dense.state_dict().items()}, path)
    res = _build(share_group_size=1, init_from_dense=str(path))
    w = res.encoders[0].self_attn.linear_q.shared.weight
    assert not torch.equal(w, dense.encoders[0].self_attn.linear_q.weight)
    res.train()(*_inputs())
    assert torch.equal(w, dense.encoders[0].self_attn.linear_q.weight)


def test_loaded_weights_win_over_init_from_dense(tmp_path):
    """Resume, --init_param of the whole model and decoding load a state dict after
    the model is built: then the dense file is never read (it may not exist)."""
    trained = _build(seed=7)
    res = _build(init_from_dense=str(tmp_path / "gone.pth"))
    res.load_state_dict(trained.state_dict())
    res.train()(*_inputs())
    for a, b in zip(res.parameters(), trained.parameters()):
        assert torch.equal(a, b)


def test_missing_init_from_dense_file_raises_naming_the_key(tmp_path):
    res = _build(init_from_dense=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="init_from_dense"):
        res.train()(*_inputs())


def test_init_from_dense_of_another_architecture_raises_naming_the_key():
    dense = _dense(num_blocks=2)
    with pytest.raises(ValueError, match="init_from_dense"):
        _build().load_dense(dense.state_dict())


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(lowrank_rank=16), "lowrank_rank"),  # = min dim of the 16x16 matrices
        (dict(lowrank_rank=-1), "lowrank_rank"),
        (dict(share_group_size=0), "share_group_size"),
        (dict(share_group_size=2), "share_group_size"),  # 3 blocks, remainder error
        (dict(share_group_size=2, share_remainder="drop"), "share_remainder"),
        (dict(residual_targets=["attn_qq"]), "residual_targets"),
        (dict(residual_targets=[]), "residual_targets"),
        (dict(residual_targets=["conv_pw1"], use_cnn_module=False), "residual_targets"),
        (dict(positionwise_layer_type="conv1d"), "residual_targets"),
        (dict(residual_impl="fast"), "residual_impl"),
    ],
)
def test_bad_configuration_raises_naming_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        _build(**kw)


def test_remainder_rule_last_smaller_makes_a_smaller_last_group():
    enc = _build(share_group_size=2, share_remainder="last_smaller")
    q = [block.self_attn.linear_q.shared for block in enc.encoders]
    assert q[0] is q[1] and q[2] is not q[1]
    enc = _build(share_group_size=2, share_remainder="merge_last")
    q = [block.self_attn.linear_q.shared for block in enc.encoders]
    assert q[0] is q[1] is q[2]


def test_deepcopy_keeps_the_sharing_inside_the_copy():
    enc = _build()
    twin = copy.deepcopy(enc)
    q = [block.self_attn.linear_q.shared.weight for block in twin.encoders]
    assert q[0] is q[2] and q[0] is twin.residual_shared.self_attn.linear_q[0].weight
    assert q[0] is not enc.encoders[0].self_attn.linear_q.shared.weight


@pytest.mark.parametrize(
    "config",
    [
        "conf/train_asr_residual_conformer.yaml",
        "conf/train_st_residual_conformer.yaml",
        "egs2/speechocean762/asr1/conf/tuning/train_asr_residual_conformer.yaml",
    ],
)
def test_shipped_config_encoder_is_at_most_040_of_the_dense_one(config):
    conf = yaml.safe_load((REPO / config).read_text())
    n_mels = (conf.get("frontend_conf") or {}).get("n_mels", 80)
    enc_conf = conf["encoder_conf"]
    dense_conf = {k: v for k, v in enc_conf.items() if k not in RESIDUAL_KEYS}
    res = ResidualConformerEncoder(n_mels, **enc_conf)
    dense = ConformerEncoder(n_mels, **dense_conf)
    assert n_params(res) <= 0.40 * n_params(dense), n_params(res) / n_params(dense)
    assert Path(REPO / config).is_file()


def test_data_parallel_replica_uses_its_own_shared_weights(monkeypatch):
    """nn.DataParallel (ESPnet with ngpu > 1 without DDP) replicates modules by
    copying their __dict__; the layers must then use the replica's shared weights.
    torch's own replicate() runs here on CPU with a cloning stand-in for the CUDA
    broadcast."""
    import importlib

    replicate = importlib.import_module("torch.nn.parallel.replicate")

    def clone_to(tensors, devices, detach=False):
        return [
            [t.detach().clone() if detach else t.clone() for t in tensors]
            for _ in devices
        ]

    monkeypatch.setattr(replicate, "_broadcast_coalesced_reshape", clone_to)
    monkeypatch.setattr(replicate, "_get_device_index", lambda d, optional=False: d)
    enc = _build()
    replica = replicate.replicate(enc, [0, 1])[1]
    replica(*_inputs())[0].sum().backward()
    bank = replica.residual_shared.self_attn.linear_q
    assert all(b.self_attn.linear_q.shared is bank[0] for b in replica.encoders)
    assert bank[0] is not enc.residual_shared.self_attn.linear_q[0]
    assert enc.residual_shared.self_attn.linear_q[0].weight.grad is not None
