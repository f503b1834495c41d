"""i3d_conformer / i3d_transformer: ESPnet's encoders with per-utterance gates.

The backbone: all gates open == ESPnet's plain encoder with the same weights; a
closed module is never called; batched decisions == one utterance at a time; the
depth cost trains the gate predictors; checkpoints round-trip.
"""

import logging

import pytest
import torch
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder
from espnet2.asr.encoder.transformer_encoder import TransformerEncoder

from espnet_ext.encoders.i3d_conformer import I3DConformerEncoder
from espnet_ext.encoders.i3d_transformer import I3DTransformerEncoder
from espnet_ext.layers.aux_loss import collect_aux
from espnet_ext.layers.gates import GatedModule

IDIM = 8
CONFORMER = dict(
    output_size=16,
    attention_heads=2,
    linear_units=24,
    num_blocks=2,
    macaron_style=True,
    rel_pos_type="latest",
    cnn_module_kernel=3,
    dropout_rate=0.0,
    positional_dropout_rate=0.0,
)
TRANSFORMER = dict(
    output_size=16,
    attention_heads=2,
    linear_units=24,
    num_blocks=3,
    dropout_rate=0.0,
    positional_dropout_rate=0.0,
)
KINDS = {
    "conformer": (I3DConformerEncoder, ConformerEncoder, CONFORMER),
    "transformer": (I3DTransformerEncoder, TransformerEncoder, TRANSFORMER),
}


def _pair(kind, **gate_kwargs):
    ours, plain_cls, conf = KINDS[kind]
    torch.manual_seed(0)
    plain = plain_cls(IDIM, **conf)
    enc = ours(IDIM, **conf, **gate_kwargs)
    missing, unexpected = enc.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == []
    assert all(k.startswith("gate_") for k in missing), missing
    return enc, plain


def _inputs(lengths=(40, 31, 22)):
    torch.manual_seed(1)
    return torch.randn(len(lengths), max(lengths), IDIM), torch.tensor(lengths)


@pytest.mark.parametrize("kind", ["conformer", "transformer"])
@pytest.mark.parametrize("mode", ["forced", "predicted"])
def test_all_gates_open_equals_espnet_plain_encoder(kind, mode):
    enc, plain = _pair(kind, gate_init_bias=30.0)  # predicted: P(open) = 1
    if mode == "forced":
        enc.force_gates("open")
    x, ilens = _inputs()
    for train in (False, True):
        enc.train(train)
        plain.train(train)
        out, olens, _ = enc(x, ilens)
        ref, ref_lens, _ = plain(x, ilens)
        assert torch.equal(olens, ref_lens)
        assert torch.allclose(out, ref, atol=1e-6), (out - ref).abs().max()
    # the equivalence cannot pass vacuously: closing a module changes the output
    enc.eval().force_gates("closed")
    assert not torch.allclose(enc(x, ilens)[0], plain.eval()(x, ilens)[0], atol=1e-3)


@pytest.mark.parametrize("kind", ["conformer", "transformer"])
def test_closed_modules_are_never_called(kind):
    enc, _ = _pair(kind)
    enc.eval()
    calls = {}
    for i, block in enumerate(enc.encoders):
        for m in block.children():
            if isinstance(m, GatedModule):
                key = (i, m.kind, id(m))
                calls[key] = []
                m.module.register_forward_hook(
                    lambda mod, inp, out, key=key: calls[key].append(inp[0].size(0))
                )
    slots = enc.gate_slots()
    pattern = [j % 2 == 0 for j in range(len(slots))]  # every other module open
    enc.force_gates(pattern)
    x, ilens = _inputs()
    enc(x, ilens)
    batches = list(calls.values())
    assert [len(b) > 0 for b in batches] == pattern
    enc.force_gates("closed")
    for b in batches:
        b.clear()
    out, _, _ = enc(x, ilens)
    assert all(b == [] for b in batches)
    # with every module closed only the input layer and final norm ran
    assert torch.isfinite(out).all()


def _mixed_encoder(kind, gate_type, x, ilens, input_layer):
    """Random predictors and a threshold in the widest gap between the utterances'
    P(open) of one first-block module: that module runs on some utterances only."""
    ours, _, conf = KINDS[kind]
    torch.manual_seed(2)
    conf = dict(conf, input_layer=input_layer)
    enc = ours(IDIM, **conf, gate_type=gate_type, gate_init_bias=0.0).eval()
    with torch.no_grad():
        enc(x, ilens)
    best = (0.0, 0.5)
    for col, (block, _, _) in enumerate(enc.gate_slots()):
        if block != 0:  # later blocks' P(open) depend on earlier decisions
            continue
        probs = enc.last_gates[0][:, col].sort().values
        gaps = probs[1:] - probs[:-1]
        j = int(gaps.argmax())
        best = max(best, (float(gaps[j]), float(probs[j] + probs[j + 1]) / 2))
    assert best[0] > 1e-4, best  # decisions cannot flip on rounding
    enc.set_gate_threshold(best[1])
    return enc


@pytest.mark.parametrize(
    "kind,lengths,input_layer",
    [
        # ESPnet's conv2d subsampling counts one more valid frame for a padded
        # utterance than for the same one alone (its mask is sliced [:-2:2] of the
        # padded length), and the conformer's convolution sees padded frames: both
        # make ESPnet's own encoders padding-dependent. Different lengths through a
        # linear input layer, equal lengths through conv2d isolate the gating.
        ("transformer", (40, 31, 22, 36), "linear"),
        ("conformer", (33, 33, 33, 33), "conv2d"),
    ],
)
@pytest.mark.parametrize("gate_type", ["local", "global"])
def test_batched_decisions_and_outputs_equal_one_by_one(
    kind, lengths, input_layer, gate_type
):
    torch.manual_seed(3)
    x = torch.randn(len(lengths), max(lengths), IDIM)
    ilens = torch.tensor(lengths)
    enc = _mixed_encoder(kind, gate_type, x, ilens, input_layer)
    with torch.no_grad():
        out, olens, _ = enc(x, ilens)
        probs, dec = enc.last_gates
        for b, n in enumerate(lengths):
            one, one_len, _ = enc(x[b : b + 1, :n], ilens[b : b + 1])
            assert torch.allclose(out[b, : one_len[0]], one[0], atol=1e-5)
            assert torch.equal(enc.last_gates[1][0], dec[b])
            assert torch.allclose(enc.last_gates[0][0], probs[b], atol=1e-5)
    # the subset path really ran: some module was open for some utterances only
    column_sums = dec.sum(0)
    assert ((column_sums > 0) & (column_sums < len(lengths))).any(), dec


@pytest.mark.parametrize("gate_type", ["local", "global"])
@pytest.mark.parametrize("target", [None, 0.3])
def test_depth_cost_has_gradients_into_the_gate_predictors(gate_type, target):
    ours, _, conf = KINDS["conformer"]
    enc = ours(IDIM, **conf, gate_type=gate_type, gate_target_fraction=target).train()
    x, ilens = _inputs()
    enc(x, ilens)
    aux = collect_aux(enc)
    assert set(aux.stats) >= {"enc_i3d_attn", "enc_i3d_ffn", "enc_i3d_conv"}
    cost = aux.losses["enc_i3d_depth"]
    cost.backward()
    grads = [p.grad for p in enc.gate_predictor.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_asr_loss_reaches_the_predictors_through_the_straight_through_gates():
    enc, _ = _pair("transformer", gate_init_bias=0.0)
    enc.train()
    x, ilens = _inputs()
    out, _, _ = enc(x, ilens)
    out.pow(2).sum().backward()
    grads = [p.grad for p in enc.gate_predictor.parameters()]
    assert sum(g.abs().sum() for g in grads if g is not None) > 0


def test_statistics_count_executed_modules_per_utterance_and_log_them(caplog):
    enc, _ = _pair("conformer")
    enc.eval()
    # 2 blocks x (macaron FFN, attention, conv, FFN): close both attentions and
    # one FFN of block 0
    enc.force_gates([False, False, True, True, True, False, True, True])
    x, ilens = _inputs()
    with caplog.at_level(logging.INFO, logger="espnet_ext.encoders.i3d_common"):
        enc(x, ilens)
    stats = collect_aux(enc).stats
    assert stats["enc_i3d_attn"] == 0 and stats["enc_i3d_ffn"] == 3
    assert stats["enc_i3d_conv"] == 2
    assert "attn 0.00/2, ffn 3.00/4, conv 2.00/2" in caplog.text
    assert enc.gate_summary() == {"attn": 0.0, "ffn": 3.0, "conv": 2.0, "utterances": 3}


def test_threshold_is_changeable_after_training():
    # global gates: the probabilities do not depend on earlier decisions
    ours, _, conf = KINDS["transformer"]
    enc = ours(IDIM, **conf, gate_type="global", gate_init_bias=0.0).eval()
    x, ilens = _inputs()
    enc(x, ilens)
    values = enc.last_gates[0].flatten().unique()  # sorted
    assert len(values) >= 4, values
    mids = (values[1:] + values[:-1]) / 2  # each separates two distinct values
    executed = []
    for t in (mids[0], mids[len(mids) // 2], mids[-1]):
        enc.set_gate_threshold(float(t))
        enc(x, ilens)
        executed.append(enc.last_gates[1].sum().item())
    assert executed[0] > executed[1] > executed[2], executed
    with pytest.raises(ValueError, match="gate_threshold"):
        enc.set_gate_threshold(1.0)


def test_checkpoint_round_trip_keeps_the_temperature_schedule():
    enc, _ = _pair("conformer", gate_type="global", gate_tau_decay=0.1)
    enc.train()
    x, ilens = _inputs()
    for _ in range(3):
        enc(x, ilens)
    fresh, _ = _pair("conformer", gate_type="global", gate_tau_decay=0.1)
    result = fresh.load_state_dict(enc.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert int(fresh.gate_step) == 3
    assert fresh.temperature() == enc.temperature() < 1.0


def test_intermediate_ctc_contract_is_kept():
    ours, _, conf = KINDS["transformer"]
    enc = ours(IDIM, **conf, interctc_layer_idx=[1]).eval()
    (out, inter), _, _ = enc(*_inputs())
    assert inter[0][0] == 1 and inter[0][1].shape == out.shape


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(gate_threshold=0.0), "gate_threshold"),
        (dict(gate_threshold=1.5), "gate_threshold"),
        (dict(gate_type="layerwise"), "gate_type"),
        (dict(gate_target_fraction=0.0), "gate_target_fraction"),
        (dict(gate_target_fraction=1.01), "gate_target_fraction"),
        (dict(normalize_before=False), "normalize_before"),
        (dict(concat_after=True), "concat_after"),
    ],
)
@pytest.mark.parametrize("kind", ["conformer", "transformer"])
def test_bad_options_raise_a_value_error_naming_the_key(kind, kwargs, key):
    ours, _, conf = KINDS[kind]
    with pytest.raises(ValueError, match=key):
        ours(IDIM, **conf, **kwargs)


def test_target_fraction_of_one_is_accepted():
    ours, _, conf = KINDS["transformer"]
    ours(IDIM, **conf, gate_target_fraction=1.0)
