"""``python -m espnet_ext.bench streaming``: U2++ streaming vs full context.

For the recipe's U2++ configs (dense ``u2_conformer`` + ``bitransformer`` and
``moe_conformer`` + ``moe_bitransformer``), decodes real speechocean762 utterances two
ways with the same search (CTC prefix beam search, then attention rescoring by both
decoders):

- full context: frontend, encoder over the whole utterance, search;
- streaming: :class:`espnet_ext.decoding.streaming.StreamingASR`, audio fed in
  160 ms pieces, encoder chunk by chunk (``--chunk`` frames, ``--left`` left chunks)
  with its caches, CTC prefix beam advanced per chunk, rescoring at the end.

Reported per model and mode: RTF (compute time / audio time) and first-partial
latency = audio that must arrive before the first partial result exists + the
compute time of the call that produced it (full context: the whole utterance + the
whole decode). All four candidates run interleaved, order rotated every round. On CPU
the clock is this process's CPU time with one thread (``--clock cpu``), so other jobs
starving this one do not count. Writes ``bench_results/streaming.md``.

By default the models are untrained (built from the recipe's YAMLs: nothing to
download, runs anywhere). An untrained router spreads a chunk's tokens over nearly
all experts and an untrained CTC keeps many prefixes alive, so both the MoE layers
and the search cost what they would in the worst case. ``--dense_exp`` /
``--moe_exp`` take trained ESPnet experiment directories instead (``asr_train`` with
``config.yaml`` and ``--model_file``), the models a user would decode; the report
then also says how many experts a call uses per mode.
"""

import argparse
import statistics
import sys
import types
from pathlib import Path
from typing import Dict, List, Optional

import torch

from espnet_ext.bench.residual import CLOCKS, shared_corpus
from espnet_ext.layers.chunk import subsampling_context

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {
    "dense": "egs2/speechocean762/asr1/conf/tuning/train_asr_u2_conformer.yaml",
    "moe": "egs2/speechocean762/asr1/conf/tuning/train_asr_u2_moe_conformer.yaml",
}
TOKENS = (
    ["<blank>", "<unk>", "<space>"]
    + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ'")
    + ["<sos/eos>"]
)


def _speech2text(model: torch.nn.Module, token_list: List[str]):
    """What the decoders here use of a ``Speech2Text``: model (in eval mode),
    token converter and character tokenizer."""
    from espnet2.text.char_tokenizer import CharTokenizer
    from espnet2.text.token_id_converter import TokenIDConverter

    return types.SimpleNamespace(
        asr_model=model.eval(),
        converter=TokenIDConverter(token_list),
        tokenizer=CharTokenizer(non_linguistic_symbols=None),
    )


def build(config: Path, tmp: Path):
    """A Speech2Text-like object (model, converter, tokenizer) from a training YAML."""
    from espnet2.tasks.asr import ASRTask

    tokens = tmp / "tokens.txt"
    tokens.write_text("\n".join(TOKENS) + "\n")
    args = ASRTask.get_parser().parse_args(
        [
            "--config",
            str(config),
            "--token_list",
            str(tokens),
            "--token_type",
            "char",
            "--normalize",
            "utterance_mvn",
            "--output_dir",
            str(tmp),
        ]
    )
    torch.manual_seed(0)
    return _speech2text(ASRTask.build_model(args), TOKENS)


def load_trained(exp_dir: Path, model_file: str):
    """A Speech2Text-like object from a trained ESPnet experiment directory.

    ``config.yaml`` names its ``token_list`` (and a ``global_mvn`` stats file)
    relative to the recipe directory it was trained in; they are looked up from the
    working directory and from every parent of ``exp_dir``, so the bench runs from
    anywhere.
    """
    import tempfile

    import yaml
    from espnet2.tasks.asr import ASRTask

    exp_dir = Path(exp_dir)
    config, weights = exp_dir / "config.yaml", exp_dir / model_file
    for path in (config, weights):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found (an ESPnet asr_train dir?)")
    conf = yaml.safe_load(config.read_text())
    bases = [Path.cwd(), *exp_dir.resolve().parents]

    def resolve(key: str, rel: str) -> str:
        found = [b / rel for b in bases if (b / rel).exists()]
        if not found:
            raise FileNotFoundError(f"{key} {rel} of {config} not found under {bases}")
        return str(found[0])

    if isinstance(conf.get("token_list"), str):
        conf["token_list"] = resolve("token_list", conf["token_list"])
    stats = (conf.get("normalize_conf") or {}).get("stats_file")
    if stats:
        conf["normalize_conf"]["stats_file"] = resolve("stats_file", stats)
    if conf.get("token_type", "char") != "char":
        raise ValueError(f"{config}: the bench decodes char models only")
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "config.yaml"
        resolved.write_text(yaml.safe_dump(conf))
        model, args = ASRTask.build_model_from_file(resolved, weights, "cpu")
    return _speech2text(model, args.token_list)


def experts_per_call(s2t, wavs, stream) -> Dict[str, float]:
    """Mean distinct experts used per encoder MoE call, full context and streaming.

    Counted with forward hooks on one untimed pass over ``wavs`` per mode.

    Returns:
        {"full": mean, "stream": mean, "experts": experts per layer}.
    """
    from espnet_ext.layers.moe import MoEFeedForward

    layers = [
        m for m in s2t.asr_model.encoder.modules() if isinstance(m, MoEFeedForward)
    ]
    counts: List[int] = []

    def hook(module, args, output):
        tokens = args[0].reshape(-1, args[0].size(-1))
        counts.append(module.route(tokens)[2].unique().numel())

    handles = [m.register_forward_hook(hook) for m in layers]
    out = {"experts": float(layers[0].num_experts)}
    try:
        for mode in ("full", "stream"):
            counts.clear()
            for wav in wavs:
                if mode == "full":
                    decode_full(s2t, wav, 1, 0.3)
                else:
                    decode_stream(stream, wav, lambda: 0.0)
            out[mode] = statistics.mean(counts) if counts else float("nan")
    finally:
        for h in handles:
            h.remove()
    return out


def decode_full(s2t, wav, beam: int, ctc_weight: float) -> float:
    """Full-context decode; returns the compute seconds of the clock in use."""
    from espnet_ext.decoding.search import attention_rescoring, ctc_prefix_beam_search

    model = s2t.asr_model
    speech = torch.from_numpy(wav)[None]
    with torch.no_grad():
        enc, _ = model.encode(speech, torch.tensor([len(wav)]))
        nbest = ctc_prefix_beam_search(model.ctc.log_softmax(enc)[0], beam)
        attention_rescoring(
            model.decoder,
            enc[0],
            nbest,
            model.sos,
            model.eos,
            ctc_weight,
            float(model.reverse_weight),
        )


def decode_stream(stream, wav, clock):
    """Streaming decode; returns (seconds of audio before the first partial,
    compute seconds of the call that produced it)."""
    stream.reset()  # a server keeps one StreamingASR per connection
    step = 16000 * 160 // 1000
    first = None
    for i in range(0, len(wav), step):
        start = clock()
        stream.accept_waveform(wav[i : i + step])
        if first is None and stream.encoder_out:
            first = (min(i + step, len(wav)) / 16000, clock() - start)
    start = clock()
    stream.finalize()
    if first is None:  # shorter than one chunk: the first result is the final one
        first = (len(wav) / 16000, clock() - start)
    return first


def run(
    corpus: Path,
    n_utts: int,
    repeats: int,
    chunk: int,
    left: int,
    clock_name,
    trained: Optional[Dict[str, Path]] = None,
    model_file: str = "valid.acc.ave.pth",
):
    """Time both modes of both models; ``trained``: {"dense": dir, "moe": dir}."""
    import tempfile

    import soundfile as sf

    clock = CLOCKS[clock_name]
    lines = (corpus / "dev" / "wav.scp").read_text().splitlines()[:n_utts]
    wavs = [sf.read(corpus / ln.split()[1], dtype="float32")[0] for ln in lines]
    seconds = sum(len(w) for w in wavs) / 16000
    if trained:
        models = {name: load_trained(trained[name], model_file) for name in CONFIGS}
    else:
        models = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, cfg in CONFIGS.items():
                sub = Path(tmp) / name
                sub.mkdir()
                models[name] = build(REPO / cfg, sub)
    beam, ctc_weight = 10, 0.3
    from espnet_ext.decoding.streaming import StreamingASR

    streams = {
        m: StreamingASR(
            s2t,
            decoding_chunk_size=chunk,
            num_decoding_left_chunks=left,
            beam_size=beam,
            ctc_weight=ctc_weight,
        )
        for m, s2t in models.items()
    }
    cands = [(m, mode) for m in models for mode in ("full", "stream")]
    times: Dict[tuple, List[float]] = {c: [] for c in cands}
    first: Dict[tuple, List[tuple]] = {c: [] for c in cands}
    for r in range(repeats + 1):  # round 0 warms up
        order = cands[r % len(cands) :] + cands[: r % len(cands)]
        for m, mode in order:
            s2t = models[m]
            total = 0.0
            for wav in wavs:
                start = clock()
                if mode == "full":
                    decode_full(s2t, wav, beam, ctc_weight)
                    spent = clock() - start
                    lat = (len(wav) / 16000, spent)
                else:
                    lat = decode_stream(streams[m], wav, clock)
                    spent = clock() - start
                total += spent
                if r > 0:
                    first[(m, mode)].append(lat)
            if r > 0:
                times[(m, mode)].append(total)
    ffn = ffn_per_call(models, wavs, chunk, repeats, clock)
    used = experts_per_call(models["moe"], wavs, streams["moe"])
    rows = []
    for m, mode in cands:
        rtf = statistics.median(times[(m, mode)]) / seconds
        audio_lat = statistics.median(a for a, _ in first[(m, mode)])
        comp_lat = statistics.median(c for _, c in first[(m, mode)])
        rows.append((m, mode, rtf, audio_lat, comp_lat))
    params = {
        m: sum(p.numel() for p in s.asr_model.parameters()) / 1e6
        for m, s in models.items()
    }
    return rows, params, seconds, ffn, used


def ffn_per_call(models, wavs, chunk: int, repeats: int, clock) -> List[tuple]:
    """Seconds of one call of the first encoder layer's FFN, dense vs MoE, for the
    tokens of one streaming chunk and of a whole (mean-length) utterance.

    Streaming runs every FFN once per chunk. A dense FFN's cost follows its tokens;
    an MoE layer reads the weights of every expert that gets a token, which at a
    chunk's few tokens is nearly all of them, whatever the token count: this is the
    part of the MoE model that chunking makes dearer.

    Returns [(tokens, dense seconds, moe seconds)], medians of interleaved rounds.
    """
    encoder = models["dense"].asr_model.encoder
    rate = 160 * subsampling_context(encoder.embed.conv)[0]
    mean_frames = round(statistics.mean(len(w) for w in wavs) / rate)
    layers = {m: models[m].asr_model.encoder.encoders[0].feed_forward for m in models}
    d = encoder.output_size()
    out = []
    with torch.no_grad():
        for n in (chunk, mean_frames):
            x = torch.randn(1, n, d)
            times = {m: [] for m in layers}
            for r in range(repeats + 1):
                for m, layer in layers.items():
                    start = clock()
                    for _ in range(20):
                        layer(x)
                    if r > 0:
                        times[m].append((clock() - start) / 20)
            out.append(
                (n, statistics.median(times["dense"]), statistics.median(times["moe"]))
            )
    return out


def render(
    rows,
    params,
    seconds,
    ffn,
    n_utts,
    repeats,
    chunk,
    left,
    clock_name,
    used: Optional[Dict[str, float]] = None,
    trained: Optional[Dict[str, Path]] = None,
) -> str:
    if trained:
        what = f"trained models (dense `{trained['dense']}`, MoE `{trained['moe']}`)"
    else:
        what = (
            "untrained recipe models (`train_asr_u2_conformer.yaml`, "
            "`train_asr_u2_moe_conformer.yaml`: worst-case routing and search)"
        )
    lines = [
        f"# U2++ streaming benchmark (cpu, 1 thread, {clock_name} clock, torch "
        f"{torch.__version__})",
        "",
        f"{n_utts} real speechocean762 dev utterances ({seconds:.1f} s), median of "
        f"{repeats} interleaved rounds; {what}; "
        f"streaming: chunk {chunk} encoder frames, {left} left chunks, audio fed in "
        "160 ms pieces; both modes: CTC prefix beam 10, attention rescoring.",
        "",
        "| model | params (M) | mode | RTF | first partial: audio needed (s) | "
        "+ compute (ms) |",
        "|---|---|---|---|---|---|",
    ]
    by = {}
    for m, mode, rtf, a, c in rows:
        by[(m, mode)] = rtf
        lines.append(
            f"| {m} | {params[m]:.2f} | {mode} | {rtf:.4f} | {a:.2f} | {c * 1e3:.1f} |"
        )
    lines.append("")
    for m in params:
        lines.append(
            f"- {m}: streaming RTF / full-context RTF = "
            f"{by[(m, 'stream')] / by[(m, 'full')]:.2f}"
        )
    moe_over_dense = by[("moe", "stream")] / by[("dense", "stream")]
    lines.append(f"- streaming MoE / dense RTF = {moe_over_dense:.2f}")
    if used:
        lines.append(
            f"- MoE encoder layers: {used['full']:.1f} experts per call full-context, "
            f"{used['stream']:.1f} streaming (of {used['experts']:.0f})"
        )
    lines += [
        "",
        "Why chunking costs the MoE model more: one call of the first encoder "
        "layer's FFN (same run, median of rounds).",
        "",
        "| tokens per call | dense FFN (ms) | MoE FFN (ms) | MoE / dense |",
        "|---|---|---|---|",
    ]
    for n, t_dense, t_moe in ffn:
        what = "one chunk" if n == chunk else "a mean-length utterance"
        lines.append(
            f"| {n} ({what}) | {t_dense * 1e3:.3f} | {t_moe * 1e3:.3f} | "
            f"{t_moe / t_dense:.1f} |"
        )
    lines += [
        "",
        "An MoE layer reads the weights of every expert that receives a token; at a "
        "chunk's few tokens that is nearly every expert, so a call costs about as "
        "much for one chunk as for a whole utterance, and streaming makes one call "
        "per chunk. The dense FFN's cost follows its tokens. At these sizes the "
        "expert GEMMs are bound by reading weights, not by arithmetic. Both modes "
        "decode with the experts stacked (`prepare_moe_inference`, "
        "`dispatch_stacked`: only the experts that got tokens run, on slices of "
        "one weight stack; a balanced call is padded into one batched GEMM pair).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--utterances", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--left", type=int, default=4)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    p.add_argument(
        "--corpus",
        type=Path,
        default=shared_corpus(),
    )
    p.add_argument(
        "--dense_exp",
        type=Path,
        default=None,
        help="trained dense U2++ experiment (asr_train dir); with --moe_exp",
    )
    p.add_argument(
        "--moe_exp",
        type=Path,
        default=None,
        help="trained U2++ MoE experiment (asr_train dir); with --dense_exp",
    )
    p.add_argument("--model_file", default="valid.acc.ave.pth")
    p.add_argument("--out", type=Path, default=Path("bench_results/streaming.md"))
    args = p.parse_args(argv)
    if (args.dense_exp is None) != (args.moe_exp is None):
        sys.exit("--dense_exp and --moe_exp go together (or neither: untrained)")
    trained = {"dense": args.dense_exp, "moe": args.moe_exp} if args.dense_exp else None
    if not (args.corpus / "dev" / "wav.scp").exists():
        sys.exit(f"real speech not found at {args.corpus}; pass --corpus")
    if args.chunk <= 0:
        sys.exit(f"--chunk must be > 0, got {args.chunk}")
    torch.set_num_threads(1)
    rows, params, seconds, ffn, used = run(
        args.corpus,
        args.utterances,
        args.repeats,
        args.chunk,
        args.left,
        args.clock,
        trained,
        args.model_file,
    )
    report = render(
        rows,
        params,
        seconds,
        ffn,
        args.utterances,
        args.repeats,
        args.chunk,
        args.left,
        args.clock,
        used,
        trained,
    )
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"[bench streaming] written to {args.out}")


if __name__ == "__main__":
    main()
