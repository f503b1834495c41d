"""Shared sparsely-gated experts benchmark: encoder size and speed.

For each training YAML (default: the recipe's ``shared_moe_conformer`` config), build
from the same ``encoder_conf`` three encoders: ESPnet's dense ``ConformerEncoder``
(the sharing and MoE keys left out: same width, depth, subsampling; the size
reference), ``moe_conformer`` (the sharing keys left out: the same computation without
sharing; the speed reference) and ``shared_moe_conformer``. It reports

1. parameters: counts, shared / dense (target <= 1/3), and the closed-form formula of
   :meth:`SharedMoEConformerEncoder.parameter_formula` with its numbers (the run stops
   if formula and count disagree);
2. checkpoint bytes: ``torch.save`` of each state dict (a shared tensor is saved once);
3. encoder time on real utterances one at a time (batch 1, as asr.sh decodes), eval
   mode under ``torch.inference_mode``, candidates interleaved with the order rotated
   each round; the ratio to ``moe_conformer`` is the median of per-round ratios. Both
   run the same operations (sharing saves memory, not compute). On CPU the clock is
   this process's CPU time by default (``--clock cpu``, one thread).

Writes a Markdown report to ``--out`` (default ``bench_results/shared_moe.md``).
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import yaml

from espnet_ext.bench.residual import (
    CLOCKS,
    _checkpoint_bytes,
    _n_params,
    real_utterances,
    time_paired,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ("egs2/speechocean762/asr1/conf/tuning/train_asr_shared_moe_conformer.yaml",)
SHARE_KEYS = ("share_group_size", "share_remainder", "share_groups", "shared_modules")
MOE_KEYS = (
    "num_experts",
    "top_k",
    "expert_units",
    "moe_impl",
    "moe_balance_weight",
    "moe_z_weight",
    "dense_block_idx",
)


def build_encoders(config: Path):
    """(dense, moe, shared) encoders and the frontend_conf of ``config``."""
    from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

    from espnet_ext.encoders.moe_conformer import MoEConformerEncoder
    from espnet_ext.encoders.shared_moe_conformer import SharedMoEConformerEncoder

    conf = yaml.safe_load(config.read_text())
    if conf.get("encoder") != "shared_moe_conformer":
        raise ValueError(f"{config}: encoder must be shared_moe_conformer")
    frontend_conf = dict(conf.get("frontend_conf") or {})
    n_mels = frontend_conf.get("n_mels", 80)
    enc_conf = dict(conf["encoder_conf"])
    moe_conf = {k: v for k, v in enc_conf.items() if k not in SHARE_KEYS}
    dense_conf = {k: v for k, v in moe_conf.items() if k not in MOE_KEYS}
    torch.manual_seed(0)
    dense = ConformerEncoder(n_mels, **dense_conf)
    moe = MoEConformerEncoder(n_mels, **moe_conf)
    shared = SharedMoEConformerEncoder(n_mels, **enc_conf)
    return dense, moe, shared, frontend_conf, enc_conf


def bench_config(
    config: Path, corpus: Path, n_utts: int, repeats: int, device: str, clock: str
) -> dict:
    dense, moe, shared, frontend_conf, enc_conf = build_encoders(config)
    expected, formula = shared.parameter_formula()
    if expected != _n_params(shared):
        raise RuntimeError(
            f"parameter formula gives {expected}, the encoder has {_n_params(shared)}"
        )
    out = {
        "config": str(
            config.relative_to(REPO) if config.is_relative_to(REPO) else config
        ),
        "enc_conf": enc_conf,
        "groups": max(shared.layer_groups) + 1,
        "params": {k: _n_params(m) for k, m in (("dense", dense), ("moe", moe))},
        "formula": formula,
        "bytes": {
            k: _checkpoint_bytes(m)
            for k, m in (("dense", dense), ("moe", moe), ("shared", shared))
        },
    }
    out["params"]["shared"] = _n_params(shared)
    encs = {k: m.to(device).eval() for k, m in (("moe", moe), ("shared", shared))}
    utts, seconds = real_utterances(corpus, n_utts, frontend_conf)
    utts = [(f.to(device), n.to(device)) for f, n in utts]

    def run(enc):
        for f, n in utts:
            enc(f, n)
        if device == "cuda":
            torch.cuda.synchronize()

    # Sanity check of the comparison: moe_conformer given every block's (shared)
    # weights computes the shared encoder's output.
    moe.load_state_dict(
        {
            **dict(shared.named_parameters(remove_duplicate=False)),
            **dict(shared.named_buffers(remove_duplicate=False)),
        }
    )
    with torch.inference_mode():
        f, n = utts[0]
        same = torch.allclose(moe(f, n)[0], shared(f, n)[0], atol=1e-5)
        if not same:
            raise RuntimeError("shared and moe encoders differ on the same weights")
        times = time_paired(
            {k: (lambda e=e: run(e)) for k, e in encs.items()},
            repeats,
            base="moe",
            clock=CLOCKS[clock],
        )
    out["audio_seconds"] = seconds
    out["times"] = {k: dict(v, rtf=v["median_s"] / seconds) for k, v in times.items()}
    return out


def report(results, device: str, clock: str, repeats: int, n_utts: int) -> str:
    lines = [
        "# Shared sparsely-gated experts: encoder size and speed",
        "",
        f"torch {torch.__version__}, device {device}, clock {clock}, "
        f"{torch.get_num_threads()} thread(s), {repeats} rounds over {n_utts} real "
        "utterance(s) at batch 1, eval mode.",
        "",
        "| config | encoder params: shared / dense | moe_conformer params | "
        "checkpoint MB: shared / moe / dense | encoder time shared / moe [q1, q3] |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        p, b, t = r["params"], r["bytes"], r["times"]["shared"]
        c = r["enc_conf"]
        dims = (
            f"{c.get('num_blocks')} blocks, d={c.get('output_size')}, "
            f"{r['groups']} group(s), E={c.get('num_experts')}, "
            f"top-{c.get('top_k')}, f_e={c.get('expert_units')}"
        )
        lines.append(
            f"| `{r['config']}` ({dims}) | {p['shared'] / 1e6:.3f}M / "
            f"{p['dense'] / 1e6:.3f}M = **{p['shared'] / p['dense']:.3f}** | "
            f"{p['moe'] / 1e6:.3f}M | {b['shared'] / 1e6:.2f} / {b['moe'] / 1e6:.2f} / "
            f"{b['dense'] / 1e6:.2f} | **{t['ratio']:.3f}** [{t['ratio_q1']:.3f}, "
            f"{t['ratio_q3']:.3f}] |"
        )
    lines += ["", "Parameter formula (checked against the count):", ""]
    for r in results:
        lines.append(f"- `{r['config']}`: {r['formula']}")
    lines += ["", "Encoder RTF (median seconds per pass / audio seconds):", ""]
    for r in results:
        rtf = ", ".join(f"{k} {v['rtf']:.4f}" for k, v in r["times"].items())
        lines.append(f"- `{r['config']}`: {rtf}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--configs", nargs="+", default=[str(REPO / c) for c in CONFIGS]
    )
    parser.add_argument(
        "--corpus",
        default=os.environ.get(
            "ESPNET_EXT_SHARED_DATA", str(REPO.parent / "shared" / "data")
        ),
        help="speechocean762 corpus dir (or its parent)",
    )
    parser.add_argument("--utterances", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--clock", choices=sorted(CLOCKS), default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench_results" / "shared_moe.md"))
    args = parser.parse_args(argv)
    corpus = Path(args.corpus)
    if not (corpus / "dev" / "wav.scp").exists():
        corpus = corpus / "speechocean762"
    clock = args.clock or ("cpu" if args.device == "cpu" else "wall")
    torch.set_num_threads(args.threads)
    results = [
        bench_config(Path(c), corpus, args.utterances, args.repeats, args.device, clock)
        for c in args.configs
    ]
    text = report(results, args.device, clock, args.repeats, args.utterances)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
