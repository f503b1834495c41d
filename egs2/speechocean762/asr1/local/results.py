#!/usr/bin/env python3
"""Collect ``exp_cpu/*/results.json`` into the RESULTS table of README.md and a plot.

Every ``conf/tuning/train_*.yaml`` gets a row; configs without results are marked
*pending*, so the table never shows a number nobody measured.

    python3 local/results.py                 # rewrite README.md's table, write results.png
    python3 local/results.py --print_only    # just print the table
"""

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

BEGIN, END = "<!-- RESULTS:BEGIN -->", "<!-- RESULTS:END -->"
COLUMNS = (
    "config",
    "params (M)",
    "encoder (M)",
    "checkpoint (MB)",
    "WER dev",
    "CER dev",
    "WER test",
    "CER test",
    "decode RTF",
    "train time",
    "command",
)


def load(exp_root: Path, configs: List[Path]) -> Dict[str, Optional[dict]]:
    out = {}
    for cfg in configs:
        res = exp_root / cfg.stem / "results.json"
        out[cfg.stem] = json.loads(res.read_text()) if res.exists() else None
    return out


def _fmt_time(seconds: Optional[float]) -> str:
    if not seconds:
        return "?"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def table(results: Dict[str, Optional[dict]]) -> str:
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, r in results.items():
        cmd = f"`./run_cpu.sh --asr_config conf/tuning/{name}.yaml`"
        if r is None:
            rows.append(
                f"| {name} | "
                + " | ".join(["pending"] * (len(COLUMNS) - 2))
                + f" | {cmd} |"
            )
            continue
        sets = r.get("sets", {})
        cells = [
            name,
            f"{r['params'] / 1e6:.2f}",
            f"{r['encoder_params'] / 1e6:.2f}",
            f"{r['checkpoint_mb']:.1f}",
        ]
        for s in ("dev", "test"):
            v = sets.get(s)
            cells += (
                [f"{v['wer']:.1f}", f"{v['cer']:.1f}"] if v else ["pending", "pending"]
            )
        epochs = f" ({r['epochs']} ep)" if r.get("epochs") else ""
        cells += [f"{r['rtf']:.3f}", _fmt_time(r.get("train_seconds")) + epochs, cmd]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: Dict[str, Optional[dict]], path: Path) -> bool:
    done = {k: v for k, v in results.items() if v and "test" in v.get("sets", {})}
    if not done:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, r in done.items():
        label = name.replace("train_asr_", "")
        wer = r["sets"]["test"]["wer"]
        for ax, x in zip(axes, (r["params"] / 1e6, r["rtf"])):
            ax.scatter(x, wer, s=40)
            ax.annotate(
                label, (x, wer), textcoords="offset points", xytext=(5, 5), fontsize=8
            )
    axes[0].set_xlabel("parameters (M)")
    threads = sorted({r.get("rtf_threads", "?") for r in done.values()})
    axes[1].set_xlabel(
        f"decoding RTF (CPU, {'/'.join(map(str, threads))} thread(s), batch 1)"
    )
    axes[0].set_ylabel("WER on test (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("speechocean762: WER vs size and speed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--exp_root", type=Path, default=here / "exp_cpu")
    p.add_argument("--conf_dir", type=Path, default=here / "conf" / "tuning")
    p.add_argument("--readme", type=Path, default=here / "README.md")
    p.add_argument("--plot", type=Path, default=here / "results.png")
    p.add_argument("--print_only", action="store_true")
    args = p.parse_args()

    configs = sorted(args.conf_dir.glob("train_*.yaml"))
    results = load(args.exp_root, configs)
    text = table(results)
    print(text)
    if args.print_only:
        return
    readme = args.readme.read_text(encoding="utf-8")
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"{args.readme}: markers {BEGIN} / {END} not found")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    args.readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}", encoding="utf-8")
    if plot(results, args.plot):
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
