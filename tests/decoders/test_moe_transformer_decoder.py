"""moe_transformer: ESPnet's transformer decoder with MoE FFNs, beam-search ready."""

import torch
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder

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


def test_batch_score_for_beam_search_equals_espnet():
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
    assert all(isinstance(l.feed_forward, MoEFeedForward) for l in dec.decoders)
    hs, hlens = torch.randn(2, 9, D), torch.tensor([9, 6])
    dec(hs, hlens, torch.randint(0, V, (2, 5)), torch.tensor([5, 3]))
    aux = collect_aux(dec)
    assert {"dec_moe_balance", "dec_moe_z"} <= aux.losses.keys()
    assert {"dec_moe_load_entropy", "dec_moe_frac_e3"} <= aux.stats.keys()
