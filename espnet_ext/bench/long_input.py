"""Long input: a 60 s utterance through each encoder of ours vs a 10 s one.

For each training YAML (default: the recipe's configs, one per encoder of ours, and
the dense conformer), build the encoder as ``asr_train`` does (``encoder`` +
``encoder_conf``; ``adapter: saml`` attached as ESPnet's ``create_adapter`` would) and
run it in eval mode under ``torch.inference_mode`` on real speech: dev utterances of
speechocean762 joined end to end into one utterance of each length (default 10 s and
60 s). Per encoder and length it reports the encoder's time (median of ``--repeats``,
this process's CPU time by default, one thread) and its peak memory growth, then the
60 s / 10 s ratios, and those ratios divided by the dense conformer's: 1.0 means the
encoder grows with the input exactly as ESPnet's conformer does (self-attention makes
both grow faster than the length).

Peak memory is measured in-process on Linux: glibc is told to return freed memory
(``mallopt`` fixed mmap threshold, ``malloc_trim``), the kernel's peak-RSS mark is
reset (``/proc/self/clear_refs``) and read back (``VmHWM``) after the forward. Where
that is not possible the memory columns say ``n/a``.

Writes a Markdown report to ``--out`` (default ``bench_results/long_input.md``).
"""

import argparse
import ctypes
import gc
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
import yaml

from espnet_ext.bench.residual import CLOCKS, shared_corpus

REPO = Path(__file__).resolve().parents[2]
RECIPE = "egs2/speechocean762/asr1/conf/tuning/"
CONFIGS = tuple(
    RECIPE + f"train_asr_{name}.yaml"
    for name in (
        "conformer",
        "moe_conformer",
        "shared_moe_conformer",
        "residual_conformer",
        "i3d_conformer",
        "u2_conformer",
        "saml_adapter",
    )
)
ESPNET_ENCODERS = {
    "conformer": "espnet2.asr.encoder.conformer_encoder:ConformerEncoder",
    "transformer": "espnet2.asr.encoder.transformer_encoder:TransformerEncoder",
}
# Training-only keys that need files or a trained model; sizes and speed do not.
_DROP = ("init_from_dense", "init_experts")


def build_encoder(config: Path):
    """(encoder in eval mode, frontend_conf) as ``asr_train`` builds them."""
    from espnet_ext import registry

    conf = yaml.safe_load(config.read_text())
    name = conf.get("encoder")
    path = ESPNET_ENCODERS.get(name)
    if path is None:
        paths = {
            e.key: e.class_path
            for e in registry.entries_for("espnet2.tasks.asr")
            if e.choices == "encoder_choices"
        }
        if name not in paths:
            raise ValueError(f"{config}: encoder {name!r} is neither ESPnet's nor ours")
        path = paths[name]
    frontend_conf = dict(conf.get("frontend_conf") or {})
    enc_conf = {
        k: v for k, v in (conf.get("encoder_conf") or {}).items() if k not in _DROP
    }
    torch.manual_seed(0)
    encoder = registry.load_class(path)(frontend_conf.get("n_mels", 80), **enc_conf)
    if conf.get("use_adapter"):
        if conf.get("adapter") != "saml":
            raise ValueError(f"{config}: only adapter: saml is benchmarked")
        from espnet_ext.adapters.saml import attach_saml

        adapter_conf = {k: v for k, v in conf["adapter_conf"].items() if k not in _DROP}
        attach_saml(encoder, **adapter_conf)
    return encoder.eval(), frontend_conf


def long_features(corpus: Path, seconds: float, frontend_conf: dict):
    """Dev utterances joined end to end, cut at ``seconds``: (1, T, n_mels), (1,)."""
    import numpy as np
    import soundfile as sf
    from espnet2.asr.frontend.default import DefaultFrontend

    need = int(seconds * 16000)
    pieces, total = [], 0
    lines = (corpus / "dev" / "wav.scp").read_text().splitlines()
    for line in lines * (1 + need // 16000):  # enough even for 1 s utterances
        wave, rate = sf.read(corpus / line.split()[1], dtype="float32")
        if rate != 16000:
            raise ValueError(f"{line}: {rate} Hz, expected 16000")
        pieces.append(wave)
        total += len(wave)
        if total >= need:
            break
    wave = torch.from_numpy(np.concatenate(pieces)[:need])
    frontend = DefaultFrontend(fs=16000, **frontend_conf).eval()
    with torch.inference_mode():
        feats, lens = frontend(wave[None], torch.tensor([need]))
    return feats.clone(), lens.clone()


class PeakMemory:
    """Peak resident memory growth of a block of code (Linux, glibc), in bytes."""

    def __init__(self):
        self.ok = False
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            # A fixed mmap threshold: large tensors are mmapped and returned on free
            # (glibc's dynamic threshold would keep them in the heap after the first).
            self.libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
            Path("/proc/self/clear_refs").write_text("5")
            self.ok = self._status("VmHWM") is not None
        except (OSError, AttributeError):
            self.ok = False

    @staticmethod
    def _status(key: str) -> Optional[int]:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return None

    def measure(self, fn) -> Optional[int]:
        if not self.ok:
            fn()
            return None
        gc.collect()
        self.libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # peak := current
        base = self._status("VmRSS")
        fn()
        return self._status("VmHWM") - base


def bench(
    configs: List[Path], corpus: Path, seconds, repeats: int, clock
) -> List[Dict]:
    memory = PeakMemory()
    rows = []
    feats_cache: Dict[str, Dict[float, tuple]] = {}
    for config in configs:
        print(f"[bench long_input] {config} ...", flush=True)
        encoder, frontend_conf = build_encoder(config)
        key = yaml.safe_dump(frontend_conf)
        if key not in feats_cache:
            feats_cache[key] = {
                s: long_features(corpus, s, frontend_conf) for s in seconds
            }
        row = {"config": str(config), "times": {}, "peaks": {}}
        for s in seconds:
            xs, lens = feats_cache[key][s]

            def run():
                with torch.inference_mode():
                    encoder(xs, lens)

            run()  # warm-up: first-call allocations, merges of shared weights
            row["peaks"][s] = memory.measure(run)
            times = []
            for _ in range(repeats):
                start = clock()
                run()
                times.append(clock() - start)
            row["times"][s] = statistics.median(times)
        rows.append(row)
    return rows


def render(rows: List[Dict], seconds, threads: int, clock: str) -> str:
    short, long = seconds
    dense = rows[0]

    def ratio(row, what):
        a, b = row[what][long], row[what][short]
        return None if a is None or b is None or b <= 0 else a / b

    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    mb = 1024 * 1024
    lines = [
        f"# Long input: {long:g} s vs {short:g} s through each encoder",
        "",
        f"`python -m espnet_ext.bench long_input`: CPU, {threads} thread(s), eval "
        f"mode, `torch.inference_mode`, {clock} clock, real speech (dev utterances "
        "joined). Peak memory: growth of the process's peak resident memory during "
        "one forward. `vs dense`: the encoder's long/short ratio divided by the "
        f"first row's ({Path(dense['config']).name}).",
        "",
        f"| config | {short:g} s ms | {long:g} s ms | time x | vs dense "
        f"| {short:g} s MB | {long:g} s MB | memory x | vs dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    d_time, d_mem = ratio(dense, "times"), ratio(dense, "peaks")
    for row in rows:
        t, m = ratio(row, "times"), ratio(row, "peaks")
        peaks = [
            None if row["peaks"][s] is None else row["peaks"][s] / mb
            for s in (short, long)
        ]
        lines.append(
            f"| `{Path(row['config']).name}` "
            f"| {1000 * row['times'][short]:.0f} | {1000 * row['times'][long]:.0f} "
            f"| {fmt(t, '.2f')} | {fmt(t / d_time if t and d_time else None, '.2f')} "
            f"| {fmt(peaks[0], '.1f')} | {fmt(peaks[1], '.1f')} "
            f"| {fmt(m, '.2f')} | {fmt(m / d_mem if m and d_mem else None, '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--configs",
        type=Path,
        nargs="+",
        default=None,
        help="training YAMLs; the first is the reference (default: the recipe's "
        "dense conformer, then one config per encoder of ours)",
    )
    p.add_argument("--seconds", type=float, nargs=2, default=[10.0, 60.0])
    p.add_argument("--threads", type=int, default=1, help="asr.sh decodes with 1")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--corpus", type=Path, default=shared_corpus())
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    p.add_argument("--out", type=Path, default=Path("bench_results/long_input.md"))
    args = p.parse_args(argv)
    if not (args.corpus / "dev" / "wav.scp").exists():
        sys.exit(f"real speech not found at {args.corpus}; pass --corpus")
    if not 0 < args.seconds[0] < args.seconds[1]:
        sys.exit(f"--seconds needs 0 < short < long, got {args.seconds}")
    torch.set_num_threads(args.threads)
    configs = args.configs or [REPO / c for c in CONFIGS]
    rows = bench(configs, args.corpus, args.seconds, args.repeats, CLOCKS[args.clock])
    report = render(rows, args.seconds, args.threads, args.clock)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"[bench long_input] written to {args.out}")


if __name__ == "__main__":
    main()
