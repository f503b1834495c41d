"""Knowledge distillation from a trained ESPnet ASR model (``model_conf.distill``).

A model feature of ``model: espnet_ext``, so it works for every encoder and decoder,
ours or ESPnet's. The teacher is any model ESPnet can rebuild from its training
``config.yaml`` and model file (``ASRTask.build_model_from_file``), for example the
recipe's dense conformer. Terms, each its own aux loss and log entry:

- ``kd_ctc`` (``ctc_kl``): per-frame KL(teacher || student) of the CTC posteriors at
  temperature tau, times tau^2 (Hinton et al.), mean over the student's real frames;
- ``kd_dec`` (``decoder_kl``): the same for the attention decoder's token posteriors,
  both decoders teacher-forced on the same targets (the ``<sos>``-prefixed input of
  ESPnet's attention loss), mean over real target positions (``<eos>`` included);
- ``kd_hidden`` (``hidden_mse``): mean squared error between the final encoder
  outputs (after any postencoder: what CTC and the decoder see), mean over real
  frames and the teacher's width; when the widths differ the student's output goes
  through a learned linear projection to the teacher's width (``distill.proj``, part
  of the student and saved with it).

Each term is added to the loss as ``weight * <term weight> * term``; ESPnet's own
losses stay as they are (KD is added, not interpolated with them). Like our other aux
losses they are computed in training mode only, so validation losses (and the model
selection on them) are ESPnet's.

The teacher is frozen (no gradients, run under ``torch.no_grad``), always in eval
mode (no dropout, no SpecAugment: it sees the clean features), not a sub-module of
the student (absent from ``state_dict()``, ``parameters()`` and so from the
optimizer), and loaded at the first training-mode forward, on the device of the
batch. Building the student, resuming and decoding never read the teacher's files.
"""

import inspect
import math
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from espnet_ext.layers.aux_loss import AuxRecorder

__all__ = ["Distiller", "kl_div_at_temperature"]

_TERMS = {"ctc_kl": "kd_ctc", "decoder_kl": "kd_dec", "hidden_mse": "kd_hidden"}
_KEYS = (
    "teacher_config",
    "teacher_model",
    "weight",
    "temperature",
    *_TERMS,
    "teacher_hidden_size",
)


def kl_div_at_temperature(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Masked mean of KL(softmax(t / tau) || softmax(s / tau)) * tau^2, in fp32.

    Args:
        student_logits: (B, T, V).
        teacher_logits: (B, T, V), no gradient needed.
        mask: (B, T) bool, True where a position counts.
        temperature: tau > 0.

    Returns:
        scalar; 0 exactly when the two distributions are equal.
    """
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)  # (B, T)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp_min(1.0) * temperature**2


def _frames_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True for real frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class _CaptureDecoderCall:
    """Forward hook of the student's decoder: keep its first call of a forward.

    ESPnet's attention loss calls ``decoder(encoder_out, encoder_out_lens,
    ys_in_pad, ys_in_lens)`` and gets ``(logits (B, L, V), lens)``; the teacher's
    decoder is then run on the same ``ys_in_pad``. The capture dict lives on the
    decoder instance (set by :meth:`Distiller.begin`), so every
    ``torch.nn.DataParallel`` replica keeps its own. A class, not a closure:
    ``torch.save(model)`` pickles hooks.
    """

    def __call__(self, module, args, kwargs, output) -> None:
        capture = module.__dict__.get("_kd_capture")
        if capture is None or "dec" in capture:
            return
        names = ("hs_pad", "hlens", "ys_in_pad", "ys_in_lens")
        values = list(args) + [kwargs.get(n) for n in names[len(args) :]]
        logits = output[0] if isinstance(output, (tuple, list)) else output
        capture["dec"] = (values[2], values[3], logits)


class Distiller(AuxRecorder, torch.nn.Module):
    """The KD terms of one student; a child module of the student model.

    Args:
        conf: ``model_conf.distill``:
            teacher_config: the teacher's training ``config.yaml`` (relative paths
                are read from the working directory, the recipe directory for
                asr.sh).
            teacher_model: the teacher's model file (e.g. ``valid.acc.ave.pth``).
            weight: overall KD weight (default 1.0).
            temperature: tau of both KL terms (default 1.0).
            ctc_kl, decoder_kl, hidden_mse: per-term weights (defaults 1.0, 1.0,
                0.0); 0 turns a term off. At least one must be > 0.
            teacher_hidden_size: the teacher's encoder output width, only needed
                for ``hidden_mse`` when the teacher's config cannot tell it (a
                postencoder); read from the config otherwise.
        token_list: the student's tokens; the teacher's must be the same.
        student_hidden_size: the student's encoder (or postencoder) output width.
        decoder: the student's decoder (``None``: no decoder term possible).
    """

    def __init__(
        self,
        conf: Dict,
        token_list: Sequence[str],
        student_hidden_size: int,
        decoder: Optional[torch.nn.Module],
    ):
        super().__init__()
        unknown = sorted(set(conf) - set(_KEYS))
        if unknown:
            raise ValueError(
                f"model_conf.distill: unknown keys {unknown}; known: {list(_KEYS)}"
            )
        for key in ("teacher_config", "teacher_model"):
            if not conf.get(key):
                raise ValueError(
                    f"model_conf.distill.{key} is required: the teacher's training "
                    "config.yaml and model file"
                )
        self.teacher_config = str(conf["teacher_config"])
        self.teacher_model = str(conf["teacher_model"])
        self.weight = self._number(conf, "weight", 1.0)
        self.temperature = self._number(conf, "temperature", 1.0)
        if self.temperature <= 0:
            raise ValueError(
                f"model_conf.distill.temperature must be > 0, got {self.temperature}"
            )
        defaults = {"ctc_kl": 1.0, "decoder_kl": 1.0, "hidden_mse": 0.0}
        self.term_weights = {
            key: self._number(conf, key, default) for key, default in defaults.items()
        }
        if self.weight == 0 or not any(self.term_weights.values()):
            raise ValueError(
                "model_conf.distill names a teacher but enables no KD term: set "
                "weight > 0 and at least one of ctc_kl, decoder_kl, hidden_mse > 0 "
                f"(got weight={self.weight}, {self.term_weights}), or remove distill"
            )
        if self.term_weights["decoder_kl"] > 0 and decoder is None:
            raise ValueError(
                "model_conf.distill.decoder_kl > 0 but the student has no decoder"
            )
        self.token_list = list(token_list)
        self.student_hidden_size = student_hidden_size
        self.proj: Optional[torch.nn.Linear] = None
        # None: the teacher's width could not be read now (its config is absent, as
        # when decoding after the teacher was deleted); a saved projection then
        # takes its shape from the checkpoint (see _load_from_state_dict).
        self.teacher_hidden_size: Optional[int] = None
        if self.term_weights["hidden_mse"] > 0:
            width = conf.get("teacher_hidden_size") or self._width_from_config()
            self.teacher_hidden_size = width
            if width is not None and width != student_hidden_size:
                self.proj = torch.nn.Linear(student_hidden_size, width)
        if decoder is not None:
            decoder.register_forward_hook(_CaptureDecoderCall(), with_kwargs=True)
        # device -> frozen teacher. In __dict__, not _modules: no state dict entry,
        # no parameters for the optimizer, untouched by .train() / .to().
        self.__dict__["_teachers"] = {}

    @staticmethod
    def _number(conf: Dict, key: str, default: float) -> float:
        value = conf.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"model_conf.distill.{key} must be a number, got {value!r}"
            )
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"model_conf.distill.{key} must be >= 0, got {value}")
        return float(value)

    def _width_from_config(self) -> Optional[int]:
        """The teacher's encoder output width from its config.yaml, if readable."""
        path = Path(self.teacher_config)
        if not path.is_file():
            return None
        import yaml

        with path.open(encoding="utf-8") as f:
            args = yaml.safe_load(f) or {}
        if args.get("postencoder") not in (None, "none", "null"):
            raise ValueError(
                "model_conf.distill.hidden_mse: the teacher has a postencoder; give "
                "its output width as model_conf.distill.teacher_hidden_size"
            )
        width = (args.get("encoder_conf") or {}).get("output_size")
        if width is None:
            from espnet2.tasks.asr import encoder_choices

            cls = encoder_choices.get_class(args.get("encoder", "rnn"))
            width = inspect.signature(cls).parameters["output_size"].default
        return int(width)

    def __getstate__(self):
        # torch.save(model) pickles the student only, never the teacher.
        state = dict(self.__dict__)
        state["_teachers"] = {}
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A student rebuilt without its teacher's config does not know the teacher's
        # width: take the trained projection's shape from the checkpoint.
        key = prefix + "proj.weight"
        if self.proj is None and self.teacher_hidden_size is None and key in state_dict:
            out_f, in_f = state_dict[key].shape
            self.proj = torch.nn.Linear(in_f, out_f).to(state_dict[key].device)
            self.teacher_hidden_size = out_f
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----- teacher -------------------------------------------------------------------
    def teacher(self, device: torch.device) -> torch.nn.Module:
        """The frozen teacher on ``device``, loaded from its files on first use."""
        device = torch.device(device)
        teachers = self.__dict__["_teachers"]
        if device not in teachers:
            teachers[device] = self._load_teacher(device)
        return teachers[device]

    def _load_teacher(self, device: torch.device) -> torch.nn.Module:
        for key in ("teacher_config", "teacher_model"):
            path = Path(getattr(self, key))
            if not path.is_file():
                raise FileNotFoundError(
                    f"model_conf.distill.{key}: {path} not found (relative to "
                    f"{Path.cwd()}); train the teacher first (the recipe README "
                    "gives the order). Decoding a distilled model never needs it"
                )
        from espnet2.tasks.asr import ASRTask

        # Building the teacher initialises its parameters (then overwritten by its
        # checkpoint) from the global RNG: without the fork, a run resumed at epoch
        # N (teacher built in epoch N) draws other dropout masks than the run that
        # built it in epoch 1, and resuming would not be exact.
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            model, _ = ASRTask.build_model_from_file(
                self.teacher_config, self.teacher_model, str(device)
            )
        teacher_tokens = list(model.token_list)
        if teacher_tokens != self.token_list:
            diff = next(
                (
                    i
                    for i, (a, b) in enumerate(zip(teacher_tokens, self.token_list))
                    if a != b
                ),
                min(len(teacher_tokens), len(self.token_list)),
            )
            raise ValueError(
                f"model_conf.distill: the teacher's token list ({len(teacher_tokens)} "
                f"tokens, {self.teacher_config}) differs from the student's "
                f"({len(self.token_list)}) from position {diff}: KD matches "
                "posteriors token by token, so both must use the same token list"
            )
        if self.term_weights["ctc_kl"] > 0 and getattr(model, "ctc", None) is None:
            raise ValueError("model_conf.distill.ctc_kl > 0 but the teacher has no CTC")
        if self.term_weights["decoder_kl"] > 0 and model.decoder is None:
            raise ValueError(
                "model_conf.distill.decoder_kl > 0 but the teacher has no decoder"
            )
        model.eval()
        model.requires_grad_(False)
        return model

    # ----- one training forward ------------------------------------------------------
    @staticmethod
    def begin(model: torch.nn.Module) -> None:
        """Start capturing the student's tensors (training forwards only)."""
        capture = {} if model.training else None
        model.__dict__["_kd_capture"] = capture
        if model.decoder is not None:
            model.decoder.__dict__["_kd_capture"] = capture

    @staticmethod
    def observe_encoder(
        model: torch.nn.Module, encoder_out, encoder_out_lens: torch.Tensor
    ) -> None:
        """Keep the first ``encode`` output of the forward: (B, T, D), (B,)."""
        capture = model.__dict__.get("_kd_capture")
        if capture is not None and "enc" not in capture:
            if isinstance(encoder_out, tuple):  # (out, intermediate outs): inter-CTC
                encoder_out = encoder_out[0]
            capture["enc"] = (encoder_out, encoder_out_lens)

    def record(
        self,
        model: torch.nn.Module,
        speech: torch.Tensor,
        speech_lengths: torch.Tensor,
    ) -> None:
        """Run the teacher on the batch and record the enabled KD terms as aux losses.

        Args:
            model: the student (the replica running this forward).
            speech: (B, S) or (B, S, F) as given to the student's forward.
            speech_lengths: (B,).
        """
        capture = model.__dict__.get("_kd_capture")
        model.__dict__["_kd_capture"] = None
        if model.decoder is not None:
            model.decoder.__dict__["_kd_capture"] = None
        if capture is None:
            return
        enc_s, lens_s = capture["enc"]
        teacher = self.teacher(speech.device)
        w = self.term_weights
        with torch.no_grad():
            enc_t, lens_t = teacher.encode(speech, speech_lengths)
            if isinstance(enc_t, tuple):
                enc_t = enc_t[0]
        frame_terms = w["ctc_kl"] > 0 or w["hidden_mse"] > 0
        if frame_terms and (
            enc_t.size(1) != enc_s.size(1) or not torch.equal(lens_t, lens_s)
        ):
            raise ValueError(
                "model_conf.distill: teacher and student frame rates differ (for "
                f"input lengths {speech_lengths.tolist()} the teacher's encoder gives "
                f"{lens_t.tolist()} frames, the student's {lens_s.tolist()}); the "
                "frame-level terms ctc_kl and hidden_mse need the same subsampling "
                "(input_layer) and frontend hop; use decoder_kl only otherwise"
            )
        frames = _frames_mask(lens_s, enc_s.size(1))  # (B, T)
        if w["ctc_kl"] > 0:
            with torch.no_grad():
                t_logits = teacher.ctc.ctc_lo(enc_t)  # (B, T, V)
            s_logits = model.ctc.ctc_lo(enc_s)
            loss = kl_div_at_temperature(s_logits, t_logits, frames, self.temperature)
            self.record_aux_loss("kd_ctc", loss, self.weight * w["ctc_kl"])
        if w["decoder_kl"] > 0:
            if "dec" not in capture:
                raise ValueError(
                    "model_conf.distill.decoder_kl > 0 but the student's decoder did "
                    "not run in this forward (ctc_weight: 1.0?)"
                )
            ys_in, ys_in_lens, s_logits = capture["dec"]
            with torch.no_grad():
                t_logits = teacher.decoder(enc_t, lens_t, ys_in, ys_in_lens)[0]
            tokens = _frames_mask(ys_in_lens, s_logits.size(1))  # (B, L)
            loss = kl_div_at_temperature(s_logits, t_logits, tokens, self.temperature)
            self.record_aux_loss("kd_dec", loss, self.weight * w["decoder_kl"])
        if w["hidden_mse"] > 0:
            hidden = enc_s if self.proj is None else self.proj(enc_s)
            if hidden.size(-1) != enc_t.size(-1):
                raise ValueError(
                    f"model_conf.distill.hidden_mse: the teacher's encoder outputs "
                    f"{enc_t.size(-1)} channels but the student's (projected) "
                    f"{hidden.size(-1)}; set teacher_hidden_size: {enc_t.size(-1)}"
                )
            err = (hidden.float() - enc_t.float()).pow(2).mean(dim=-1)  # (B, T)
            m = frames.to(err.dtype)
            loss = (err * m).sum() / m.sum().clamp_min(1.0)
            self.record_aux_loss("kd_hidden", loss, self.weight * w["hidden_mse"])

    def extra_repr(self) -> str:
        terms = ", ".join(f"{k}={v}" for k, v in self.term_weights.items() if v)
        return (
            f"teacher={self.teacher_model!r}, weight={self.weight}, "
            f"temperature={self.temperature}, {terms}"
        )
