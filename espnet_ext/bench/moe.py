"""MoE benchmark: layer dispatch cost and whole-encoder real-time factor.

Every number is a ratio of timings taken in the same run, interleaved round-robin
(these machines are shared and noisy; absolute times are printed for context only).

1. Layer: d=256, f=1024, E=8, k=2; time of each MoE dispatch / time of a dense FFN with
   the same active parameters (hidden = k*f), for 16, 256 and 2000 tokens, inference
   and training (forward+backward). Baselines: our ``reference`` loop, a WeNet-style
   ``torch.where`` + ``+=`` loop, and Hugging Face's Mixtral sparse MoE block when
   ``transformers`` is installed.
2. Encoder: moe_conformer (E=8, k=2) vs the dense conformer of the same dims on batches
   of real utterances: RTF ratio next to the ratio of active FLOPs (counted by
   ``torch.utils.flop_counter``), parameters, and peak memory, parameters included
   (CUDA: the encoder's parameters plus the peak allocation growth of one forward;
   CPU: peak RSS growth of a fresh process building the encoder and running one
   forward).

Writes a Markdown table to ``--out`` (default ``bench_results/moe.md``).
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from espnet.nets.pytorch_backend.transformer.positionwise_feed_forward import (
    PositionwiseFeedForward,
)

from espnet_ext.layers.moe import (
    MoEFeedForward,
    default_layout,
    dispatch_sorted,
    expert_activation,
    sort_pairs,
)

D, F, E, K = 256, 1024, 8, 2


class WeNetLoopMoE(torch.nn.Module):
    """WeNet's MoEFFNLayer loop (torch.where per expert, ``+=``), as a baseline."""

    def __init__(self, moe: MoEFeedForward):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        _, weights, indices = self.moe.route(x)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.moe.experts):
            batch_idx, ith = torch.where(indices == i)
            out[batch_idx] += weights[batch_idx, ith, None] * expert(x[batch_idx])
        return out


# Our dispatch candidates: both layouts of ``sorted`` (each device defaults to one of
# them, see dispatch_sorted) and the ``reference`` loop.
MOE_CANDIDATES = ("sorted[gather]", "sorted[stream]", "reference")


def _default_sorted(device: str) -> str:
    return f"sorted[{default_layout(device)}]"


def _dispatch_fn(
    moe: MoEFeedForward, name: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``moe`` as a function of (N, D) tokens, dispatched by the candidate ``name``."""
    if name.startswith("sorted["):
        layout = name[len("sorted[") : -1]

        def run(x):
            _, weights, indices = moe.route(x)
            return dispatch_sorted(x, weights, indices, moe.experts, layout=layout)

        return run
    moe.impl = name
    return moe


def _mixtral_block(device: str):
    """HF Mixtral sparse MoE block with the same sizes, or None without transformers."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    # Mixtral experts are SwiGLU (three D x F' matrices, ours two D x F): F' = 2F/3
    # gives the same parameters and FLOPs per expert, so the ratios compare dispatch,
    # not size.
    cfg = MixtralConfig(
        hidden_size=D,
        intermediate_size=round(2 * F / 3),
        num_local_experts=E,
        num_experts_per_tok=K,
    )
    if hasattr(cfg, "_experts_implementation"):
        # transformers >= 5 dispatches experts through a registry; a standalone block
        # has no model to set it, so name the default eager loop explicitly.
        cfg._experts_implementation = "eager"
    block = MixtralSparseMoeBlock(cfg).eval()
    # transformers 5 allocates these with torch.empty (a model's post_init fills
    # them): an uninitialised router sends every token to the same experts and fakes
    # a fast block.
    gen = torch.Generator().manual_seed(0)  # own generator: leave the global RNG alone
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.02, generator=gen)
    block.to(device)

    def run(x):
        out = block(x.unsqueeze(0))  # (1, N, D); transformers < 5 also returned logits
        return (out[0] if isinstance(out, tuple) else out).squeeze(0)  # (N, D)

    return run


def _time_round_robin(
    fns: Dict[str, Callable[[], object]], repeats: int
) -> Dict[str, float]:
    """Median seconds per call; candidates interleaved so drift hits all alike.

    The order rotates every round: whoever runs right after the dense FFN finds the
    caches flushed (measured: ~4 ms of 30 here), so a fixed order would bias the ratios.
    """
    for fn in fns.values():  # warm-up
        fn()
        fn()
    names = list(fns)
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def _floor(moe: MoEFeedForward, x: torch.Tensor) -> Callable[[], object]:
    """The experts alone on their rows, pre-sorted into contiguous blocks.

    No routing, no gather, no un-sort or sum: the time no dispatch can beat with these
    experts. ``loop / floor`` bounds the speed-up any dispatch can have over a loop.
    """
    _, _, indices = moe.route(x)
    _, token, counts = sort_pairs(indices, moe.num_experts)
    blocks = x.index_select(0, token).split(counts)
    return lambda: [expert(b) for expert, b in zip(moe.experts, blocks)]


def _check_same_outputs(cands: Dict[str, Callable], x: torch.Tensor) -> None:
    """Refuse to time candidates that compute different things (same weights, so the
    same outputs): a broken baseline would print plausible but meaningless ratios."""
    outs = {k: f(x) for k, f in cands.items()}
    ref = outs["reference"]
    for k, out in outs.items():
        if not torch.allclose(out, ref, rtol=1e-4, atol=1e-5):
            raise RuntimeError(
                f"bench candidate {k!r} differs from 'reference' by "
                f"{(out - ref).abs().max().item():.3g}"
            )


def layer_bench(device: str, repeats: int) -> List[dict]:
    torch.manual_seed(0)
    # Experts and the dense FFN share one activation kernel (SiLU, see
    # expert_activation), so the ratios measure the MoE, not the activation.
    dense = (
        PositionwiseFeedForward(D, K * F, 0.0, expert_activation("swish"))
        .to(device)
        .eval()
    )
    base = MoEFeedForward(D, F, E, K, 0.0, expert_activation("swish"), impl="sorted")
    # Each candidate owns its weights: sharing them would hand the second user a warm
    # cache (16 MB of experts) and skew the ratios.
    moes = {}
    for name in MOE_CANDIDATES:
        moes[name] = copy.deepcopy(base).to(device).eval()
    wenet = WeNetLoopMoE(copy.deepcopy(base).to(device).eval())
    mixtral = _mixtral_block(device)
    floor_moe = copy.deepcopy(base).to(device).eval()
    rows = []
    for n in (16, 256, 2000):
        x = torch.randn(n, D, device=device)
        cands = {
            "dense(k*f)": dense,
            **{k: _dispatch_fn(m, k) for k, m in moes.items()},
            "wenet_loop": wenet,
        }
        if mixtral is not None:
            cands["hf_mixtral"] = mixtral
        with torch.inference_mode():
            _check_same_outputs(
                {k: cands[k] for k in (*MOE_CANDIDATES, "wenet_loop")}, x
            )
            fns = {k: (lambda f=f: f(x)) for k, f in cands.items()}
            fns["floor"] = _floor(floor_moe, x)
            t = _time_round_robin(fns, repeats)
        rows.append({"mode": "inference", "tokens": n, **t})
        if n == 2000:
            train = {}
            for k in ("dense(k*f)", *MOE_CANDIDATES, "wenet_loop"):
                f = cands[k]
                xg = x.clone().requires_grad_(True)
                train[k] = lambda f=f, xg=xg: f(xg).sum().backward()
            rows.append(
                {
                    "mode": "training",
                    "tokens": n,
                    **_time_round_robin(train, max(repeats // 2, 5)),
                }
            )
    return rows


def _encoders(num_blocks: int):
    from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

    from espnet_ext.encoders.moe_conformer import MoEConformerEncoder

    common = dict(
        input_size=80,
        output_size=D,
        attention_heads=4,
        linear_units=F,
        num_blocks=num_blocks,
        macaron_style=True,
        cnn_module_kernel=15,
        rel_pos_type="latest",
        pos_enc_layer_type="rel_pos",
        selfattention_layer_type="rel_selfattn",
    )
    torch.manual_seed(0)
    dense = ConformerEncoder(**common)
    # Our experts compute swish with SiLU's single kernel; give the dense FFNs the same
    # kernel so the RTF ratio measures the MoE, not the activation implementation.
    for layer in dense.encoders:
        for ffn in (layer.feed_forward, layer.feed_forward_macaron):
            ffn.activation = expert_activation("swish")
    return {
        "dense": dense,
        "moe": MoEConformerEncoder(**common, num_experts=E, top_k=K, moe_impl="sorted"),
    }


def _real_features(corpus: Path, n_utts: int):
    """(B, T, 80) log-mel features of the first ``n_utts`` dev utterances, + seconds."""
    import soundfile as sf
    from espnet2.asr.frontend.default import DefaultFrontend

    lines = (corpus / "dev" / "wav.scp").read_text().splitlines()[:n_utts]
    waves = [
        torch.tensor(sf.read(corpus / ln.split()[1], dtype="float32")[0])
        for ln in lines
    ]
    lens = torch.tensor([len(w) for w in waves])
    pad = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    with torch.inference_mode():
        feats, flens = DefaultFrontend(fs=16000, n_mels=80)(pad, lens)
    return feats, flens, float(lens.sum()) / 16000


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_child(kind: str, num_blocks: int, feats_file: str) -> None:
    """Fresh process: peak RSS growth (MB) while building one encoder and running one
    forward, sampled every millisecond (``ru_maxrss`` would report the import peak).

    Features come from a file so that the frontend's own peak is not in the number.
    """
    import threading

    feats, flens = torch.load(feats_file)
    base = peak = _rss_mb()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    enc = _encoders(num_blocks)[kind].eval()
    with torch.inference_mode():
        enc(feats, flens)
    done.set()
    sampler.join()
    print(json.dumps(max(peak, _rss_mb()) - base))


def encoder_bench(
    device: str, corpus: Path, n_utts: int, num_blocks: int, repeats: int
) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    feats, flens, seconds = _real_features(corpus, n_utts)
    feats, flens = feats.to(device), flens.to(device)
    encs = {k: v.to(device).eval() for k, v in _encoders(num_blocks).items()}
    out = {"audio_seconds": seconds, "utterances": n_utts, "num_blocks": num_blocks}
    with torch.inference_mode():
        t = _time_round_robin(
            {k: (lambda e=e: e(feats, flens)) for k, e in encs.items()}, repeats
        )
        for k, e in encs.items():
            with FlopCounterMode(display=False) as fc:
                e(feats, flens)
            out[f"{k}_flops"] = fc.get_total_flops()
    for k, e in encs.items():
        out[f"{k}_rtf"] = t[k] / seconds
        out[f"{k}_params"] = sum(p.numel() for p in e.parameters())
        if device == "cuda":
            # Same quantity as on CPU: this encoder's parameters plus its forward's peak
            # (the other encoder and the features are resident too: subtract them).
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                e(feats, flens)
            param_bytes = sum(p.numel() * p.element_size() for p in e.parameters())
            out[f"{k}_peak_mb"] = (
                torch.cuda.max_memory_allocated() - resident + param_bytes
            ) / 2**20
        else:
            with tempfile.TemporaryDirectory() as tmp:
                feats_file = f"{tmp}/feats.pt"
                torch.save((feats, flens), feats_file)
                proc = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "espnet_ext.bench.moe",
                        "--_peak_rss",
                        k,
                        "--num_blocks",
                        str(num_blocks),
                        "--_feats",
                        feats_file,
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
            out[f"{k}_peak_mb"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def render(device: str, threads: int, layer_rows: List[dict], enc: dict) -> str:
    ours = _default_sorted(device)
    cols = [*MOE_CANDIDATES, "wenet_loop", "hf_mixtral", "floor"]
    try:
        import transformers

        versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    except ImportError:
        versions = f"torch {torch.__version__}, no transformers"
    lines = [
        f"# MoE benchmark ({device}, {threads} threads, {versions})",
        "",
        f"## Layer: d={D}, f={F}, E={E}, top-{K}; "
        f"time / dense FFN with hidden k*f={K * F}",
        "",
        f"`moe_impl: sorted` runs `{ours}` on {device}. `floor`: the experts alone on "
        "pre-sorted rows (no routing, gather or sum), the bound for any dispatch. "
        "Experts and dense FFN use the same SiLU kernel.",
        "",
        "| mode | tokens | " + " | ".join(cols) + " | dense ms |",
        "|---|---|" + "---|" * len(cols) + "---|",
    ]
    for r in layer_rows:
        d = r["dense(k*f)"]
        cell = lambda k: f"{r[k] / d:.2f}" if k in r else "n/a"  # noqa: E731
        lines.append(
            f"| {r['mode']} | {r['tokens']} | "
            + " | ".join(cell(c) for c in cols)
            + f" | {d * 1e3:.2f} |"
        )

    def speedups(r):
        out = [
            f"x{r[base] / r[ours]:.2f} vs {base}"
            for base in ("wenet_loop", "hf_mixtral")
            if base in r
        ]
        if "floor" in r:
            out.append(
                f"best possible vs wenet_loop x{r['wenet_loop'] / r['floor']:.2f}"
            )
        return f"{r['mode']}@{r['tokens']}: " + ", ".join(out)

    lines += [
        "",
        f"Speed-up of `sorted` ({ours}) over the loops (same rows): "
        + "; ".join(speedups(r) for r in layer_rows),
    ]
    if enc:
        lines += [
            "",
            f"## Encoder: {enc['num_blocks']}-block conformer, d={D}, f={F}, "
            f"{enc['utterances']} real utterances ({enc['audio_seconds']:.1f} s) "
            "in one batch",
            "",
            "| encoder | params (M) | RTF | peak MB | GFLOPs |",
            "|---|---|---|---|---|",
        ]
        for k in ("dense", "moe"):
            lines.append(
                f"| {k} | {enc[f'{k}_params'] / 1e6:.2f} | {enc[f'{k}_rtf']:.4f} "
                f"| {enc[f'{k}_peak_mb']:.0f} | {enc[f'{k}_flops'] / 1e9:.2f} |"
            )
        lines += [
            "",
            f"MoE / dense: params x{enc['moe_params'] / enc['dense_params']:.2f}, "
            f"RTF x{enc['moe_rtf'] / enc['dense_rtf']:.2f}, active FLOPs "
            f"x{enc['moe_flops'] / enc['dense_flops']:.2f}, peak memory "
            f"x{enc['moe_peak_mb'] / max(enc['dense_peak_mb'], 1e-9):.2f}",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument(
        "--corpus",
        type=Path,
        default=Path(
            os.environ.get(
                "ESPNET_EXT_SHARED_DATA",
                Path(__file__).resolve().parents[2].parent / "shared" / "data",
            )
        )
        / "speechocean762",
    )
    p.add_argument("--utterances", type=int, default=16)
    p.add_argument("--num_blocks", type=int, default=12)
    p.add_argument("--skip_encoder", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench_results/moe.md"))
    p.add_argument("--_peak_rss", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_feats", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._peak_rss:
        return _peak_rss_child(args._peak_rss, args.num_blocks, args._feats)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = ""
    for device in devices:
        print(f"[bench moe] layer timings on {device} ...", flush=True)
        rows = layer_bench(device, args.repeats)
        enc = {}
        if not args.skip_encoder:
            if not (args.corpus / "dev" / "wav.scp").exists():
                sys.exit(
                    f"real speech not found at {args.corpus}; "
                    "pass --corpus or --skip_encoder"
                )
            print(f"[bench moe] encoder RTF on {device} ...", flush=True)
            enc = encoder_bench(
                device,
                args.corpus,
                args.utterances,
                args.num_blocks,
                max(args.repeats // 6, 3),
            )
        report += render(device, args.threads, rows, enc) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.rstrip() + "\n")
    print(f"[bench moe] written to {args.out}")


if __name__ == "__main__":
    main()
