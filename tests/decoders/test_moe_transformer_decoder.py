"""moe_transformer: ESPnet's transformer decoder with MoE FFNs, beam-search ready."""

import pytest
import torch
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
from espnet.nets.pytorch_backend.transformer.mask import subsequent_mask

from espnet_ext.decoders.moe_transformer import MoETransformerDecoder
from espnet_ext.layers.aux_loss import collect_aux
from espnet_ext.layers.moe import MoEFeedForward

V, D = 11, 16
CONF = dict(
    vocab_size=V,
    encoder_output_size=D,
    attention_heads=2,
    linear_units=24,
    num_blocks=2,
    dropout_rate=0.0,
    positional_dropout_rate=0.0,
)


def _pair():
    torch.manual_seed(0)
    dense = TransformerDecoder(**CONF).eval()
    moe = MoETransformerDecoder(**CONF, num_experts=1, top_k=1).eval()
    state = {
        k.replace(".feed_forward.", ".feed_forward.experts.0."): v
        for k, v in dense.state_dict().items()
    }
    state.update(
        {k: v for k, v in moe.state_dict().items() if k.endswith("router.weight")}
    )
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert missing == [] and unexpected == []
    return dense, moe


def test_one_expert_equals_espnet_transformer_decoder():
    dense, moe = _pair()
    torch.manual_seed(1)
    hs, hlens = torch.randn(2, 9, D), torch.tensor([9, 6])
    ys, ylens = torch.randint(0, V, (2, 5)), torch.tensor([5, 3])
    torch.testing.assert_close(
        moe(hs, hlens, ys, ylens)[0], dense(hs, hlens, ys, ylens)[0], rtol=0, atol=0
    )


def test_first_batch_score_with_one_expert_equals_espnet():
    dense, moe = _pair()
    torch.manual_seed(2)
    ys, xs = torch.randint(0, V, (3, 4)), torch.randn(3, 7, D)
    states = [None] * 3
    torch.testing.assert_close(
        moe.batch_score(ys, states, xs)[0],
        dense.batch_score(ys, states, xs)[0],
        rtol=0,
        atol=0,
    )


def test_all_ffns_are_moe_and_report_decoder_stats():
    dec = MoETransformerDecoder(**CONF, num_experts=4, top_k=2).train()
    assert all(isinstance(layer.feed_forward, MoEFeedForward) for layer in dec.decoders)
    hs, hlens = torch.randn(2, 9, D), torch.tensor([9, 6])
    dec(hs, hlens, torch.randint(0, V, (2, 5)), torch.tensor([5, 3]))
    aux = collect_aux(dec)
    assert {"dec_moe_balance", "dec_moe_z"} <= aux.losses.keys()
    assert {"dec_moe_load_entropy", "dec_moe_frac_e3"} <= aux.stats.keys()


def _moe_decoder(seed=0, **kw):
    torch.manual_seed(seed)
    return MoETransformerDecoder(**CONF, num_experts=4, top_k=2, **kw)


def _batch():
    torch.manual_seed(1)
    hs, hlens = torch.randn(2, 9, D), torch.tensor([9, 6])
    return hs, hlens, torch.randint(0, V, (2, 5)), torch.tensor([5, 3])


def test_cached_batch_score_step_by_step_equals_full_recompute():
    # E=4, k=2: routing runs, and from step 2 on the cached path feeds each layer
    # only the newest position; its scores must equal a recompute over the prefix.
    dec = _moe_decoder().eval()
    torch.manual_seed(3)
    xs = torch.randn(3, 7, D)
    ys = torch.full((3, 1), V - 1)  # <sos/eos>
    states = [None] * 3
    for _ in range(4):
        logp, states = dec.batch_score(ys, states, xs)
        full, _ = dec.forward_one_step(
            ys, subsequent_mask(ys.size(1)).unsqueeze(0), xs, cache=None
        )
        torch.testing.assert_close(logp, full)
        ys = torch.cat([ys, torch.randint(0, V - 1, (3, 1))], dim=1)


def test_mask_given_by_keyword_gives_the_same_statistics():
    dec = _moe_decoder().train()
    layer = dec.decoders[0]
    torch.manual_seed(4)
    tgt, memory = torch.randn(2, 5, D), torch.randn(2, 9, D)
    pad = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    tgt_mask = pad[:, None, :] & subsequent_mask(5).unsqueeze(0)  # (B, L, L)
    layer(tgt, tgt_mask, memory, None)
    positional = collect_aux(layer).stats
    layer(tgt, tgt_mask=tgt_mask, memory=memory, memory_mask=None)
    keyword = collect_aux(layer).stats
    assert positional.keys() == keyword.keys()
    for name in positional:
        torch.testing.assert_close(keyword[name], positional[name], msg=name)


def test_training_layer_called_without_its_mask_raises():
    layer = _moe_decoder().train().decoders[0]
    with pytest.raises(ValueError, match="needs its mask 'tgt_mask'"):
        layer(torch.randn(2, 5, D), None, torch.randn(2, 9, D), None)


def _train_step(dec):
    out, _ = dec(*_batch())
    aux = collect_aux(dec)
    (out.sum() + aux.losses["dec_moe_balance"] + aux.losses["dec_moe_z"]).backward()
    return {n: p.grad.clone() for n, p in dec.named_parameters()}


def test_gradient_checkpointing_leaves_no_records_after_backward():
    # Checkpointed layers re-run their forward inside the backward pass; records of
    # that recomputation would hold their graph until the next forward.
    dec = _moe_decoder(gradient_checkpoint_layers=[1, 2]).train()
    _train_step(dec)
    assert all(
        m._aux_buffer() == [] for m in dec.modules() if isinstance(m, MoEFeedForward)
    )


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = _train_step(_moe_decoder().train())
    ckpt = _train_step(_moe_decoder(gradient_checkpoint_layers=[1, 2]).train())
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)
