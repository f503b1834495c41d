"""Dump the per-utterance gate decisions of a trained I3D model and plot them.

    python -m espnet_ext.bin.i3d_gates \\
        --asr_train_config exp/asr_train_asr_i3d_conformer/config.yaml \\
        --asr_model_file exp/asr_train_asr_i3d_conformer/valid.acc.ave.pth \\
        --data_dir data/dev --out_dir exp/asr_train_asr_i3d_conformer/gates

Runs the model's front end and encoder (``ESPnetASRModel.encode``, eval mode, one
utterance at a time) over every utterance of a Kaldi data dir (``wav.scp`` with
audio file paths, absolute or relative to the data dir or one of its parents) and
writes to ``--out_dir``:

- ``gates.tsv``: one row per utterance and gated module: ``utt block module kind
  prob open`` (P(open) from the gate predictor, and the decision at the threshold);
- ``summary.json``: mean executed attention / FFN / convolution modules per
  utterance, and mean P(open) and open rate of every module;
- ``gate_probs.png``: the I3D paper's analysis plot, gate probability by layer and
  module type (mean and standard deviation over utterances), with the open rates.

``--gate_threshold`` overrides the model's threshold for this run. With
``--write_config PATH`` the tool also writes a copy of ``--asr_train_config`` with
``encoder_conf.gate_threshold`` set, for decoding at another threshold without
retraining: asr.sh passes ``--inference_args`` last, so
``--inference_args "--asr_train_config PATH"`` replaces its own config argument.
"""

import argparse
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

__all__ = ["main", "resolve_audio", "write_threshold_config"]


def resolve_audio(data_dir: Path, path: str) -> Path:
    """An audio path of ``wav.scp``: absolute, or relative to the data dir or one of
    its parents (speechocean762 lists paths relative to the corpus root)."""
    p = Path(path)
    if p.is_absolute():
        return p
    for base in [data_dir, *data_dir.resolve().parents]:
        if (base / p).exists():
            return base / p
    raise FileNotFoundError(f"{data_dir}/wav.scp: cannot find audio {path!r}")


def write_threshold_config(src: Path, dst: Path, threshold: float) -> None:
    """Copy an ESPnet ``config.yaml`` with ``encoder_conf.gate_threshold`` set."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"gate_threshold must be in (0, 1), got {threshold}")
    conf = yaml.safe_load(Path(src).read_text())
    if not str(conf.get("encoder", "")).startswith("i3d_"):
        raise ValueError(f"{src}: encoder is {conf.get('encoder')!r}, not an I3D one")
    conf.setdefault("encoder_conf", {})["gate_threshold"] = float(threshold)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_text(yaml.safe_dump(conf, sort_keys=False))


def _read_table(path: Path) -> Dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            key, _, value = line.partition(" ")
            out[key] = value.strip()
    return out


def dump_gates(
    model, data_dir: Path, max_utts: Optional[int], device: str
) -> List[dict]:
    """One dict per utterance: ``{"utt", "probs": [...], "open": [...]}`` in the
    order of ``model.encoder.gate_slots()``."""
    import soundfile as sf
    import torch

    wav = _read_table(data_dir / "wav.scp")
    keys = sorted(wav)[:max_utts] if max_utts else sorted(wav)
    rows = []
    with torch.inference_mode():
        for key in keys:
            audio, _ = sf.read(resolve_audio(data_dir, wav[key]), dtype="float32")
            if audio.ndim > 1:
                audio = audio[:, 0]
            speech = torch.from_numpy(audio)[None].to(device)  # (1, samples)
            model.encode(speech, torch.tensor([speech.size(1)], device=device))
            probs, dec = model.encoder.last_gates  # (1, G) each
            rows.append(
                {
                    "utt": key,
                    "probs": probs[0].float().cpu().tolist(),
                    "open": [bool(v) for v in dec[0].cpu().tolist()],
                }
            )
    return rows


def summarise(rows: List[dict], slots) -> dict:
    kinds = sorted({k for _, _, k in slots})
    per_kind = {
        k: statistics.mean(
            sum(r["open"][j] for j, s in enumerate(slots) if s[2] == k) for r in rows
        )
        for k in kinds
    }
    per_module = []
    for j, (block, attr, kind) in enumerate(slots):
        probs = [r["probs"][j] for r in rows]
        per_module.append(
            {
                "block": block + 1,
                "module": attr,
                "kind": kind,
                "mean_prob": statistics.mean(probs),
                "std_prob": statistics.pstdev(probs),
                "open_rate": statistics.mean(float(r["open"][j]) for r in rows),
            }
        )
    return {
        "utterances": len(rows),
        "executed_per_utterance": per_kind,
        "modules_per_kind": {k: sum(1 for s in slots if s[2] == k) for k in kinds},
        "executed_fraction": statistics.mean(sum(r["open"]) / len(slots) for r in rows),
        "modules": per_module,
    }


def plot(summary: dict, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_module: Dict[str, List[dict]] = {}
    for m in summary["modules"]:
        by_module.setdefault(m["module"], []).append(m)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for name, ms in by_module.items():
        blocks = [m["block"] for m in ms]
        axes[0].errorbar(
            blocks,
            [m["mean_prob"] for m in ms],
            yerr=[m["std_prob"] for m in ms],
            marker="o",
            capsize=3,
            label=name,
        )
        axes[1].plot(blocks, [m["open_rate"] for m in ms], marker="o", label=name)
    axes[0].set_ylabel("gate probability P(open)")
    axes[1].set_ylabel("fraction of utterances executing it")
    for ax in axes:
        ax.set_xlabel("encoder block")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--asr_train_config", type=Path, required=True)
    p.add_argument("--asr_model_file", type=Path, default=None)
    p.add_argument("--data_dir", type=Path, default=None)
    p.add_argument("--out_dir", type=Path, default=None)
    p.add_argument("--gate_threshold", type=float, default=None)
    p.add_argument("--max_utts", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--write_config",
        type=Path,
        default=None,
        help="write a copy of --asr_train_config with --gate_threshold set",
    )
    args = p.parse_args(argv)
    if args.write_config is not None:
        if args.gate_threshold is None:
            p.error("--write_config needs --gate_threshold")
        write_threshold_config(
            args.asr_train_config, args.write_config, args.gate_threshold
        )
        print(f"[i3d_gates] wrote {args.write_config}")
        if args.data_dir is None:
            return {}
    if args.data_dir is None or args.out_dir is None:
        p.error("--data_dir and --out_dir are needed to dump gates")

    from espnet2.tasks.asr import ASRTask

    model, _ = ASRTask.build_model_from_file(
        args.asr_train_config, args.asr_model_file, args.device
    )
    model.eval()
    encoder = model.encoder
    if not hasattr(encoder, "gate_slots"):
        raise ValueError(
            f"{args.asr_train_config}: encoder {type(encoder).__name__} has no I3D "
            f"gates (use encoder: i3d_conformer or i3d_transformer)"
        )
    if args.gate_threshold is not None:
        encoder.set_gate_threshold(args.gate_threshold)
    encoder.force_gates(None)
    slots = encoder.gate_slots()
    rows = dump_gates(model, args.data_dir, args.max_utts, args.device)
    if not rows:
        raise ValueError(f"{args.data_dir}/wav.scp lists no utterance")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (args.out_dir / "gates.tsv").open("w", encoding="utf-8") as f:
        f.write("utt\tblock\tmodule\tkind\tprob\topen\n")
        for r in rows:
            for j, (block, attr, kind) in enumerate(slots):
                f.write(
                    f"{r['utt']}\t{block + 1}\t{attr}\t{kind}\t"
                    f"{r['probs'][j]:.4f}\t{int(r['open'][j])}\n"
                )
    summary = summarise(rows, slots)
    summary["gate_threshold"] = encoder.gate_threshold
    summary["gate_type"] = encoder.gate_type
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(
        summary,
        args.out_dir / "gate_probs.png",
        f"{encoder.gate_type} gates, {len(rows)} utterances of {args.data_dir.name}, "
        f"threshold {encoder.gate_threshold}",
    )
    executed = ", ".join(
        f"{k} {v:.2f}/{summary['modules_per_kind'][k]}"
        for k, v in summary["executed_per_utterance"].items()
    )
    print(f"[i3d_gates] {len(rows)} utterances; executed per utterance: {executed}")
    print(f"[i3d_gates] written to {args.out_dir}")
    return summary


if __name__ == "__main__":
    main()
