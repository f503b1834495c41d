"""ResidualTransformer benchmark: encoder size and merged decoding speed vs dense.

For each training YAML (default: the shipped ``residual_conformer`` configs), build the
residual encoder and ESPnet's dense ``ConformerEncoder`` from the same ``encoder_conf``
(the residual keys left out: same width, depth, subsampling), and report side by side:

1. parameters: measured counts, their ratio, and the formula
   ``N = N_dense - (L-G) sum in*out + L sum (r(in+out) + min(in,out))`` with its
   numbers (the run stops if formula and count disagree);
2. checkpoint bytes: ``torch.save`` of each encoder's state dict (the compact form is
   what is saved; merged weights never are);
3. decoding RTF and FLOPs: the encoder on real utterances one at a time (batch 1, as
   asr.sh decodes), eval mode under ``torch.inference_mode``: ``dense``, ``residual``
   merged (automatic in eval) and, for context, ``residual`` with ``auto_merge`` off
   (the effective weights rebuilt from the factors on every call). Candidates are
   interleaved round-robin with the order rotated each round (shared, noisy machines);
   RTF = median seconds per pass / audio seconds; the ratio to dense is the median of
   the per-round ratios. On CPU the seconds are this process's CPU time by default
   (``--clock cpu``, one thread): other jobs taking the cores do not count. FLOPs
   (``torch.utils.flop_counter``) are exact where times are noisy: merged must equal
   dense. The decoder and beam search are the same modules in both models, so a
   whole-model RTF differs only by this encoder time.

Writes a Markdown report to ``--out`` (default ``bench_results/residual.md``).
"""

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = (
    "conf/train_asr_residual_conformer.yaml",
    "egs2/speechocean762/asr1/conf/tuning/train_asr_residual_conformer.yaml",
)
RESIDUAL_KEYS = (
    "share_group_size",
    "share_remainder",
    "lowrank_rank",
    "use_diagonal",
    "residual_targets",
    "residual_impl",
    "init_from_dense",
)


def _n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _checkpoint_bytes(module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def build_pair(config: Path):
    """(dense ConformerEncoder, residual encoder, frontend_conf, encoder_conf)."""
    from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

    from espnet_ext.encoders.residual_conformer import ResidualConformerEncoder

    conf = yaml.safe_load(config.read_text())
    if conf.get("encoder") != "residual_conformer":
        raise ValueError(f"{config}: encoder must be residual_conformer")
    frontend_conf = dict(conf.get("frontend_conf") or {})
    n_mels = frontend_conf.get("n_mels", 80)
    enc_conf = dict(conf["encoder_conf"])
    enc_conf.pop("init_from_dense", None)  # sizes and speed only
    dense_conf = {k: v for k, v in enc_conf.items() if k not in RESIDUAL_KEYS}
    torch.manual_seed(0)
    dense = ConformerEncoder(n_mels, **dense_conf)
    residual = ResidualConformerEncoder(n_mels, **enc_conf)
    # Trained-looking residual parts: the merged weight is then not W_shared itself,
    # and the merged == unmerged check below cannot pass vacuously.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in residual.residual_layers():
            layer.lowrank_a.normal_(0, 0.02, generator=gen)
            if layer.diag is not None:
                layer.diag.normal_(0, 0.02, generator=gen)
    return dense, residual, frontend_conf, enc_conf


def shared_corpus() -> Path:
    """speechocean762 in the shared data dir (``ESPNET_EXT_SHARED_DATA`` overrides its
    parent), the benchmarks' default ``--corpus``."""
    root = os.environ.get("ESPNET_EXT_SHARED_DATA", REPO.parent / "shared" / "data")
    return Path(root) / "speechocean762"


def real_utterances(corpus: Path, n_utts: int, frontend_conf: dict):
    """[(1, T, n_mels) features, (1,) lengths] per utterance, and total seconds."""
    import soundfile as sf
    from espnet2.asr.frontend.default import DefaultFrontend

    frontend = DefaultFrontend(fs=16000, **frontend_conf).eval()
    lines = (corpus / "dev" / "wav.scp").read_text().splitlines()[:n_utts]
    feats, seconds = [], 0.0
    for line in lines:
        wave, rate = sf.read(corpus / line.split()[1], dtype="float32")
        seconds += len(wave) / rate
        with torch.inference_mode():
            f, flen = frontend(
                torch.from_numpy(wave)[None], torch.tensor([len(wave)])
            )  # (1, T, n_mels), (1,)
        feats.append((f.clone(), flen.clone()))
    return feats, seconds


def time_paired(
    fns: Dict[str, Callable[[], object]],
    repeats: int,
    base: str,
    clock: Callable[[], float] = time.perf_counter,
):
    """Per round, every candidate once (order rotated each round); returns each
    candidate's median seconds and the median and quartiles over rounds of its
    time / ``base``'s time in the same round. Paired ratios cancel the slow drifts of
    a shared machine better than a ratio of medians."""
    for fn in fns.values():  # warm-up (first-call allocations, the merge)
        fn()
    names = list(fns)
    samples: Dict[str, List[float]] = {k: [] for k in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = clock()
            fns[name]()
            samples[name].append(clock() - start)
    out = {}
    for k in names:
        ratios = sorted(a / b for a, b in zip(samples[k], samples[base]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        out[k] = {
            "median_s": statistics.median(samples[k]),
            "ratio": statistics.median(ratios),
            "ratio_q1": q[0],
            "ratio_q3": q[-1],
        }
    return out


# "cpu": this process's CPU time. On a shared machine whose other jobs starve this one,
# wall time mostly measures waiting for a core; with one torch thread, CPU time is the
# wall time the same work takes on an idle core. GPUs need "wall" (and a sync).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _set_auto_merge(encoder, on: bool) -> None:
    for layer in encoder.residual_layers():
        layer.auto_merge = on


def bench_config(
    config: Path,
    corpus: Path,
    n_utts: int,
    repeats: int,
    device: str,
    clock: str = "wall",
) -> dict:
    import copy

    dense, residual, frontend_conf, enc_conf = build_pair(config)
    expected, formula = residual.parameter_formula(_n_params(dense))
    if expected != _n_params(residual):
        raise RuntimeError(
            f"parameter formula gives {expected}, the encoder has {_n_params(residual)}"
        )
    out = {
        "config": str(
            config.relative_to(REPO) if config.is_relative_to(REPO) else config
        ),
        "enc_conf": enc_conf,
        "groups": max(residual._layer_groups) + 1,
        "dense_params": _n_params(dense),
        "residual_params": _n_params(residual),
        "formula": formula,
        "dense_bytes": _checkpoint_bytes(dense),
        "residual_bytes": _checkpoint_bytes(residual),
    }
    unmerged = copy.deepcopy(residual)
    _set_auto_merge(unmerged, False)
    encs = {
        "dense": dense.to(device).eval(),
        "residual_merged": residual.to(device).eval(),
        "residual_unmerged": unmerged.to(device).eval(),
    }
    utts, seconds = real_utterances(corpus, n_utts, frontend_conf)
    utts = [(f.to(device), n.to(device)) for f, n in utts]

    def run(enc):
        for f, n in utts:
            enc(f, n)
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        # merging happens on the first eval forward; time it once, then check it
        start = CLOCKS[clock]()
        residual.merge()
        out["merge_ms"] = (CLOCKS[clock]() - start) * 1e3
        for f, n in utts[:2]:
            a, b = residual(f, n)[0], unmerged(f, n)[0]
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
                raise RuntimeError(
                    f"merged and unmerged outputs differ by {(a - b).abs().max():.3g}"
                )
        if not residual.merged:
            raise RuntimeError("the residual encoder did not run merged in eval mode")
        # FLOPs of one pass over the utterances: exact, unlike times on a shared
        # machine. Merged must equal dense (the same GEMMs/convolutions).
        from torch.utils.flop_counter import FlopCounterMode

        for k, e in encs.items():
            with FlopCounterMode(display=False) as fc:
                run(e)
            out[f"{k}_flops"] = fc.get_total_flops()
        t = time_paired(
            {k: (lambda e=e: run(e)) for k, e in encs.items()},
            repeats,
            "dense",
            CLOCKS[clock],
        )
    merged_bytes = sum(
        layer._merged[1].numel() * layer._merged[1].element_size()
        for layer in residual.residual_layers()
    )
    out.update(
        audio_seconds=seconds,
        utterances=len(utts),
        merged_cache_mb=merged_bytes / 2**20,
        **{f"{k}_rtf": v["median_s"] / seconds for k, v in t.items()},
        **{f"{k}_ratio": v for k, v in t.items()},
        repeats=repeats,
        clock=clock,
    )
    return out


def render(device: str, threads: int, rows: List[dict]) -> str:
    lines = [
        f"# Residual-shared encoder benchmark ({device}, {threads} thread(s), "
        f"torch {torch.__version__})",
        "",
        "Encoder only, ESPnet's dense `conformer` vs `residual_conformer` built from "
        "the same `encoder_conf`. RTF: batch 1, utterance by utterance, eval + "
        "inference_mode, candidates interleaved in one run.",
    ]
    for r in rows:
        c = r["enc_conf"]
        lines += [
            "",
            f"## `{r['config']}`",
            "",
            f"{c['num_blocks']} blocks, d={c['output_size']}, f={c['linear_units']}, "
            f"K={c['share_group_size']} ({r['groups']} group(s)), "
            f"r={c['lowrank_rank']}, diagonal={c.get('use_diagonal', True)}, "
            f"targets={c.get('residual_targets', ['all'])}; "
            f"{r['utterances']} real utterances ({r['audio_seconds']:.1f} s)",
            "",
            "| encoder | params (M) | params / dense | checkpoint (MB) "
            "| checkpoint / dense | GFLOPs | RTF | RTF / dense [q1, q3] |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines.append(
            f"| dense conformer | {r['dense_params'] / 1e6:.3f} | 1 "
            f"| {r['dense_bytes'] / 2**20:.2f} | 1 | {r['dense_flops'] / 1e9:.3f} "
            f"| {r['dense_rtf']:.4f} | 1 |"
        )
        p_ratio = r["residual_params"] / r["dense_params"]
        b_ratio = r["residual_bytes"] / r["dense_bytes"]
        for k, name in (
            ("residual_merged", "residual, merged (decoding)"),
            ("residual_unmerged", "residual, unmerged (auto_merge off)"),
        ):
            q = r[k + "_ratio"]
            lines.append(
                f"| {name} | {r['residual_params'] / 1e6:.3f} | {p_ratio:.3f} "
                f"| {r['residual_bytes'] / 2**20:.2f} | {b_ratio:.3f} "
                f"| {r[k + '_flops'] / 1e9:.3f} | {r[k + '_rtf']:.4f} "
                f"| {q['ratio']:.3f} [{q['ratio_q1']:.3f}, {q['ratio_q3']:.3f}] |"
            )
        lines += [
            "",
            f"Clock: {r['clock']} time. RTF / dense: median over {r['repeats']} rounds "
            "of the time ratio within a round, quartiles in brackets. GFLOPs: one pass "
            "over the utterances (torch.utils.flop_counter); merged "
            + (
                "== dense"
                if r["residual_merged_flops"] == r["dense_flops"]
                else "!= dense"
            )
            + ".",
            "",
            f"Parameter formula (checked against the count): `{r['formula']}`.",
            "",
            f"Merge: {r['merge_ms']:.1f} ms once per loaded model; the merged weights "
            f"held in eval mode take {r['merged_cache_mb']:.2f} MB of memory "
            "(not saved).",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", type=Path, nargs="+", default=None)
    p.add_argument("--threads", type=int, default=1, help="asr.sh decodes with 1")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--utterances", type=int, default=16)
    p.add_argument(
        "--corpus",
        type=Path,
        default=shared_corpus(),
    )
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: process CPU time on CPU (immune to other jobs taking the cores; "
        "needs --threads 1 to equal wall time); GPU timings always use wall time",
    )
    p.add_argument("--out", type=Path, default=Path("bench_results/residual.md"))
    args = p.parse_args(argv)
    if not (args.corpus / "dev" / "wav.scp").exists():
        sys.exit(f"real speech not found at {args.corpus}; pass --corpus")
    torch.set_num_threads(args.threads)
    configs = args.configs or [REPO / c for c in CONFIGS]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = ""
    for device in devices:
        rows: List[Dict] = []
        for config in configs:
            print(f"[bench residual] {config} on {device} ...", flush=True)
            rows.append(
                bench_config(
                    config.resolve(),
                    args.corpus,
                    args.utterances,
                    args.repeats,
                    device,
                    args.clock if device == "cpu" else "wall",
                )
            )
        report += render(device, args.threads, rows) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # One trailing newline, as the pre-commit hooks want text files to end.
    args.out.write_text(report.rstrip("\n") + "\n")
    print(f"[bench residual] written to {args.out}")


if __name__ == "__main__":
    main()
