"""U2++ decoding modes in the unmodified ``python -m espnet2.bin.asr_inference``.

asr.sh always decodes with ``espnet2.bin.asr_inference``; its options come from the
decode YAML (``--inference_config``, passed as ``--config``), and ESPnet rejects any
key its parser does not know. Installed by the registration hook when
``espnet2.tasks.asr`` is imported (every process that decodes imports it first), this
module extends three ESPnet objects, each by a thin wrapper that changes nothing
unless a U2++ option is set:

1. ``config_argparse.ArgumentParser.parse_known_args``: the "ASR Decoding" parser
   (asr_inference's) gets the options below; they are taken out of the parsed
   namespace again (``inference()`` does not know them) and kept for this process.
2. ``ASRTask.build_model_from_file``: the model built for decoding gets the encoder's
   decoding chunk settings and, if it uses any class of ours, a clear error for an
   utterance too short for its front end (:func:`guard_short_input`; ESPnet's STFT
   otherwise fails with a padding-size error that names no utterance length).
3. ``BeamSearch.__init__`` / ``forward``: with a CTC or rescoring mode, the beam
   search object asr_inference builds runs our search instead and returns ESPnet
   ``Hypothesis`` objects, so ``1best_recog/{text,token,token_int,score}`` and the
   RTF log lines are written exactly as before.

Decode-YAML keys (all optional):
    decoding_mode: attention (ESPnet's beam search, the default) | ctc_greedy |
        ctc_prefix_beam | attention_rescoring. ``beam_size`` and ``ctc_weight`` are
        ESPnet's own keys.
    decoding_chunk_size: encoder frames per chunk (> 0); absent/null = full context.
    num_decoding_left_chunks: visible left chunks (-1 = all).
    simulate_streaming: true = run the encoder chunk by chunk with its caches (what a
        streaming server computes); false = one forward with the equivalent chunk
        mask (same result, faster). Needs ``decoding_chunk_size``.
    decoding_reverse_weight: right-to-left weight in attention rescoring; null = the
        model's ``model_conf.reverse_weight``.

From Python, :func:`configure_speech2text` does the same to a ``Speech2Text``.
"""

import logging
from typing import Any, Dict, NamedTuple, Optional

import torch

from espnet_ext.layers.moe import prepare_moe_inference

__all__ = [
    "DecodeOptions",
    "MODES",
    "check_options",
    "install",
    "configure_model",
    "configure_speech2text",
    "U2Search",
    "guard_short_input",
    "check_utterance_length",
    "min_stft_samples",
]

MODES = ("attention", "ctc_greedy", "ctc_prefix_beam", "attention_rescoring")
_PARSER_DESCRIPTION = "ASR Decoding"  # espnet2.bin.asr_inference.get_parser()
_GROUP_TITLE = "espnet_ext U2++ decoding"


class DecodeOptions(NamedTuple):
    decoding_mode: Optional[str] = None
    decoding_chunk_size: Optional[int] = None
    num_decoding_left_chunks: int = -1
    simulate_streaming: bool = False
    decoding_reverse_weight: Optional[float] = None

    @property
    def active(self) -> bool:
        return self != DecodeOptions()


_DEFAULTS = DecodeOptions()
_state: Dict[str, Any] = {"options": None, "model": None, "installed": False}


def check_options(opts: DecodeOptions) -> DecodeOptions:
    """Validate; ``ValueError`` naming the key."""
    mode = opts.decoding_mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"decoding_mode must be one of {MODES}, got {mode!r}")
    chunk = opts.decoding_chunk_size
    if chunk is not None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
            raise ValueError(
                f"decoding_chunk_size must be an integer > 0 (or null for full "
                f"context), got {chunk!r}"
            )
    left = opts.num_decoding_left_chunks
    if isinstance(left, bool) or not isinstance(left, int) or left < -1:
        raise ValueError(
            f"num_decoding_left_chunks must be an integer >= -1 (-1 = all), got "
            f"{left!r}"
        )
    if opts.simulate_streaming and chunk is None:
        raise ValueError("simulate_streaming: true needs decoding_chunk_size > 0")
    rw = opts.decoding_reverse_weight
    if rw is not None and not 0.0 <= float(rw) <= 1.0:
        raise ValueError(f"decoding_reverse_weight must be in [0, 1], got {rw}")
    return opts


def _str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _int_or_none(value):
    if value is None or str(value).lower() in ("none", "null"):
        return None
    return int(value)


def _float_or_none(value):
    if value is None or str(value).lower() in ("none", "null"):
        return None
    return float(value)


def add_arguments(parser) -> None:
    """Our decode options, in their own group of asr_inference's parser."""
    group = parser.add_argument_group(_GROUP_TITLE)
    group.add_argument(
        "--decoding_mode",
        type=str,
        default=None,
        help=f"One of {MODES}; default: ESPnet's attention beam search",
    )
    group.add_argument(
        "--decoding_chunk_size",
        type=_int_or_none,
        default=None,
        help="Encoder frames per chunk (> 0); none = full context",
    )
    group.add_argument(
        "--num_decoding_left_chunks",
        type=int,
        default=-1,
        help="Visible left chunks with --decoding_chunk_size (-1 = all)",
    )
    group.add_argument(
        "--simulate_streaming",
        type=_str2bool,
        default=False,
        help="Run the encoder chunk by chunk with caches",
    )
    group.add_argument(
        "--decoding_reverse_weight",
        type=_float_or_none,
        default=None,
        help="Right-to-left decoder weight in attention_rescoring; "
        "none = model_conf.reverse_weight",
    )


def _options_from_namespace(ns) -> DecodeOptions:
    values = {}
    for name in DecodeOptions._fields:
        if hasattr(ns, name):
            values[name] = getattr(ns, name)
            delattr(ns, name)
    # YAML values bypass argparse's type= conversion (config_argparse sets them as
    # defaults): normalise here so a YAML 16 and a CLI "16" mean the same.
    opts = DecodeOptions(**values)
    return opts


def _wrap_parse_known_args(original):
    def parse_known_args(self, args=None, namespace=None):
        if getattr(self, "description", None) != _PARSER_DESCRIPTION:
            return original(self, args, namespace)
        if not getattr(self, "_espnet_ext_decoding", False):
            add_arguments(self)
            self._espnet_ext_decoding = True
        ns, rest = original(self, args, namespace)
        try:
            opts = check_options(_options_from_namespace(ns))
        except ValueError as e:
            self.error(str(e))
        _state["options"] = opts if opts.active else None
        if opts.active:
            logging.info(f"espnet_ext decoding options: {opts._asdict()}")
        return ns, rest

    parse_known_args._espnet_ext_wrapped = True
    return parse_known_args


def configure_model(model, opts: DecodeOptions) -> None:
    """Apply the encoder's chunk settings of ``opts`` to a built ASR model."""
    check_options(opts)
    encoder = getattr(model, "encoder", None)
    wants_chunks = opts.decoding_chunk_size is not None or opts.simulate_streaming
    if wants_chunks:
        if not hasattr(encoder, "set_decoding_chunk"):
            raise ValueError(
                "decoding_chunk_size / simulate_streaming need a chunk-capable "
                f"encoder (u2_conformer, moe_conformer), got {type(encoder).__name__}"
            )
        if opts.simulate_streaming:
            encoder.check_streamable()
        elif not getattr(encoder, "causal", True):
            logging.warning(
                "decoding_chunk_size with a non-causal encoder (causal: false): the "
                "convolution still sees the next chunk, so this is not what a "
                "streaming decoder could compute"
            )
        encoder.set_decoding_chunk(
            opts.decoding_chunk_size,
            opts.num_decoding_left_chunks,
            simulate_streaming=opts.simulate_streaming,
        )
    if opts.decoding_mode in ("ctc_greedy", "ctc_prefix_beam", "attention_rescoring"):
        if getattr(model, "ctc", None) is None:
            raise ValueError(f"decoding_mode {opts.decoding_mode} needs a CTC branch")
    if opts.decoding_mode == "attention_rescoring" and model.decoder is None:
        raise ValueError("decoding_mode attention_rescoring needs an attention decoder")


class U2Search(torch.nn.Module):
    """A ``BeamSearch`` stand-in: CTC greedy / prefix beam / attention rescoring.

    Called as ESPnet calls its beam search, ``search(x=enc (T, D), ...)``; returns
    ESPnet ``Hypothesis`` objects (``yseq`` = ``<sos>`` tokens ``<eos>``), best
    first.
    """

    def __init__(
        self,
        model,
        mode: str,
        beam_size: int,
        ctc_weight: float,
        reverse_weight: Optional[float],
        sos: int,
        eos: int,
    ):
        super().__init__()
        if mode not in MODES or mode == "attention":
            raise ValueError(f"U2Search handles CTC and rescoring modes, got {mode!r}")
        self.mode = mode
        # plain attributes: the model is owned by Speech2Text, not by the search
        self.__dict__["model"] = model
        self.beam_size = beam_size
        self.ctc_weight = ctc_weight
        # Lazily, as in forward: every process importing espnet2.tasks.asr loads
        # this module, and most never build a U2 search.
        from espnet_ext.decoding.search import resolve_reverse_weight

        self.reverse_weight = resolve_reverse_weight(model, reverse_weight)
        self.sos = sos
        self.eos = eos

    @torch.no_grad()
    def forward(self, x: torch.Tensor, maxlenratio=0.0, minlenratio=0.0, pre_x=None):
        from espnet.nets.beam_search import Hypothesis

        from espnet_ext.decoding.search import (
            attention_rescoring,
            ctc_greedy_search,
            ctc_prefix_beam_search,
        )

        model = self.__dict__["model"]
        logp = model.ctc.log_softmax(x.unsqueeze(0))[0]  # (T, V)
        if self.mode == "ctc_greedy":
            tokens, score = ctc_greedy_search(logp)
            results = [(tokens, score, {"ctc": score})]
        else:
            nbest = ctc_prefix_beam_search(logp, self.beam_size)
            if self.mode == "ctc_prefix_beam":
                results = [(t, s, {"ctc": s}) for t, s in nbest]
            else:
                rescored = attention_rescoring(
                    model.decoder,
                    x,
                    nbest,
                    self.sos,
                    self.eos,
                    self.ctc_weight,
                    self.reverse_weight,
                )
                results = []
                for h in rescored:
                    parts = {"ctc": h.ctc, "decoder": h.l2r}
                    if h.r2l is not None:
                        parts["decoder_r2l"] = h.r2l
                    results.append((h.tokens, h.score, parts))
        hyps = []
        for tokens, score, parts in results:
            yseq = torch.tensor(
                [self.sos, *tokens, self.eos], dtype=torch.long, device=x.device
            )
            hyps.append(
                Hypothesis(
                    yseq=yseq,
                    score=torch.tensor(float(score)),
                    scores={k: torch.tensor(float(v)) for k, v in parts.items()},
                    states={},
                )
            )
        if hyps:
            best = hyps[0]
            logging.info(f"espnet_ext {self.mode}: best score {float(best.score):.2f}")
        return hyps


def _attach_search(beam_search, opts: DecodeOptions, model) -> None:
    if opts.decoding_mode in (None, "attention"):
        return
    search = U2Search(
        model,
        opts.decoding_mode,
        beam_size=int(beam_search.beam_size),
        ctc_weight=float(beam_search.weights.get("ctc", 0.0)),
        reverse_weight=opts.decoding_reverse_weight,
        sos=int(beam_search.sos),
        eos=int(beam_search.eos),
    )
    beam_search.__dict__["_espnet_ext_search"] = search


def _wrap_beam_search_init(original):
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        opts, model = _state["options"], _state["model"]
        if opts is not None and model is not None:
            _attach_search(self, opts, model)

    __init__._espnet_ext_wrapped = True
    return __init__


def _wrap_beam_search_forward(original):
    def forward(self, *args, **kwargs):
        search = self.__dict__.get("_espnet_ext_search")
        if search is None:
            return original(self, *args, **kwargs)
        return search(*args, **kwargs)

    forward._espnet_ext_wrapped = True
    return forward


def _uses_our_classes(model: torch.nn.Module) -> bool:
    return any(type(m).__module__.startswith("espnet_ext.") for m in model.modules())


def min_stft_samples(n_fft: int, center: bool = True) -> int:
    """Samples an STFT of ``n_fft`` needs: torch.stft with ``center`` reflect-pads
    n_fft // 2 samples on each side, which needs more than n_fft // 2 samples;
    without centring one window must fit."""
    return n_fft // 2 + 1 if center else n_fft


def check_utterance_length(
    n_samples: int, n_fft: int, center: bool = True, fs: Optional[int] = None
) -> None:
    """A clear ``ValueError`` for an utterance too short for the front end's STFT."""
    need = min_stft_samples(n_fft, center)
    if n_samples < need:
        at = f" ({1000 * need / fs:.0f} ms at {fs} Hz)" if fs else ""
        raise ValueError(
            f"utterance of {n_samples} samples is too short to decode: the front "
            f"end (n_fft={n_fft}) needs at least {need} samples{at}"
        )


def guard_short_input(model: torch.nn.Module) -> None:
    """In eval mode, refuse an utterance shorter than the front end's STFT needs with
    an error that says so (empty wav.scp entries and 0-byte files give 0 samples).

    Only for models that use a class of ours: ESPnet's own models keep ESPnet's
    behaviour exactly. A longer utterance that is still too short for the encoder's
    subsampling gets ESPnet's ``TooShortUttError`` (already clear).
    """
    frontend = getattr(model, "frontend", None)
    stft = getattr(frontend, "stft", None)
    if stft is None or getattr(frontend, "_espnet_ext_guarded", False):
        return
    if not _uses_our_classes(model):
        return
    center = getattr(stft, "center", True)
    fs = getattr(getattr(frontend, "logmel", None), "mel_options", {}).get("sr")

    def check(module, args):
        if module.training or len(args) < 2 or args[1] is None:
            return
        try:
            check_utterance_length(int(args[1].min()), stft.n_fft, center, fs)
        except ValueError as e:
            raise ValueError(
                f"{e}; an empty wav.scp entry or a 0-byte audio file gives 0"
            ) from None

    frontend.register_forward_pre_hook(check)
    frontend.__dict__["_espnet_ext_guarded"] = True


def _wrap_build_model_from_file(original_func):
    def build_model_from_file(cls, *args, **kwargs):
        model, train_args = original_func(cls, *args, **kwargs)
        guard_short_input(model)
        # A model loaded from a file is decoded (or a frozen teacher): lay MoE
        # experts out for batched inference (no copy; state dict unchanged).
        prepare_moe_inference(model)
        opts = _state["options"]
        if opts is not None:
            configure_model(model, opts)
            _state["model"] = model
        return model, train_args

    build_model_from_file._espnet_ext_wrapped = True
    return classmethod(build_model_from_file)


def install(asr_task_module) -> None:
    """Wrap the three ESPnet entry points (idempotent). Called by the registry."""
    if _state["installed"]:
        return
    from espnet2.utils import config_argparse
    from espnet.nets.beam_search import BeamSearch

    parser_cls = config_argparse.ArgumentParser
    if not getattr(parser_cls.parse_known_args, "_espnet_ext_wrapped", False):
        parser_cls.parse_known_args = _wrap_parse_known_args(
            parser_cls.parse_known_args
        )
    task = asr_task_module.ASRTask
    if not getattr(task.build_model_from_file, "_espnet_ext_wrapped", False):
        task.build_model_from_file = _wrap_build_model_from_file(
            task.build_model_from_file.__func__
        )
    if not getattr(BeamSearch.__init__, "_espnet_ext_wrapped", False):
        BeamSearch.__init__ = _wrap_beam_search_init(BeamSearch.__init__)
        BeamSearch.forward = _wrap_beam_search_forward(BeamSearch.forward)
    _state["installed"] = True


def configure_speech2text(speech2text, **options) -> None:
    """Python API: the decode-YAML options on an existing ``Speech2Text``.

    Example: ``configure_speech2text(s2t, decoding_mode="attention_rescoring",
    decoding_chunk_size=16, num_decoding_left_chunks=4)``.
    """
    unknown = set(options) - set(DecodeOptions._fields)
    if unknown:
        raise ValueError(
            f"unknown decoding option(s) {sorted(unknown)}; known: "
            f"{list(DecodeOptions._fields)}"
        )
    opts = check_options(DecodeOptions(**{**_DEFAULTS._asdict(), **options}))
    configure_model(speech2text.asr_model, opts)
    beam_search = speech2text.beam_search
    beam_search.__dict__.pop("_espnet_ext_search", None)
    _attach_search(beam_search, opts, speech2text.asr_model)
