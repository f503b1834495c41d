"""U2++ decoding searches: CTC greedy, CTC prefix beam search, attention rescoring.

All take the encoder output of one utterance. Token id 0 is CTC's blank (ESPnet's
convention); hypotheses are token-id tuples without ``<sos>``/``<eos>``.

Attention rescoring (U2, arXiv 2012.05481; U2++ with both decoders): the n-best of the
CTC prefix beam search is scored by the attention decoder(s) in one batched teacher-
forced pass, and the best combined score wins:

    score = (1 - ctc_weight) * [(1 - reverse_weight) * log p_l2r(y + <eos>)
                                + reverse_weight * log p_r2l(reverse(y) + <eos>)]
            + ctc_weight * log p_ctc(y)

``ctc_weight`` is ESPnet's decoding option (same (1 - w) / w convention as its joint
beam search); WeNet adds ``ctc_weight * ctc`` to the unweighted attention score
instead (a different scale for the same ranking family).
"""

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

__all__ = [
    "ctc_greedy_search",
    "CTCPrefixBeamSearch",
    "ctc_prefix_beam_search",
    "attention_scores",
    "RescoredHyp",
    "attention_rescoring",
    "resolve_reverse_weight",
]

_NEG_INF = -float("inf")


def _logaddexp(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) of two floats (the search's inner loop: plain Python
    floats, no varargs or generators)."""
    if a < b:
        a, b = b, a
    if b == _NEG_INF:
        return a
    return a + math.log1p(math.exp(b - a))


def ctc_greedy_search(
    ctc_logp: torch.Tensor, blank: int = 0
) -> Tuple[Tuple[int, ...], float]:
    """Best path: argmax per frame, repeats merged, blanks dropped.

    Args:
        ctc_logp: (T, V) log posteriors.

    Returns:
        token ids, and the best path's log probability (sum of the frame maxima).
    """
    best, ids = ctc_logp.max(dim=-1)  # (T,), (T,)
    out: List[int] = []
    prev = None
    for i in ids.tolist():
        if i != prev and i != blank:
            out.append(i)
        prev = i
    return tuple(out), float(best.sum())


class CTCPrefixBeamSearch:
    """Frame-synchronous CTC prefix beam search, fed chunk by chunk.

    Each prefix keeps the log probabilities of all alignments ending in blank
    (``pb``) and ending in its last token (``pnb``). Feeding the frames in pieces
    (:meth:`advance`) gives the same result as feeding them at once, so streaming
    decoding shows its partial n-best after every chunk.

    Args:
        beam_size: prefixes kept after each frame (also the per-frame token pre-beam).
        blank: blank id.
    """

    def __init__(self, beam_size: int, blank: int = 0):
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        self.beam_size = beam_size
        self.blank = blank
        self.beam: Dict[Tuple[int, ...], Tuple[float, float]] = {(): (0.0, _NEG_INF)}

    def advance(self, ctc_logp: torch.Tensor) -> None:
        """Consume (T, V) log posteriors."""
        k = min(self.beam_size, ctc_logp.size(-1))
        top_logp, top_ids = ctc_logp.topk(k, dim=-1)
        for logps, ids in zip(top_logp.tolist(), top_ids.tolist()):
            nxt: Dict[Tuple[int, ...], List[float]] = {}

            def add(prefix, pb=_NEG_INF, pnb=_NEG_INF):
                if pb == _NEG_INF and pnb == _NEG_INF:
                    return  # impossible extension (e.g. a repeat with no blank yet)
                cur = nxt.get(prefix)
                if cur is None:
                    nxt[prefix] = [pb, pnb]
                else:
                    cur[0] = _logaddexp(cur[0], pb)
                    cur[1] = _logaddexp(cur[1], pnb)

            for prefix, (pb, pnb) in self.beam.items():
                total = _logaddexp(pb, pnb)
                last = prefix[-1] if prefix else None
                for lp, tok in zip(logps, ids):
                    if tok == self.blank:
                        add(prefix, pb=total + lp)
                    elif tok == last:
                        # repeat without blank collapses; after a blank it extends
                        add(prefix, pnb=pnb + lp)
                        add(prefix + (tok,), pnb=pb + lp)
                    else:
                        add(prefix + (tok,), pnb=total + lp)
            ranked = sorted(
                nxt.items(), key=lambda kv: _logaddexp(*kv[1]), reverse=True
            )
            self.beam = {p: (v[0], v[1]) for p, v in ranked[: self.beam_size]}

    def nbest(self) -> List[Tuple[Tuple[int, ...], float]]:
        """``[(prefix, log p_ctc(prefix)), ...]``, best first."""
        items = [(p, _logaddexp(pb, pnb)) for p, (pb, pnb) in self.beam.items()]
        return sorted(items, key=lambda x: x[1], reverse=True)


def ctc_prefix_beam_search(
    ctc_logp: torch.Tensor, beam_size: int, blank: int = 0
) -> List[Tuple[Tuple[int, ...], float]]:
    """The n-best of :class:`CTCPrefixBeamSearch` over all frames of (T, V)."""
    search = CTCPrefixBeamSearch(beam_size, blank)
    search.advance(ctc_logp)
    return search.nbest()


def _teacher_forced_logp(
    forward, enc: torch.Tensor, hyps: Sequence[Sequence[int]], sos: int, eos: int
) -> torch.Tensor:
    """Sum over ``y + <eos>`` of the decoder's log probabilities, per hypothesis.

    Args:
        forward: ``decoder.forward`` or ``decoder.forward_r2l``.
        enc: (T, D) encoder output.
        hyps: N token sequences.

    Returns:
        (N,) log probabilities.
    """
    n = len(hyps)
    length = max(len(h) for h in hyps) + 1
    ys_in = torch.full((n, length), eos, dtype=torch.long, device=enc.device)
    ys_out = torch.full((n, length), -1, dtype=torch.long, device=enc.device)
    for i, h in enumerate(hyps):
        seq = torch.tensor(list(h), dtype=torch.long, device=enc.device)
        ys_in[i, 0] = sos
        ys_in[i, 1 : len(h) + 1] = seq
        ys_out[i, : len(h)] = seq
        ys_out[i, len(h)] = eos
    ys_in_lens = torch.tensor([len(h) + 1 for h in hyps], device=enc.device)
    memory = enc.unsqueeze(0).expand(n, -1, -1)
    mem_lens = torch.full((n,), enc.size(0), dtype=torch.long, device=enc.device)
    logits, _ = forward(memory, mem_lens, ys_in, ys_in_lens)  # (N, L, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = ys_out >= 0
    picked = logp.gather(-1, ys_out.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum(-1)


@torch.no_grad()
def attention_scores(
    decoder, enc: torch.Tensor, hyps: Sequence[Sequence[int]], sos: int, eos: int
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Left-to-right and (bidirectional decoders) right-to-left scores, (N,) each."""
    l2r = _teacher_forced_logp(decoder.forward, enc, hyps, sos, eos)
    if not getattr(decoder, "bidirectional", False):
        return l2r, None
    r2l = _teacher_forced_logp(
        decoder.forward_r2l, enc, [tuple(reversed(h)) for h in hyps], sos, eos
    )
    return l2r, r2l


class RescoredHyp(NamedTuple):
    tokens: Tuple[int, ...]
    score: float
    ctc: float
    l2r: float
    r2l: Optional[float]


def resolve_reverse_weight(model, reverse_weight: Optional[float]) -> float:
    """The right-to-left weight of rescoring: ``reverse_weight`` if given, else the
    model's training ``reverse_weight``; 0 for a decoder without a right-to-left
    branch."""
    if reverse_weight is not None:
        return reverse_weight
    if not getattr(model.decoder, "bidirectional", False):
        return 0.0
    return float(getattr(model, "reverse_weight", 0.0))


@torch.no_grad()
def attention_rescoring(
    decoder,
    enc: torch.Tensor,
    nbest: Sequence[Tuple[Tuple[int, ...], float]],
    sos: int,
    eos: int,
    ctc_weight: float,
    reverse_weight: float,
) -> List[RescoredHyp]:
    """Rescore a CTC n-best with the attention decoder(s); best first.

    Args:
        decoder: ESPnet decoder (``forward``), with ``forward_r2l`` if bidirectional.
        enc: (T, D) encoder output of the utterance.
        nbest: ``[(tokens, ctc log p), ...]`` from the CTC prefix beam search.
        ctc_weight, reverse_weight: see the module docstring; ``reverse_weight > 0``
            needs a bidirectional decoder.
    """
    if not 0.0 <= ctc_weight <= 1.0:
        raise ValueError(f"ctc_weight must be in [0, 1], got {ctc_weight}")
    if not 0.0 <= reverse_weight <= 1.0:
        raise ValueError(f"reverse_weight must be in [0, 1], got {reverse_weight}")
    bidirectional = getattr(decoder, "bidirectional", False)
    if reverse_weight > 0.0 and not bidirectional:
        raise ValueError(
            f"reverse_weight={reverse_weight} needs a bidirectional decoder "
            f"(bitransformer / moe_bitransformer), got {type(decoder).__name__}"
        )
    hyps = [h for h, _ in nbest]
    l2r, r2l = attention_scores(decoder, enc, hyps, sos, eos)
    out = []
    for i, (tokens, ctc) in enumerate(nbest):
        att = float(l2r[i])
        r = float(r2l[i]) if r2l is not None else None
        if r is not None and reverse_weight > 0.0:
            att = (1.0 - reverse_weight) * att + reverse_weight * r
        score = (1.0 - ctc_weight) * att + ctc_weight * ctc
        out.append(RescoredHyp(tuple(tokens), score, ctc, float(l2r[i]), r))
    return sorted(out, key=lambda h: h.score, reverse=True)
