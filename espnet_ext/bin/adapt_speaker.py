"""Test-time speaker adaptation of a SAML model: one small adapter file per speaker.

    python -m espnet_ext.bin.adapt_speaker \
        --asr_train_config exp/asr/config.yaml \
        --asr_model_file exp/asr/valid.acc.ave.pth \
        --data_dir data/test --speaker all --utt_slice 0:10 --eval_slice -10: \
        --output_dir exp/saml_adapt [--quantize nf4] [--init_adapter mixture.pth]

For each speaker of ``spk2utt`` (or one ``--speaker``), the utterances selected by
``--utt_slice`` (a Python slice over the speaker's utterances in ``spk2utt`` order;
SAML: the first 10) train the routers and/or the experts with supervised CTC/attention
loss, as SAML's code: both optimisers (Adam) see the gradients of every step, and
``--train alternate`` steps the router optimiser on even blocks of
``--interleave_interval`` steps and the expert optimiser on odd ones (``router``,
``experts`` or ``both`` instead). Every speaker starts from the same adapter (fresh or
``--init_adapter``). Writes ``<output_dir>/<speaker>.saml.pth`` (experts + routers
only, with the base model's fingerprint; see
:func:`espnet_ext.adapters.saml.save_adapter`) and ``summary.json`` (losses before
and after, on the adaptation and the ``--eval_slice`` utterances, and the time).

The model: a trained ESPnet ASR model. If its config already has ``adapter: saml``
(a pre-trained mixture), that adapter is used; otherwise SAML is attached with the
``--num_experts``/``--rank``/``--alpha``/... options (``--quantize nf4|int8`` stores
the frozen base quantised). Decoding takes the same base + the file:
:func:`speech2text_with_adapter`. Refused with a message: a speaker absent from
``spk2utt`` or with no utterance in the slice; an adapter file for another base model
or another base precision.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["main", "parse_slice", "speech2text_with_adapter", "load_model"]


def parse_slice(text: str) -> slice:
    """``"0:10"``, ``"-10:"``, ``":"`` -> slice (refuses anything else)."""
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"a slice looks like 'start:stop', got {text!r}")
    try:
        vals = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise ValueError(f"a slice looks like 'start:stop', got {text!r}") from None
    return slice(*vals)


def _read_table(path: Path) -> Dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            k, _, v = line.partition(" ")
            out[k] = v.strip()
    return out


def _resolve_audio(data_dir: Path, rel: str) -> Path:
    p = Path(rel)
    if p.is_absolute():
        return p
    for root in [data_dir, *data_dir.resolve().parents]:
        if (root / p).exists():
            return root / p
    raise FileNotFoundError(f"{data_dir}/wav.scp: {rel} not found")


def speaker_utterances(data_dir: Path) -> Dict[str, List[str]]:
    spk2utt = data_dir / "spk2utt"
    if spk2utt.exists():
        return {k: v.split() for k, v in _read_table(spk2utt).items()}
    utt2spk = _read_table(data_dir / "utt2spk")
    out: Dict[str, List[str]] = {}
    for u in sorted(utt2spk):
        out.setdefault(utt2spk[u], []).append(u)
    return out


def load_model(
    asr_train_config: str,
    asr_model_file: str,
    saml_conf: Optional[dict] = None,
    device: str = "cpu",
    inference_conf: Optional[dict] = None,
):
    """The ESPnet model with a SAML adapter (from its config, else attached here).

    Returns ``(model, train_args, speech2text)``; with ``inference_conf`` (a dict of
    ``Speech2Text`` keyword arguments) the model is the one inside an ESPnet
    ``Speech2Text`` (its beam search holds the same decoder and CTC modules, so the
    adapter trained here is the one that decodes); otherwise ``speech2text`` is None.
    """
    import espnet2.tasks.asr  # noqa: F401  (registers adapter: saml)
    from espnet2.tasks.asr import ASRTask

    from espnet_ext.adapters.saml import ROUTERS_ATTR, attach_saml

    s2t = None
    if inference_conf is not None:
        from espnet2.bin.asr_inference import Speech2Text

        s2t = Speech2Text(
            asr_train_config=asr_train_config,
            asr_model_file=asr_model_file,
            device=device,
            **inference_conf,
        )
        model, args = s2t.asr_model, s2t.asr_train_args
    else:
        model, args = ASRTask.build_model_from_file(
            asr_train_config, asr_model_file, device
        )
    if not hasattr(model, ROUTERS_ATTR):
        conf = dict(saml_conf or {})
        conf.pop("init_experts", None)
        attach_saml(model, **conf)
    elif saml_conf and saml_conf.get("quantize", "none") != model._saml_conf.get(
        "quantize", "none"
    ):
        raise ValueError(
            f"the model's config has adapter: saml with quantize: "
            f"{model._saml_conf.get('quantize')}, not {saml_conf.get('quantize')}"
        )
    return model.to(device), args, s2t


def speech2text_with_adapter(
    asr_train_config: str,
    asr_model_file: str,
    adapter_file: str,
    device: str = "cpu",
    **speech2text_kwargs,
):
    """ESPnet ``Speech2Text`` on the base model + one speaker's adapter file.

    The adapter options (experts, rank, quantisation, ...) come from the file; a
    file made for another base, or on a base of another precision, is refused.
    """
    import torch
    from espnet2.bin.asr_inference import Speech2Text

    from espnet_ext.adapters.saml import load_adapter

    blob = torch.load(adapter_file, map_location="cpu", weights_only=True)
    s2t = Speech2Text(
        asr_train_config=asr_train_config,
        asr_model_file=asr_model_file,
        device=device,
        **speech2text_kwargs,
    )
    from espnet_ext.adapters.saml import ROUTERS_ATTR, attach_saml

    if not hasattr(s2t.asr_model, ROUTERS_ATTR):
        conf = dict(blob.get("saml_conf") or {})
        conf.pop("init_experts", None)
        attach_saml(s2t.asr_model, **conf)
        s2t.asr_model.to(device)
    load_adapter(s2t.asr_model, adapter_file)
    s2t.asr_model.eval()
    return s2t


class _Batcher:
    """Reads, tokenises and pads utterances as ESPnet's preprocessor would."""

    def __init__(self, args, data_dir: Path):
        from espnet2.text.build_tokenizer import build_tokenizer
        from espnet2.text.cleaner import TextCleaner
        from espnet2.text.token_id_converter import TokenIDConverter

        self.tokenizer = build_tokenizer(
            token_type=args.token_type,
            bpemodel=getattr(args, "bpemodel", None),
            non_linguistic_symbols=getattr(args, "non_linguistic_symbols", None),
        )
        self.cleaner = TextCleaner(getattr(args, "cleaner", None))
        self.converter = TokenIDConverter(token_list=args.token_list)
        self.data_dir = data_dir
        self.wav = _read_table(data_dir / "wav.scp")
        self.text = _read_table(data_dir / "text")

    def __call__(self, utts: Sequence[str]):
        import numpy as np
        import soundfile
        import torch

        speech, text = [], []
        for u in utts:
            x, _ = soundfile.read(str(_resolve_audio(self.data_dir, self.wav[u])))
            if x.ndim > 1:
                x = x.mean(axis=1)
            speech.append(torch.from_numpy(np.asarray(x, dtype=np.float32)))
            tokens = self.tokenizer.text2tokens(self.cleaner(self.text[u]))
            text.append(torch.tensor(self.converter.tokens2ids(tokens)))
        sl = torch.tensor([len(s) for s in speech])
        tl = torch.tensor([len(t) for t in text])
        sp = torch.nn.utils.rnn.pad_sequence(speech, batch_first=True)
        tp = torch.nn.utils.rnn.pad_sequence(text, batch_first=True, padding_value=-1)
        return sp, sl, tp, tl


def _loss(model, batches) -> float:
    import torch

    was = model.training
    model.eval()
    with torch.no_grad():
        total, n = 0.0, 0
        for b in batches:
            total += float(model(*b)[0]) * b[0].shape[0]
            n += b[0].shape[0]
    model.train(was)
    return total / max(n, 1)


def _train_mode(model) -> None:
    """Dropout on (as SAML's code trains), but frozen statistics stay frozen:
    BatchNorm (the conformer's convolution module) keeps its running averages."""
    import torch

    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def adapt_one(model, batches, opts, log=print) -> Dict[str, object]:
    """Adapt ``model``'s SAML adapter on ``batches``; returns the losses."""
    import torch
    from tqdm import tqdm

    from espnet_ext.adapters.saml import ROUTERS_ATTR

    routers = [p for n, p in model.named_parameters() if n.startswith(ROUTERS_ATTR)]
    experts = [
        p for n, p in model.named_parameters() if n.endswith((".lora_a", ".lora_b"))
    ]
    use_r = opts.train in ("router", "alternate", "both")
    use_e = opts.train in ("experts", "alternate", "both")
    for p in model.parameters():
        p.requires_grad = False
    for p in (routers if use_r else []) + (experts if use_e else []):
        p.requires_grad = True
    opt_r = torch.optim.Adam(routers, lr=opts.lr_router) if use_r else None
    opt_e = torch.optim.Adam(experts, lr=opts.lr_experts) if use_e else None
    _train_mode(model)
    losses = []
    bar = tqdm(range(opts.steps), desc="adapt", file=sys.stderr, disable=opts.quiet)
    for step in bar:
        b = batches[step % len(batches)]
        for o in (opt_r, opt_e):
            if o is not None:
                o.zero_grad()
        loss = model(*b)[0]
        loss.backward()
        if opts.train == "alternate":
            router_turn = (step // opts.interleave_interval) % 2 == 0
            (opt_r if router_turn else opt_e).step()
        else:
            for o in (opt_r, opt_e):
                if o is not None:
                    o.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return {"train_losses": losses}


SLICE_OPTIONS = ("--utt_slice", "--eval_slice", "--decode_slice")


def _attach_slice_values(argv: Optional[List[str]]) -> List[str]:
    """``--decode_slice -10:`` -> ``--decode_slice=-10:``.

    argparse reads a value that starts with ``-`` and is not a number as the next
    option, so the natural way to write "the last 10" would be an error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    out: List[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in SLICE_OPTIONS and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m espnet_ext.bin.adapt_speaker",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--asr_train_config", required=True)
    p.add_argument("--asr_model_file", required=True)
    p.add_argument("--data_dir", required=True, type=Path)
    p.add_argument("--speaker", default="all", help="a speaker id of spk2utt or 'all'")
    p.add_argument(
        "--utt_slice",
        default="0:10",
        help="adaptation utterances of each speaker (Python slice)",
    )
    p.add_argument(
        "--eval_slice",
        default=None,
        help="held-out utterances whose loss is reported, e.g. -10:",
    )
    p.add_argument("--output_dir", required=True, type=Path)
    p.add_argument(
        "--init_adapter",
        default=None,
        help="adapter file to start every speaker from (pre-trained)",
    )
    p.add_argument(
        "--train",
        default="alternate",
        choices=["alternate", "router", "experts", "both"],
    )
    p.add_argument("--interleave_interval", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=10)
    p.add_argument("--lr_router", type=float, default=1e-3)
    p.add_argument("--lr_experts", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--decode_slice",
        default=None,
        help="utterances decoded with the adapted model, e.g. -10:",
    )
    p.add_argument(
        "--inference_config",
        default=None,
        type=Path,
        help="YAML of Speech2Text options (beam_size, ctc_weight, ...)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("SAML options when the model has no adapter yet")
    g.add_argument("--num_experts", type=int, default=10)
    g.add_argument("--rank", type=int, default=4)
    g.add_argument("--alpha", type=float, default=64.0)
    g.add_argument("--dropout_rate", type=float, default=0.2)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--target_modules", nargs="+", default=["q", "k", "v", "out"])
    g.add_argument("--mixing", default="parameter", choices=["parameter", "output"])
    g.add_argument("--quantize", default="none", choices=["none", "nf4", "int8"])
    g.add_argument("--quantize_block_size", type=int, default=64)
    g.add_argument(
        "--quantize_modules",
        nargs="+",
        default=["linear", "conv", "embedding"],
        choices=["linear", "conv", "embedding"],
        help="kinds of base modules stored quantised (with --quantize nf4|int8)",
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, dict]:
    opts = build_parser().parse_args(_attach_slice_values(argv))
    import torch

    from espnet_ext.adapters.saml import (
        adapter_state_dict,
        load_adapter,
        save_adapter,
        trainable_counts,
    )

    torch.manual_seed(opts.seed)
    spk2utt = speaker_utterances(opts.data_dir)
    adapt_sl = parse_slice(opts.utt_slice)
    eval_sl = parse_slice(opts.eval_slice) if opts.eval_slice else None
    if opts.speaker == "all":
        speakers = sorted(spk2utt)
    elif opts.speaker not in spk2utt:
        raise ValueError(
            f"speaker {opts.speaker!r} has no utterances in "
            f"{opts.data_dir}/spk2utt ({len(spk2utt)} speakers, e.g. "
            f"{sorted(spk2utt)[:3]})"
        )
    else:
        speakers = [opts.speaker]
    for s in speakers:
        if not spk2utt[s][adapt_sl]:
            raise ValueError(
                f"speaker {s!r} has no utterance in --utt_slice {opts.utt_slice} "
                f"(it has {len(spk2utt[s])})"
            )

    saml_conf = dict(
        num_experts=opts.num_experts,
        rank=opts.rank,
        alpha=opts.alpha,
        dropout_rate=opts.dropout_rate,
        temperature=opts.temperature,
        target_modules=opts.target_modules,
        mixing=opts.mixing,
        quantize=opts.quantize,
        quantize_block_size=opts.quantize_block_size,
        quantize_modules=opts.quantize_modules,
    )
    inference_conf = None
    if opts.decode_slice:
        inference_conf = _inference_conf(opts.inference_config)
    model, train_args, s2t = load_model(
        opts.asr_train_config,
        opts.asr_model_file,
        saml_conf,
        opts.device,
        inference_conf,
    )
    dec_sl = parse_slice(opts.decode_slice) if opts.decode_slice else None
    hyps: Dict[str, str] = {}
    if opts.init_adapter:
        load_adapter(model, opts.init_adapter)
    start = copy.deepcopy(adapter_state_dict(model))
    counts = trainable_counts(model)
    n_r = sum(v.numel() for k, v in start.items() if k.startswith("saml_routers."))
    n_e = sum(v.numel() for k, v in start.items() if not k.startswith("saml_routers."))
    print(
        f"adapt_speaker: frozen {counts['frozen']:,} parameters (+ "
        f"{counts['quantized_weights']:,} quantised base weights), trainable "
        f"{n_r + n_e:,}: routers {n_r:,} + experts {n_e:,} (--train {opts.train})",
        flush=True,
    )
    batcher = _Batcher(train_args, opts.data_dir)
    opts.output_dir.mkdir(parents=True, exist_ok=True)
    summary: Dict[str, dict] = {}
    for spk in speakers:
        utts = spk2utt[spk][adapt_sl]
        bs = max(1, opts.batch_size)
        batches = [batcher(utts[i : i + bs]) for i in range(0, len(utts), bs)]
        held = spk2utt[spk][eval_sl] if eval_sl is not None else []
        eval_batches = [batcher(held[i : i + bs]) for i in range(0, len(held), bs)]
        model.load_state_dict(start, strict=False)
        before = _loss(model, batches)
        before_eval = _loss(model, eval_batches) if eval_batches else None
        t0 = time.perf_counter()
        rec = adapt_one(model, batches, opts)
        seconds = time.perf_counter() - t0
        after = _loss(model, batches)
        after_eval = _loss(model, eval_batches) if eval_batches else None
        out = opts.output_dir / f"{spk}.saml.pth"
        save_adapter(
            model,
            str(out),
            speaker=spk,
            extra={"utts": list(utts), "train": opts.train},
        )
        summary[spk] = dict(
            adapt_utts=len(utts),
            loss_before=before,
            loss_after=after,
            eval_utts=len(held),
            eval_loss_before=before_eval,
            eval_loss_after=after_eval,
            seconds=seconds,
            adapter_file=str(out),
            adapter_bytes=out.stat().st_size,
            **rec,
        )
        print(
            f"{spk}: loss {before:.3f} -> {after:.3f} on {len(utts)} utts"
            + (
                f", held-out {before_eval:.3f} -> {after_eval:.3f}"
                if eval_batches
                else ""
            )
            + f" ({seconds:.1f} s) -> {out}",
            flush=True,
        )
        if s2t is not None:
            for u in spk2utt[spk][dec_sl]:
                hyps[u] = _decode(s2t, batcher, u)
    if s2t is not None:
        summary["_decoding"] = _score(opts, batcher, spk2utt, speakers, dec_sl, hyps)
    (opts.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _inference_conf(path: Optional[Path]) -> dict:
    """Speech2Text keyword arguments from an asr_inference YAML (other keys, such
    as batch_size or ngpu, are asr_inference's and ignored here)."""
    import inspect

    import yaml
    from espnet2.bin.asr_inference import Speech2Text

    conf = yaml.safe_load(path.read_text()) if path else {}
    accepted = set(inspect.signature(Speech2Text.__init__).parameters)
    return {k: v for k, v in (conf or {}).items() if k in accepted}


def _decode(s2t, batcher, utt: str) -> str:
    import torch

    speech, lengths, _, _ = batcher([utt])
    with torch.no_grad():
        results = s2t(speech[0, : int(lengths[0])])
    return results[0][0] if results else ""


def _score(opts, batcher, spk2utt, speakers, dec_sl, hyps) -> dict:
    """WER/CER of the decoded utterances, scored as asr.sh's stage 13."""
    from espnet_ext.bin.scoring import score_set

    out = opts.output_dir / "decode"
    out.mkdir(parents=True, exist_ok=True)
    utts = sorted(hyps)
    (out / "text").write_text("".join(f"{u} {hyps[u]}\n" for u in utts))
    (out / "ref").write_text("".join(f"{u} {batcher.text[u]}\n" for u in utts))
    utt2spk = {u: s for s in speakers for u in spk2utt[s][dec_sl]}
    (out / "utt2spk").write_text("".join(f"{u} {utt2spk[u]}\n" for u in utts))
    res = score_set(out / "ref", out / "text", out / "utt2spk", out)
    res["utterances"] = len(utts)
    print(
        f"decoded {len(utts)} utterances: WER {res['wer']:.1f} CER "
        f"{res['cer']:.1f} ({res['scorer']})",
        flush=True,
    )
    return res


def _cli() -> None:
    try:
        main()
    except ValueError as e:
        sys.exit(f"adapt_speaker: {e}")


if __name__ == "__main__":
    _cli()
