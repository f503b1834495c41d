"""Streaming U2++ recognition: feed audio, get partial hypotheses, finalise.

:class:`StreamingASR` wraps an ESPnet ASR model whose encoder has chunk caches
(``u2_conformer`` / ``moe_conformer`` with ``causal: true``):

- ``accept_waveform(samples)`` appends audio; every complete chunk of
  ``decoding_chunk_size`` encoder frames runs through ``encoder.forward_chunk`` with
  its attention and convolution caches, and the CTC prefix beam search advances on
  its frames. Returns the current best partial text.
- ``finalize()`` encodes what is left (a last, shorter chunk) and returns the final
  text: by default the CTC n-best rescored by the attention decoder(s) (attention
  rescoring), or the CTC prefix beam's best (``final_mode="ctc_prefix_beam"``).

Features are computed incrementally by the model's own frontend: a feature frame is
taken once its analysis window lies entirely inside the audio received so far, and
computed from a slice starting far enough back that the frame equals the one the
whole-utterance frontend computes (``DefaultFrontend``, ``center=True``). Global MVN
is per frame; utterance MVN needs the whole utterance, so with it the running mean
(and variance) of the frames seen so far is used instead, with a warning: results
then differ slightly from ``asr_inference``'s.
"""

import logging
import math
import time
from typing import List, NamedTuple, Optional

import numpy as np
import torch

from espnet_ext.decoding.inference_hook import (
    check_utterance_length,
    min_stft_samples,
)
from espnet_ext.decoding.search import (
    CTCPrefixBeamSearch,
    attention_rescoring,
    resolve_reverse_weight,
)
from espnet_ext.layers.moe import prepare_moe_inference

__all__ = ["StreamingASR", "PartialResult"]


class PartialResult(NamedTuple):
    text: str
    tokens: List[str]
    final: bool
    audio_seconds: float  # audio received when this result was produced


class StreamingASR:
    """Chunk-by-chunk recognition with one U2++ model.

    Args:
        speech2text: an ESPnet ``Speech2Text`` (its model, token converter and
            tokenizer are used).
        decoding_chunk_size: encoder frames per chunk (> 0), e.g. 16.
        num_decoding_left_chunks: visible left chunks (-1 = all), e.g. 4.
        beam_size: CTC prefix beam size (also the rescoring n-best).
        ctc_weight, reverse_weight: attention-rescoring weights (see
            :mod:`espnet_ext.decoding.search`); ``reverse_weight=None`` = the model's.
        final_mode: ``"attention_rescoring"`` or ``"ctc_prefix_beam"``.
    """

    def __init__(
        self,
        speech2text,
        decoding_chunk_size: int = 16,
        num_decoding_left_chunks: int = -1,
        beam_size: int = 10,
        ctc_weight: float = 0.5,
        reverse_weight: Optional[float] = None,
        final_mode: str = "attention_rescoring",
    ):
        if isinstance(decoding_chunk_size, bool) or decoding_chunk_size <= 0:
            raise ValueError(
                f"decoding_chunk_size must be > 0, got {decoding_chunk_size}"
            )
        if final_mode not in ("attention_rescoring", "ctc_prefix_beam"):
            raise ValueError(
                "final_mode must be attention_rescoring or ctc_prefix_beam, got "
                f"{final_mode!r}"
            )
        self.s2t = speech2text
        model = speech2text.asr_model
        self.model = model.eval()
        prepare_moe_inference(model)  # MoE experts: one batched GEMM per chunk
        encoder = model.encoder
        if not hasattr(encoder, "forward_chunk"):
            raise ValueError(
                f"streaming needs encoder u2_conformer or moe_conformer, got "
                f"{type(encoder).__name__}"
            )
        encoder.check_streamable()  # causal, front end, positions: clear errors
        if model.preencoder is not None or model.postencoder is not None:
            raise ValueError("streaming does not support a preencoder/postencoder")
        if final_mode == "attention_rescoring" and model.decoder is None:
            raise ValueError("final_mode attention_rescoring needs a decoder")
        self.chunk = decoding_chunk_size
        self.left = num_decoding_left_chunks
        self.beam_size = beam_size
        self.ctc_weight = ctc_weight
        self.reverse_weight = resolve_reverse_weight(model, reverse_weight)
        self.final_mode = final_mode
        self.rate, self.right = encoder.streaming_context()
        self.device = next(model.parameters()).device
        self._frontend_params()
        self.reset()

    def _frontend_params(self) -> None:
        frontend = self.model.frontend
        stft = getattr(frontend, "stft", None)
        if frontend is None:
            # features are the input ("--frontend none"): audio must be features
            raise ValueError("streaming needs a waveform frontend (frontend: default)")
        if stft is None or not getattr(stft, "center", False):
            raise ValueError("streaming needs DefaultFrontend with an STFT (center)")
        self.hop = int(stft.hop_length)
        self.n_fft = int(stft.n_fft)
        # frames needed before a slice's first exact frame: its left half-window
        self.lead = int(math.ceil((self.n_fft // 2) / self.hop))
        norm = self.model.normalize
        name = type(norm).__name__ if norm is not None else None
        self.running_mvn = name == "UtteranceMVN"
        if self.running_mvn:
            logging.warning(
                "streaming with utterance_mvn: the whole utterance is not known "
                "yet, so the running mean/variance of the frames so far is used; "
                "results differ slightly from asr_inference (train with "
                "global_mvn for exact streaming)"
            )
        elif norm is not None and name != "GlobalMVN":
            raise ValueError(f"streaming does not support normalize: {name}")

    def reset(self) -> None:
        """Start a new utterance."""
        self.samples = np.zeros(0, dtype=np.float32)
        self.feats = torch.zeros(0, 0)
        self.feat_frames_done = 0  # feature frames computed (final)
        self.cursor = 0  # first feature frame of the next chunk window
        self.state = None
        self.encoder_out: List[torch.Tensor] = []
        self.search = CTCPrefixBeamSearch(self.beam_size)
        self.sum = None
        self.sumsq = None
        self.count = 0
        self.first_partial_at: Optional[float] = None
        self.finished = False

    # ------------------------------------------------------------------ features
    def _new_feature_frames(self, final: bool) -> torch.Tensor:
        """Feature frames that became final since the last call, (F, D)."""
        n = len(self.samples)
        if n < min_stft_samples(self.n_fft):
            # Too short for the centred STFT (finalize refuses such an utterance;
            # accept_waveform waits for more audio).
            return torch.zeros(0, 0)
        total = n // self.hop + 1  # frames of the whole signal (center=True)
        if not final:
            total = min(total, self._exact_frames())
        t0 = self.feat_frames_done
        if total <= t0:
            return torch.zeros(0, 0)
        start_frame = max(t0 - self.lead, 0)
        wav = torch.from_numpy(self.samples[start_frame * self.hop :]).to(self.device)
        with torch.no_grad():
            feats, _ = self.model.frontend(
                wav.unsqueeze(0), torch.tensor([wav.numel()], device=self.device)
            )
        new = feats[0, t0 - start_frame : total - start_frame]
        self.feat_frames_done = total
        return new

    def _normalise(self, feats: torch.Tensor) -> torch.Tensor:
        norm = self.model.normalize
        if norm is None or feats.numel() == 0:
            return feats
        if not self.running_mvn:
            out, _ = norm(feats.unsqueeze(0), torch.tensor([feats.size(0)]))
            return out[0]
        # running utterance MVN over the frames seen so far (an approximation)
        s = feats.sum(0)
        s2 = (feats**2).sum(0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = s2 if self.sumsq is None else self.sumsq + s2
        self.count += feats.size(0)
        mean = self.sum / self.count
        out = feats - mean if norm.norm_means else feats
        if norm.norm_vars:
            var = (self.sumsq / self.count - mean**2).clamp(min=norm.eps)
            out = out / var.sqrt()
        return out

    # ------------------------------------------------------------------ decoding
    def _run_chunks(self, final: bool) -> None:
        window = self._window()
        stride = self.rate * self.chunk
        cache = self.left * self.chunk if self.left >= 0 else -1
        encoder = self.model.encoder
        while True:
            available = self.feats.size(0) - self.cursor
            if available >= window or (final and available > self.right):
                xs = self.feats[self.cursor : self.cursor + window].unsqueeze(0)
                ys, self.state = encoder.forward_chunk(xs, self.state, cache)
                self.encoder_out.append(ys[0])
                logp = self.model.ctc.log_softmax(ys)[0]
                self.search.advance(logp)
                self.cursor += stride
                if self.first_partial_at is None:
                    self.first_partial_at = time.perf_counter()
            else:
                return

    def _tokens_to_text(self, token_ids) -> PartialResult:
        token_ids = [t for t in token_ids if t != 0]
        tokens = self.s2t.converter.ids2tokens(token_ids)
        tokenizer = self.s2t.tokenizer
        text = (
            tokenizer.tokens2text(tokens) if tokenizer is not None else " ".join(tokens)
        )
        return PartialResult(text, tokens, self.finished, len(self.samples) / self.fs)

    @property
    def fs(self) -> int:
        return int(getattr(self.model.frontend, "fs", 16000) or 16000)

    @torch.no_grad()
    def accept_waveform(self, samples) -> PartialResult:
        """Append audio (1-D float array at the model's rate); best partial result."""
        if self.finished:
            raise ValueError("finalize() was called: reset() before a new utterance")
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.samples = np.concatenate([self.samples, samples])
        # Features are computed only when the next chunk can run: the front end's
        # fixed cost per call would otherwise be paid for every small piece of
        # audio (a 160 ms piece is 1/6 of a 16-frame chunk), and nothing that the
        # partial result depends on changes in between.
        if self._chunk_ready():
            new = self._normalise(self._new_feature_frames(final=False))
            if new.numel():
                self.feats = (
                    new if self.feats.numel() == 0 else torch.cat([self.feats, new])
                )
            self._run_chunks(final=False)
        return self._tokens_to_text(self.search.nbest()[0][0])

    def _exact_frames(self) -> int:
        """Feature frames the audio so far determines: frame t is exact once its
        window [t hop - n_fft/2, t hop + n_fft/2) does not reach past the audio."""
        return max((len(self.samples) - self.n_fft // 2) // self.hop + 1, 0)

    def _chunk_ready(self) -> bool:
        """Whether the audio so far has the feature frames of the next chunk."""
        return self._exact_frames() - self.cursor >= self._window()

    def _window(self) -> int:
        """Feature frames one chunk of the encoder reads (with its right context)."""
        return (self.chunk - 1) * self.rate + self.right + 1

    @torch.no_grad()
    def finalize(self) -> PartialResult:
        """Encode the rest, rescore (``final_mode``), return the final result."""
        check_utterance_length(len(self.samples), self.n_fft)
        new = self._normalise(self._new_feature_frames(final=True))
        if new.numel():
            self.feats = (
                new if self.feats.numel() == 0 else torch.cat([self.feats, new])
            )
        self._run_chunks(final=True)
        self.finished = True
        nbest = self.search.nbest()
        if self.final_mode == "ctc_prefix_beam" or not self.encoder_out:
            return self._tokens_to_text(nbest[0][0])
        enc = torch.cat(self.encoder_out, dim=0)  # (T', D)
        best = attention_rescoring(
            self.model.decoder,
            enc,
            nbest,
            self.model.sos,
            self.model.eos,
            self.ctc_weight,
            self.reverse_weight,
        )[0]
        return self._tokens_to_text(best.tokens)
