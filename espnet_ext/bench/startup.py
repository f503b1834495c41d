"""What the start-up hook costs every Python process: timed interpreter starts.

Installing espnet_ext puts ``espnet_ext.pth`` into site-packages, which ``site`` runs
at every interpreter start of the environment, ESPnet or not. This benchmark builds
two throw-away virtual environments from the running interpreter (no packages, no
pip): one bare, one with espnet_ext's sources and the same ``espnet_ext.pth`` as a
wheel install. It times ``python -c pass`` in each (runs interleaved, order rotated
each round, medians), also with ``ESPNET_EXT_DISABLE=1``, and lists the modules the
hook imports beyond a bare start (``-X importtime``).

    python -m espnet_ext.bench startup [--runs 40] [--out bench_results/startup.md]

The target (issue 15): with espnet_ext <= 1.1x the bare start.
"""

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path
from typing import Dict, List, Sequence

import espnet_ext

# The one line a wheel install writes (setup.py's STARTUP_FILES; tests check both).
PTH_LINE = "import espnet_ext._autoregister as _m; _m.install()\n"


def make_venvs(root: Path) -> Dict[str, Path]:
    """Create a bare venv and one with espnet_ext installed as a wheel would be.

    Returns:
        ``{"bare": python, "espnet_ext": python}`` interpreter paths.
    """
    out = {}
    for name in ("bare", "espnet_ext"):
        env_dir = root / name
        venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
        out[name] = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [
                str(out["espnet_ext"]),
                "-c",
                "import site; print(site.getsitepackages()[0])",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    shutil.copytree(
        Path(espnet_ext.__file__).parent,
        site / "espnet_ext",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (site / "espnet_ext.pth").write_text(PTH_LINE)
    return out


def _start(python: Path, env: Dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run([str(python), "-c", "pass"], env=env, check=True)
    return time.perf_counter() - t


def time_starts(variants: Dict[str, tuple], runs: int) -> Dict[str, List[float]]:
    """Wall time of ``python -c pass`` per variant, interleaved, rotated each round.

    Args:
        variants: ``{name: (python, env)}``.
        runs: timed runs per variant (after 3 untimed warm-up rounds that also
            write the ``.pyc`` files).
    """
    names = list(variants)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(runs + 3):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            dt = _start(*variants[n])
            if r >= 3:
                times[n].append(dt)
    return times


def imported_modules(python: Path, env: Dict[str, str]) -> List[str]:
    """Modules imported during start-up, in import order (``-X importtime``)."""
    proc = subprocess.run(
        [str(python), "-X", "importtime", "-c", "pass"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    mods = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                mods.append(name)
    return mods


def _clean_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.pop("ESPNET_EXT_DISABLE", None)
    return env


def render(times: Dict[str, List[float]], extra: Sequence[str], runs: int) -> str:
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    base = med["bare venv"]
    lines = [
        "### Interpreter start-up: `python -c pass`, median of "
        f"{runs} interleaved runs",
        "",
        f"Python {platform.python_version()} ({sys.executable}), "
        f"{platform.machine()}, {time.strftime('%Y-%m-%d')}",
        "",
        "| environment | median ms | min ms | / bare venv |",
        "|---|---|---|---|",
    ]
    for n, v in times.items():
        lines.append(
            f"| {n} | {med[n]:.1f} | {min(v) * 1e3:.1f} | {med[n] / base:.2f} |"
        )
    lines += [
        "",
        "Modules the hook imports beyond a bare start (`-X importtime`): "
        + (", ".join(f"`{m}`" for m in extra) or "none"),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--out", type=Path, default=Path("bench_results/startup.md"))
    args = p.parse_args(argv)
    env = _clean_env()
    with tempfile.TemporaryDirectory() as tmp:
        py = make_venvs(Path(tmp))
        variants = {
            "bare venv": (py["bare"], env),
            "with espnet_ext": (py["espnet_ext"], env),
            "with espnet_ext, ESPNET_EXT_DISABLE=1": (
                py["espnet_ext"],
                {**env, "ESPNET_EXT_DISABLE": "1"},
            ),
        }
        print(f"[bench startup] {args.runs} runs x {len(variants)} ...", flush=True)
        times = time_starts(variants, args.runs)
        bare = set(imported_modules(py["bare"], env))
        extra = list(
            dict.fromkeys(
                m for m in imported_modules(py["espnet_ext"], env) if m not in bare
            )
        )
    report = render(times, extra, args.runs)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"[bench startup] written to {args.out}")


if __name__ == "__main__":
    main()
