"""CTC greedy / prefix beam search and attention rescoring."""

import itertools
import math

import pytest
import torch

from espnet_ext.decoders.bitransformer import BiTransformerDecoder
from espnet_ext.decoding.search import (
    CTCPrefixBeamSearch,
    attention_rescoring,
    attention_scores,
    ctc_greedy_search,
    ctc_prefix_beam_search,
)


def _collapse(path):
    out, prev = [], None
    for p in path:
        if p != prev and p != 0:
            out.append(p)
        prev = p
    return tuple(out)


def _brute_force(logp):
    """Exact CTC probability of every label sequence, by enumerating all paths."""
    T, V = logp.shape
    probs = {}
    for path in itertools.product(range(V), repeat=T):
        lp = sum(float(logp[t, s]) for t, s in enumerate(path))
        key = _collapse(path)
        probs[key] = probs.get(key, 0.0) + math.exp(lp)
    return {k: math.log(v) for k, v in probs.items()}


def _logp(T=5, V=3, seed=0):
    torch.manual_seed(seed)
    return torch.log_softmax(torch.randn(T, V) * 2, dim=-1)


def test_greedy_collapses_the_best_path():
    logp = torch.log(
        torch.tensor(
            [[0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.9, 0.05, 0.05], [0.1, 0.8, 0.1]]
        )
    )
    tokens, score = ctc_greedy_search(logp)
    assert tokens == (1, 1)
    assert score == pytest.approx(math.log(0.8**3 * 0.9), rel=1e-5)


def test_prefix_beam_with_full_beam_is_exact():
    logp = _logp()
    exact = _brute_force(logp)
    nbest = ctc_prefix_beam_search(logp, beam_size=100)
    for prefix, score in nbest:
        assert score == pytest.approx(exact[prefix], abs=1e-4)
    best = max(exact, key=exact.get)
    assert nbest[0][0] == best


def test_prefix_beam_chunked_equals_at_once():
    logp = _logp(T=9, V=4, seed=3)
    at_once = ctc_prefix_beam_search(logp, beam_size=3)
    search = CTCPrefixBeamSearch(3)
    for piece in logp.split(2):
        search.advance(piece)
    assert search.nbest() == at_once


def _decoder():
    torch.manual_seed(0)
    return BiTransformerDecoder(
        6, 8, attention_heads=2, linear_units=16, num_blocks=1, dropout_rate=0.0
    ).eval()


def test_rescoring_picks_from_the_nbest_with_the_documented_score():
    dec = _decoder()
    enc = torch.randn(7, 8)
    nbest = [((1, 2), -1.0), ((3,), -1.5), ((1, 2, 4), -2.0)]
    out = attention_rescoring(
        dec, enc, nbest, sos=5, eos=5, ctc_weight=0.3, reverse_weight=0.4
    )
    assert {h.tokens for h in out} == {h for h, _ in nbest}
    l2r, r2l = attention_scores(dec, enc, [h for h, _ in nbest], 5, 5)
    for h in out:
        i = [t for t, _ in nbest].index(h.tokens)
        att = 0.6 * float(l2r[i]) + 0.4 * float(r2l[i])
        assert h.score == pytest.approx(0.7 * att + 0.3 * nbest[i][1], abs=1e-5)
    assert out[0].score == max(h.score for h in out)


def test_teacher_forced_score_is_the_decoder_log_probability():
    dec = _decoder()
    enc = torch.randn(4, 8)
    l2r, r2l = attention_scores(dec, enc, [(1, 2)], 5, 5)
    logits, _ = dec(
        enc[None], torch.tensor([4]), torch.tensor([[5, 1, 2]]), torch.tensor([3])
    )
    logp = torch.log_softmax(logits[0], -1)
    assert float(l2r[0]) == pytest.approx(
        float(logp[0, 1] + logp[1, 2] + logp[2, 5]), abs=1e-5
    )
    logits, _ = dec.forward_r2l(
        enc[None], torch.tensor([4]), torch.tensor([[5, 2, 1]]), torch.tensor([3])
    )
    logp = torch.log_softmax(logits[0], -1)
    assert float(r2l[0]) == pytest.approx(
        float(logp[0, 2] + logp[1, 1] + logp[2, 5]), abs=1e-5
    )


def test_rescoring_bad_weights():
    dec = _decoder()
    with pytest.raises(ValueError, match="ctc_weight"):
        attention_rescoring(dec, torch.randn(3, 8), [((1,), 0.0)], 5, 5, 1.5, 0.0)
