"""I3D benchmark: encoder time follows the modules that run.

For each training YAML (default: the shipped ``i3d_conformer`` configs), build the
I3D encoder and ESPnet's plain ``ConformerEncoder`` from the same ``encoder_conf``
(gate keys left out, weights copied) and time, side by side in one run, the encoder
on real utterances (eval mode, ``torch.inference_mode``):

1. batch 1 (as asr.sh decodes), every utterance in turn:
   ``plain`` (ESPnet), ``all open`` (every gate forced open: the plain encoder plus
   the gate plumbing), ``half closed`` (half of the modules of every kind closed:
   attention and convolution in even blocks, both FFNs in odd blocks) and
   ``all closed`` (only the input layer and the final norm);
2. batches of several padded utterances: ``all open`` vs ``predicted, ~half open``
   (random gate predictors, threshold set to the median gate probability, so each
   module runs on a different subset of the batch: the row-selection path).

Candidates are interleaved round-robin with the order rotated each round; the ratio
to the reference is the median of the per-round ratios (as ``bench residual``). On
CPU the seconds are this process's CPU time by default (``--clock cpu``, one thread).
FLOPs (``torch.utils.flop_counter``) of each candidate are exact. Target (issue #11):
half closed <= 0.6x of all open.

Writes a Markdown report to ``--out`` (default ``bench_results/i3d.md``).
"""

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import torch
import yaml

from espnet_ext.bench.residual import (
    CLOCKS,
    real_utterances,
    shared_corpus,
    time_paired,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = (
    "conf/train_asr_i3d_conformer.yaml",
    "egs2/speechocean762/asr1/conf/tuning/train_asr_i3d_conformer.yaml",
)
GATE_KEYS = (
    "gate_type",
    "gate_threshold",
    "gate_cost_weight",
    "gate_target_fraction",
    "gate_tau_init",
    "gate_tau_min",
    "gate_tau_decay",
    "gate_hidden_units",
    "gate_init_bias",
)
TARGET = 0.6


def build_pair(config: Path):
    """(plain ESPnet encoder, I3D encoder with the same weights, frontend_conf,
    encoder_conf)."""
    from espnet2.asr.encoder.conformer_encoder import ConformerEncoder
    from espnet2.asr.encoder.transformer_encoder import TransformerEncoder

    from espnet_ext.encoders.i3d_conformer import I3DConformerEncoder
    from espnet_ext.encoders.i3d_transformer import I3DTransformerEncoder

    classes = {
        "i3d_conformer": (ConformerEncoder, I3DConformerEncoder),
        "i3d_transformer": (TransformerEncoder, I3DTransformerEncoder),
    }
    conf = yaml.safe_load(config.read_text())
    if conf.get("encoder") not in classes:
        raise ValueError(f"{config}: encoder must be one of {sorted(classes)}")
    plain_cls, i3d_cls = classes[conf["encoder"]]
    frontend_conf = dict(conf.get("frontend_conf") or {})
    n_mels = frontend_conf.get("n_mels", 80)
    enc_conf = dict(conf["encoder_conf"])
    plain_conf = {k: v for k, v in enc_conf.items() if k not in GATE_KEYS}
    torch.manual_seed(0)
    plain = plain_cls(n_mels, **plain_conf)
    i3d = i3d_cls(n_mels, **enc_conf)
    i3d.load_state_dict(plain.state_dict(), strict=False)
    return plain, i3d, frontend_conf, enc_conf


def half_closed_pattern(slots) -> List[bool]:
    """Half of the modules of every kind closed, no block empty: attention and
    convolution closed in even blocks, the FFNs in odd blocks."""
    return [
        (kind == "ffn") == (block % 2 == 0) for block, _, kind in slots
    ]  # True = open


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def bench_config(
    config: Path,
    corpus: Path,
    n_utts: int,
    batch_size: int,
    repeats: int,
    device: str,
    clock: str,
) -> dict:
    plain, i3d, frontend_conf, enc_conf = build_pair(config)
    plain, i3d = plain.to(device).eval(), i3d.to(device).eval()
    utts, seconds = real_utterances(corpus, n_utts, frontend_conf)
    utts = [(f.to(device), n.to(device)) for f, n in utts]
    slots = i3d.gate_slots()
    half = half_closed_pattern(slots)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def one_by_one(enc, gates):
        def run():
            if gates is not None:
                enc.force_gates(gates)
            for f, n in utts:
                enc(f, n)
            sync()

        return run

    single = {
        "plain": one_by_one(plain, None),
        "all open": one_by_one(i3d, "open"),
        "half closed": one_by_one(i3d, half),
        "all closed": one_by_one(i3d, "closed"),
    }
    # Batches of padded utterances, sorted by length as ESPnet's decoding batches.
    order = sorted(range(len(utts)), key=lambda i: int(utts[i][1]))
    batches = []
    for s in range(0, len(order), batch_size):
        group = [utts[i] for i in order[s : s + batch_size]]
        feats = torch.nn.utils.rnn.pad_sequence(
            [f[0] for f, _ in group], batch_first=True
        )
        batches.append((feats, torch.cat([n for _, n in group])))

    # Same weights, random gate predictors: decisions differ per utterance.
    predicted = type(i3d)(_idim(frontend_conf), **enc_conf).to(device)
    predicted.load_state_dict(i3d.state_dict(), strict=True)
    predicted.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in predicted.gate_predictor.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    predicted.force_gates(None)
    with torch.inference_mode():
        probs = []
        for f, n in batches:
            predicted(f, n)
            probs.append(predicted.last_gates[0].flatten())
        predicted.set_gate_threshold(
            min(max(float(torch.cat(probs).median()), 1e-4), 1 - 1e-4)
        )
        executed = []
        for f, n in batches:
            predicted(f, n)
            executed.append(predicted.last_gates[1].mean())
        batched_fraction = float(torch.stack(executed).mean())

    def batched(enc, gates):
        def run():
            if gates is not None:
                enc.force_gates(gates)
            for f, n in batches:
                enc(f, n)
            sync()

        return run

    batch_cands = {
        "all open": batched(i3d, "open"),
        "predicted, ~half open": batched(predicted, None),
    }
    with torch.inference_mode():
        # the half-closed encoder really computes less: outputs differ from open
        i3d.force_gates("open")
        a = i3d(*utts[0])[0]
        i3d.force_gates(half)
        b = i3d(*utts[0])[0]
        if torch.allclose(a, b):
            raise RuntimeError("closing half of the modules did not change the output")
        flops = {k: _flops(fn) for k, fn in single.items()}
        t_single = time_paired(single, repeats, "all open", CLOCKS[clock])
        t_batch = time_paired(batch_cands, repeats, "all open", CLOCKS[clock])
    i3d.force_gates(None)
    return {
        "config": str(
            config.relative_to(REPO) if config.is_relative_to(REPO) else config
        ),
        "modules": len(slots),
        "half_open": sum(half),
        "utterances": len(utts),
        "audio_seconds": seconds,
        "batch_size": batch_size,
        "batched_fraction": batched_fraction,
        "flops": flops,
        "single": t_single,
        "batched": t_batch,
        "repeats": repeats,
        "clock": clock,
    }


def _idim(frontend_conf: dict) -> int:
    return int(frontend_conf.get("n_mels", 80))


def gated_fraction(single: Dict[str, dict]) -> float:
    """Half-closed time of the gated modules alone, as a fraction of all open.

    ``single``: the batch-1 timings by candidate, each with a ``ratio`` to all open
    (medians of one interleaved run). The all-closed encoder runs exactly the part
    no gate can skip, so subtracting it leaves the gated modules' time.
    """
    closed = single["all closed"]["ratio"]
    return (single["half closed"]["ratio"] - closed) / (1.0 - closed)


def render(device: str, threads: int, rows: List[dict]) -> str:
    lines = [
        f"# I3D encoder time vs executed modules ({device}, {threads} thread(s))",
        "",
        "Written by `python -m espnet_ext.bench i3d` (see its docstring for the "
        "protocol). Random weights (speed only): an untrained I3D model has no "
        "meaningful gate decisions, so batch-1 decisions are forced, the same for "
        "every utterance.",
        "",
    ]
    for r in rows:
        s = r["single"]
        lines += [
            f"## {r['config']}",
            "",
            f"{r['utterances']} real utterances ({r['audio_seconds']:.1f} s of audio, "
            f"speechocean762 dev), {r['repeats']} rounds, {r['clock']} clock. "
            f"{r['modules']} gated modules; half closed runs {r['half_open']}.",
            "",
            "Batch 1 (as asr.sh decodes):",
            "",
            "| encoder | ms per pass | RTF | time / all open (median [q1, q3]) "
            "| GFLOPs |",
            "|---|---|---|---|---|",
        ]
        for name, t in s.items():
            lines.append(
                f"| {name} | {t['median_s'] * 1e3:.1f} | "
                f"{t['median_s'] / r['audio_seconds']:.4f} | {t['ratio']:.3f} "
                f"[{t['ratio_q1']:.3f}, {t['ratio_q3']:.3f}] | "
                f"{r['flops'][name] / 1e9:.3f} |"
            )
        ratio = s["half closed"]["ratio"]
        verdict = "met" if ratio <= TARGET else "NOT met"
        closed = s["all closed"]["ratio"]
        lines += [
            "",
            f"Half closed / all open: **{ratio:.3f}x** (target <= {TARGET}x: "
            f"{verdict}).",
            "",
            f"No gate can skip what 'all closed' still runs ({closed:.3f} of all "
            "open: the subsampling front end, positional encoding, gate predictors, "
            "final norm), so with half of the modules closed the whole encoder "
            f"cannot go below {closed + (1 - closed) / 2:.3f}x. The gated part "
            "alone (time minus the all-closed time) runs "
            f"**{gated_fraction(s):.3f}x** of its all-open time.",
            "",
            f"Batches of {r['batch_size']} padded utterances (sorted by length); "
            f"predicted gates executed {r['batched_fraction']:.2f} of the modules, a "
            "different subset of utterances per module:",
            "",
            "| encoder | ms per pass | time / all open (median [q1, q3]) |",
            "|---|---|---|",
        ]
        for name, t in r["batched"].items():
            lines.append(
                f"| {name} | {t['median_s'] * 1e3:.1f} | {t['ratio']:.3f} "
                f"[{t['ratio_q1']:.3f}, {t['ratio_q3']:.3f}] |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configs", type=Path, nargs="+", default=None)
    p.add_argument("--threads", type=int, default=1, help="asr.sh decodes with 1")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--utterances", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument(
        "--corpus",
        type=Path,
        default=shared_corpus(),
    )
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    p.add_argument(
        "--devices", nargs="+", default=None, help="default: cpu (+ cuda if present)"
    )
    p.add_argument("--out", type=Path, default=Path("bench_results/i3d.md"))
    args = p.parse_args(argv)
    if not (args.corpus / "dev" / "wav.scp").exists():
        sys.exit(f"real speech not found at {args.corpus}; pass --corpus")
    torch.set_num_threads(args.threads)
    configs = args.configs or [REPO / c for c in CONFIGS]
    devices = args.devices or (
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    report = ""
    for device in devices:
        rows: List[Dict] = []
        for config in configs:
            print(f"[bench i3d] {config} on {device} ...", flush=True)
            rows.append(
                bench_config(
                    config.resolve(),
                    args.corpus,
                    args.utterances,
                    args.batch_size,
                    args.repeats,
                    device,
                    args.clock if device == "cpu" else "wall",
                )
            )
        report += render(device, args.threads, rows) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.rstrip("\n") + "\n")
    print(f"[bench i3d] written to {args.out}")


if __name__ == "__main__":
    main()
