#!/usr/bin/env python3
"""What each training budget buys: decode one run at several epochs, plot CER vs time.

A run trained past the 2 h budget (``exp_cpu/train_asr_conformer_long``: the dense
config resumed with a larger ``--max_epoch``) keeps only ESPnet's n-best epoch files,
so each point is taken while the run is at that epoch:

1. ``average``: ESPnet's n-best average of epoch files (floating-point tensors
   averaged, integer ones summed, as ``espnet2.main_funcs.average_nbest_models``):

       python3 local/budget_curve.py average --out exp_cpu/long_ep29/ave.pth \\
           exp_cpu/train_asr_conformer_long/asr_train/{24,25,26,28,29}epoch.pth

2. decode it like every row (``asr_pipeline --inference_model <ave.pth>
   --decode_tag ep29 --stages decode score``; see the recipe README);
3. ``collect``: every ``decode_*_ep<N>/scores.json`` of the run, with the training
   time at epoch N from ESPnet's ``checkpoint.pth``, plus the budget row itself,
   into ``results/budget/<name>.json`` and a plot beside it (``.png``) of dev and
   test CER against training hours:

       python3 local/budget_curve.py collect exp_cpu/train_asr_conformer_long \\
           --budget_row results/train_asr_conformer.json --name dense_beyond_budget
"""

import argparse
import json
import re
from pathlib import Path
from typing import List

TARGET_CER = 35.0  # issue 16: test CER <= 35% within 2 h on one core


def average(files: List[Path], out: Path) -> None:
    import torch

    avg = None
    for f in files:
        state = torch.load(f, map_location="cpu")
        if avg is None:
            avg = {k: v.clone() for k, v in state.items()}
        else:
            for k in avg:
                avg[k] += state[k]
    for k, v in avg.items():
        if v.is_floating_point():
            avg[k] = v / len(files)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(avg, out)
    print(f"averaged {len(files)} checkpoints -> {out}")


def collect(exp: Path, budget_row: Path, name: str, results_dir: Path) -> Path:
    from espnet_ext.bin.measure_asr import training_time

    curve = training_time(exp / "asr_train" / "checkpoint.pth")["curve"]
    seconds = {c["epoch"]: c["seconds"] for c in curve}
    row = json.loads(budget_row.read_text())
    points = [
        {
            "epochs": row["epochs"],
            "train_seconds": row["train_seconds"],
            "dev": _cer_wer(row["sets"]["dev"]),
            "test": _cer_wer(row["sets"]["test"]),
            "source": str(budget_row),
        }
    ]
    for scores in sorted((exp / "asr_train").glob("decode_*_ep*/scores.json")):
        epochs = int(re.search(r"_ep(\d+)$", scores.parent.name).group(1))
        decoded = json.loads(scores.read_text())
        points.append(
            {
                "epochs": epochs,
                "train_seconds": seconds[epochs],
                "dev": _cer_wer(decoded["dev"]),
                "test": _cer_wer(decoded["test"]),
                "source": str(scores),
            }
        )
    points.sort(key=lambda p: p["epochs"])
    # not results/curves/: local/results.py reads every file there as a curve
    out = results_dir / "budget" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"target_test_cer": TARGET_CER, "points": points}, indent=2)
    out.write_text(text + "\n")
    plot(points, out.with_suffix(".png"))
    for p in points:
        print(
            f"{p['epochs']:3d} epochs, {p['train_seconds'] / 3600:.2f} h: dev "
            f"{p['dev']['cer']:.1f} / {p['dev']['wer']:.1f}, test "
            f"{p['test']['cer']:.1f} / {p['test']['wer']:.1f} (CER / WER)"
        )
    return out


def _cer_wer(scores: dict) -> dict:
    return {"cer": scores["cer"], "wer": scores["wer"]}


def plot(points: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = [p["train_seconds"] / 3600 for p in points]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for split, style in (("test", "o-"), ("dev", "s--")):
        ax.plot(hours, [p[split]["cer"] for p in points], style, label=f"{split} CER")
    for h, p in zip(hours, points):
        ax.annotate(f"{p['epochs']} ep", (h, p["test"]["cer"]), fontsize=7)
    ax.axhline(TARGET_CER, color="gray", lw=0.8, ls=":", label="target (test)")
    ax.axvline(2.0, color="red", lw=0.8, ls=":", label="2 h budget")
    ax.set_xlabel("training wall-clock (h, ESPnet's epoch timings, one core)")
    ax.set_ylabel("CER (%)")
    ax.set_title("dense conformer: CER per training budget", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("average", help="ESPnet-style average of epoch checkpoints")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("files", type=Path, nargs="+")
    c = sub.add_parser("collect", help="decoded points -> json + plot")
    c.add_argument("exp", type=Path)
    c.add_argument("--budget_row", type=Path, required=True)
    c.add_argument("--name", required=True)
    c.add_argument("--results_dir", type=Path, default=here / "results")
    args = p.parse_args()
    if args.cmd == "average":
        average(args.files, args.out)
    else:
        print("wrote", collect(args.exp, args.budget_row, args.name, args.results_dir))


if __name__ == "__main__":
    main()
