#!/usr/bin/env python3
"""Build the RESULTS table of README.md and ``results.png`` from the results files.

Every run's numbers live in ``results/<name>.json``, a copy of the ``results.json``
that ``run_cpu.sh`` (``espnet_ext.bin.asr_pipeline``'s report stage) or
``local/pocketsphinx_baseline.py`` wrote. The table and the plot are generated from
these files only, so no number in RESULTS is typed by hand. Every
``conf/tuning/train_*.yaml`` but the language model's gets a row; a config without a
results file is marked *pending*. Results files with ``"reference": true`` (systems
we did not train) come first. Files in ``results/curves/`` hold only the learning curve
of a training run that was not decoded (a diagnostic run, or one stopped early); they
are drawn in the plot's learning-curve panels, never in the table.

    python3 local/results.py --collect exp_cpu   # copy exp_cpu/*/results.json here
    python3 local/results.py                     # rewrite README.md's table + plot
    python3 local/results.py --print_only        # just print the table
    python3 local/results.py --add_curve NAME exp/asr_train/checkpoint.pth \
        --note "what the run changed"            # a curve-only results file
"""

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional

BEGIN, END = "<!-- RESULTS:BEGIN -->", "<!-- RESULTS:END -->"
SAML_BEGIN, SAML_END = "<!-- SAML:BEGIN -->", "<!-- SAML:END -->"
# Configs trained by a script of their own rather than by run_cpu.sh alone.
SCRIPTS = {"train_asr_saml_adapter": "local/run_saml.sh"}
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
    "train utt/s",
    "command",
)


def collect(exp_root: Path, results_dir: Path) -> List[str]:
    """Copy ``exp_root/<name>/results.json`` to ``results_dir/<name>.json`` (and a
    tagged decode's ``results_<tag>.json`` to ``<name>_<tag>.json``)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for src in sorted(exp_root.glob("*/saml_rows.json")):  # local/run_saml.sh
        (results_dir / "saml").mkdir(exist_ok=True)
        text = src.read_text(encoding="utf-8").rstrip("\n") + "\n"
        (results_dir / "saml" / "rows.json").write_text(text, encoding="utf-8")
        copied.append("saml")
    for src in sorted(exp_root.glob("*/results*.json")):
        name = src.parent.name + src.stem[len("results") :]
        if src.parent.name.endswith("_fast"):  # smoke runs never enter RESULTS
            continue
        # One trailing newline, as the pre-commit hooks want text files to end.
        text = src.read_text(encoding="utf-8").rstrip("\n") + "\n"
        (results_dir / f"{name}.json").write_text(text, encoding="utf-8")
        copied.append(name)
    return copied


def row_configs(conf_dir: Path) -> List[Path]:
    """The configs with a row: every training config but the language model's
    (``train_lm*.yaml``; its decodes are rows of their ASR config, ``<config>_lm``)."""
    return [
        c
        for c in sorted(conf_dir.glob("train_*.yaml"))
        if not c.name.startswith("train_lm")
    ]


def load(results_dir: Path, configs: List[Path]) -> Dict[str, Optional[dict]]:
    """``{name: results or None}``: reference systems first, then one per config."""
    out: Dict[str, Optional[dict]] = {}
    files = {p.stem: json.loads(p.read_text()) for p in results_dir.glob("*.json")}
    for name, r in sorted(files.items()):
        if r.get("reference"):
            out[name] = r
    for cfg in configs:
        out[cfg.stem] = files.get(cfg.stem)
        # Tagged decodes of the same trained model (``--decode_tag``) and runs of
        # the same config in another exp dir (``--expdir``, e.g. a longer run with
        # ``--train_args '--max_epoch N'``) follow it.
        for name, r in sorted(files.items()):
            if r.get("decode_tag") and name == f"{cfg.stem}_{r['decode_tag']}":
                out[name] = r
            elif (
                name.startswith(f"{cfg.stem}_")
                and r.get("expdir")
                and Path(r.get("asr_config", "")).stem == cfg.stem
            ):
                out[name] = r
    return out


def load_curves(results_dir: Path) -> Dict[str, dict]:
    """Curve-only results files (``results/curves/<name>.json``)."""
    return {
        p.stem: json.loads(p.read_text())
        for p in sorted((results_dir / "curves").glob("*.json"))
    }


def add_curve(name: str, checkpoint: Path, note: str, results_dir: Path) -> Path:
    """Write ``results/curves/<name>.json`` from an ESPnet ``checkpoint.pth``."""
    from espnet_ext.bin.measure_asr import training_time

    out = results_dir / "curves" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"note": note, **training_time(checkpoint)}, indent=2)
    out.write_text(text + "\n")
    return out


def _fmt_time(seconds: Optional[float]) -> str:
    if not seconds:
        return "?"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _num(r: dict, key: str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    return fmt.format(r[key] / scale) if r.get(key) is not None else "-"


DEFAULT_DECODE = "conf/decode_asr.yaml"  # run_cpu.sh's --inference_config default


def _tts_source(r: dict) -> Optional[str]:
    """``train`` or ``lm`` for a model trained with ``run_cpu.sh --tts``, else None."""
    name = Path(r.get("train_dir", "train")).name
    return name[len("train_tts_") :] if name.startswith("train_tts_") else None


def _command(name: str, r: Optional[dict]) -> str:
    """The run_cpu.sh command that wrote a row (a tagged decode: after training)."""
    if name in SCRIPTS:
        return f"`{SCRIPTS[name]}`"
    r = r or {}
    config = r.get("asr_config", f"conf/tuning/{name}.yaml")
    cmd = f"./run_cpu.sh --asr_config {config}"
    tag = ""  # run_cpu.sh's exp dir suffix for these options
    if r.get("nbpe"):
        cmd += f" --token_type bpe --nbpe {r['nbpe']}"
        tag += f"_bpe{r['nbpe']}"
    tts = _tts_source(r)
    if tts:
        cmd += f" --tts {tts}"
        tag += f"_tts{tts}"
    default_expdir = f"exp_cpu/{Path(config).stem}{tag}" if tag else None
    if r.get("expdir") and r["expdir"] != default_expdir:
        cmd += f" --expdir {r['expdir']}"
    if r.get("train_args"):
        cmd += f" --train_args '{r['train_args']}'"
    if r.get("inference_config") not in (None, DEFAULT_DECODE):
        cmd += f" --inference_config {r['inference_config']}"
    if r.get("lm"):
        # run_cpu.sh tags an LM decode "lm" itself; the lm stage finds its LM trained.
        cmd += " --use_lm true"
        if r.get("decode_tag") != "lm":
            cmd += f" --decode_tag {r['decode_tag']}"
        cmd += " --stages 'lm decode score report'"
    elif r.get("decode_tag"):
        cmd += f" --decode_tag {r['decode_tag']} --stages 'decode score report'"
    return f"`{cmd}`"


def table(results: Dict[str, Optional[dict]]) -> str:
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, r in results.items():
        if r is not None and r.get("reference"):
            cmd = f"`python3 local/{r.get('script', name + '.py')}`"
            label = f"{name} (reference: {r.get('system', name)})"
        else:
            cmd = _command(name, r)
            label = name
        if r is not None and r.get("lm"):
            # The LM is not in the ASR model's columns: its size and training here.
            lm = r["lm"]
            label += f" (+ LM: {lm['params'] / 1e6:.2f}M, trained "
            label += f"{_fmt_time(lm.get('train_seconds'))})"
        if r is not None and _tts_source(r):
            label += f" (+ synthetic speech: {r.get('train_utts', '?')} utts in all)"
        if r is not None and r.get("teacher"):
            # A distilled row's teacher trained before it: its time is not in the
            # row's train time column, so the label says it.
            teacher = r["teacher"]
            label += f" (+ teacher: {teacher['params'] / 1e6:.2f}M, trained "
            label += f"{_fmt_time(teacher.get('train_seconds'))})"
        if r is None:
            rows.append(
                f"| {label} | "
                + " | ".join(["pending"] * (len(COLUMNS) - 2))
                + f" | {cmd} |"
            )
            continue
        sets = r.get("sets", {})
        cells = [
            label,
            _num(r, "params", 1e6),
            _num(r, "encoder_params", 1e6),
            _num(r, "checkpoint_mb", fmt="{:.1f}"),
        ]
        for s in ("dev", "test"):
            v = sets.get(s)
            cells += (
                [f"{v['wer']:.1f}", f"{v['cer']:.1f}"] if v else ["pending", "pending"]
            )
        if r.get("train_seconds"):
            train = _fmt_time(r["train_seconds"]) + f" ({r['epochs']} ep)"
        else:
            train = "-"
        cells += [
            _num(r, "rtf", fmt="{:.3f}"),
            train,
            _num(r, "train_utts_per_second", fmt="{:.1f}"),
            cmd,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def saml_table(rows_file: Path) -> Optional[str]:
    """README's SAML table from ``results/saml/rows.json`` (``local/saml_rows.py``);
    None when SAML has not run."""
    if not rows_file.exists():
        return None
    data = json.loads(rows_file.read_text())
    lines = [
        f"Base: `{data['base']}`. Test speakers: adaptation on the first "
        "utterances of each, WER/CER on the last 10 (`local/run_saml.sh`); adapt s = "
        "wall clock of one speaker's adaptation steps, one thread.",
        "",
        "| model | WER | CER | scored utts | speakers | adapt utts | "
        "adapt s / speaker | adapter KB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        adapted = r["adapt_seconds_mean"] > 0
        lines.append(
            f"| {r['label']} | {r['wer']:.1f} | {r['cer']:.1f} | {r['utterances']} "
            f"| {r['speakers']} | {r['adapt_utts'] if adapted else '-'} | "
            + (
                f"{r['adapt_seconds_mean']:.1f} | {r['adapter_bytes_mean'] / 1e3:.0f}"
                if adapted
                else "- | -"
            )
            + " |"
        )
    missing = 4 - len(data["rows"])
    if missing:
        lines += ["", f"{missing} of the 4 rows not run yet."]
    return "\n".join(lines)


def _replace_block(text: str, begin: str, end: str, block: str) -> str:
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{block}\n{end}{tail}"


def plot(
    results: Dict[str, Optional[dict]], path: Path, curves: Optional[dict] = None
) -> bool:
    """Test CER vs size and decoding speed; validation curves vs training time.

    ``curves`` (curve-only runs, see :func:`load_curves`) are drawn dashed in the
    learning-curve panels.
    """
    done = {k: v for k, v in results.items() if v and "test" in v.get("sets", {})}
    curves = curves or {}
    if not done and not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ax_par, ax_rtf), (ax_acc, ax_cer) = axes
    for ax in (ax_acc, ax_cer):  # more runs than the default cycle's 10 colours
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for name, r in done.items():
        label = name.replace("train_asr_", "")
        cer = r["sets"]["test"]["cer"]
        if r.get("reference"):
            for ax in (ax_par, ax_rtf):
                ax.axhline(cer, ls="--", c="gray", lw=1)
                ax.annotate(
                    f"{label} (no training)",
                    (0.01, cer),
                    fontsize=8,
                    xycoords=("axes fraction", "data"),
                    va="bottom",
                )
            continue
        for ax, x in ((ax_par, r["params"] / 1e6), (ax_rtf, r["rtf"])):
            ax.scatter(x, cer, s=40)
            ax.annotate(
                label, (x, cer), textcoords="offset points", xytext=(5, 5), fontsize=8
            )
        if not r.get("decode_tag"):  # a tagged decode shares its model's training
            _draw_curve(ax_acc, ax_cer, r.get("curve", []), label, "-")
    for name, r in curves.items():
        _draw_curve(ax_acc, ax_cer, r["curve"], f"{name} (not decoded)", "--")
    ax_par.set_xlabel("parameters (M)")
    threads = sorted(
        {r.get("rtf_threads", "?") for r in done.values() if not r.get("reference")}
    )
    ax_rtf.set_xlabel(
        f"decoding RTF (CPU, {'/'.join(map(str, threads))} thread(s), batch 1)"
    )
    for ax in (ax_par, ax_rtf):
        ax.set_ylabel("CER on test (%)")
    ax_acc.set_ylabel("validation accuracy (attention decoder)")
    ax_cer.set_ylabel("validation CER (CTC greedy)")
    for ax in (ax_acc, ax_cer):
        ax.set_xlabel("training wall-clock (h, one core)")
    # One legend for both curve panels, beside them: inside, it hid the curves.
    ax_cer.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle("speechocean762: test CER vs size and speed; learning curves")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return True


def _draw_curve(ax_acc, ax_cer, curve: List[dict], label: str, style: str) -> None:
    hours = [p["seconds"] / 3600 for p in curve]
    for ax, key in ((ax_acc, "valid_acc"), (ax_cer, "valid_cer_ctc")):
        pts = [(h, p[key]) for h, p in zip(hours, curve) if key in p]
        if pts:
            ax.plot(*zip(*pts), style, marker=".", label=label)


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--collect",
        type=Path,
        default=None,
        metavar="EXP_ROOT",
        help="first copy EXP_ROOT/*/results.json into --results_dir",
    )
    p.add_argument("--results_dir", type=Path, default=here / "results")
    p.add_argument("--conf_dir", type=Path, default=here / "conf" / "tuning")
    p.add_argument("--readme", type=Path, default=here / "README.md")
    p.add_argument("--plot", type=Path, default=here / "results.png")
    p.add_argument("--print_only", action="store_true")
    p.add_argument(
        "--add_curve",
        nargs=2,
        metavar=("NAME", "CHECKPOINT"),
        default=None,
        help="write results/curves/NAME.json from an ESPnet checkpoint.pth",
    )
    p.add_argument("--note", default="", help="with --add_curve: what the run was")
    args = p.parse_args()

    if args.add_curve:
        name, ckpt = args.add_curve
        print("wrote", add_curve(name, Path(ckpt), args.note, args.results_dir))

    if args.collect:
        print("collected:", ", ".join(collect(args.collect, args.results_dir)))
    configs = row_configs(args.conf_dir)
    results = load(args.results_dir, configs)
    text = table(results)
    print(text)
    if args.print_only:
        return
    readme = args.readme.read_text(encoding="utf-8")
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"{args.readme}: markers {BEGIN} / {END} not found")
    readme = _replace_block(readme, BEGIN, END, text)
    saml = saml_table(args.results_dir / "saml" / "rows.json")
    if saml is not None:
        if SAML_BEGIN not in readme or SAML_END not in readme:
            raise SystemExit(
                f"{args.readme}: markers {SAML_BEGIN} / {SAML_END} not found"
            )
        readme = _replace_block(readme, SAML_BEGIN, SAML_END, saml)
    args.readme.write_text(readme, encoding="utf-8")
    if plot(results, args.plot, load_curves(args.results_dir)):
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
