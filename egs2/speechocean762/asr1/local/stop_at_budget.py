#!/usr/bin/env python3
"""Run a training command under the recipe's wall-clock budget (README, "Protocol").

ESPnet stops training after ``max_epoch`` epochs, not after a time. Each config's
``max_epoch`` is sized from its measured epoch time, but a busier machine makes epochs
slower. This tool starts the command, reads ESPnet's own per-epoch timing from
``<exp_dir>/asr_train/train.log`` ("Nepoch results: ... time=6 minutes and 37.6
seconds"), and once the running epoch would end past the budget (judged by the last
epoch's duration) it stops the command, once epoch K is saved, and runs it again
with ``--max_epoch K``, K being the epochs done, and the later stages only. A run whose
last epoch is its ``max_epoch`` is left to finish. ESPnet resumes from
``checkpoint.pth``, finds nothing left to train, averages the best checkpoints, and the
pipeline decodes and scores as usual. The interrupted ``train.log`` is kept as
``train.epochs1-K.log``.

    local/stop_at_budget.py --exp_dir exp_cpu/train_asr_conformer \\
        --budget_minutes 120 -- \\
        ./run_cpu.sh --asr_config conf/tuning/train_asr_conformer.yaml

The command must accept run_cpu.sh's ``--stages`` and ``--train_args`` options.

To continue a finished run past its epochs (``--train_args '--max_epoch N'``), give the
minutes left: the budget covers the epochs this command trains (the pipeline rewrites
``train.log``; a log older than the command is ignored), and ``--max_epoch K`` counts
from the start of training as ESPnet does.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

# humanfriendly.format_timespan, as ESPnet's reporter writes it: "45.2 seconds",
# "6 minutes and 37.62 seconds", "1 hour, 2 minutes and 3.5 seconds".
# An epoch's line has one per phase ([train], [valid]); the epoch lasts their sum.
_EPOCH = re.compile(r"(\d+)epoch results: (.*)")  # (epoch number, phases)
_STARTED = re.compile(r"(\d+)/(\d+)epoch started")
_PHASE = re.compile(r"\btime=(.+?), total_count")
_UNIT = re.compile(r"([\d.]+) (week|day|hour|minute|second)s?")
_SECONDS = {"week": 604800, "day": 86400, "hour": 3600, "minute": 60, "second": 1}
RESUME_STAGES = "train decode score report pack"


def parse_timespan(text: str) -> float:
    """Seconds in a humanfriendly timespan such as ``"6 minutes and 37.6 seconds"``."""
    parts = _UNIT.findall(text)
    if not parts:
        raise ValueError(f"not a timespan: {text!r}")
    return sum(float(n) * _SECONDS[unit] for n, unit in parts)


def epoch_seconds(log_text: str) -> List[float]:
    """ESPnet's wall-clock time of each finished epoch, in order, from a train.log."""
    return [
        sum(parse_timespan(t) for t in _PHASE.findall(m.group(2)))
        for m in _EPOCH.finditer(log_text)
    ]


def last_epoch(log_text: str) -> int:
    """The number of the last finished epoch in a train.log (ESPnet counts from the
    start of training, so a resumed run's log starts past 1)."""
    numbers = [int(m.group(1)) for m in _EPOCH.finditer(log_text)]
    return max(numbers, default=0)


def final_epoch(log_text: str) -> Optional[int]:
    """The run's ``max_epoch``, from ESPnet's "3/15epoch started" lines (None before
    the first)."""
    found = _STARTED.findall(log_text)
    return int(found[-1][1]) if found else None


def over_budget(epochs: List[float], budget_s: float) -> bool:
    """Whether the running epoch would end past the budget (it lasts as the last)."""
    return bool(epochs) and sum(epochs) + epochs[-1] > budget_s


def saved(train_dir: Path, epoch: int) -> bool:
    """Whether ESPnet has saved ``epoch``. It logs an epoch's results before it writes
    ``checkpoint.pth`` and ``{epoch}epoch.pth``, and points ``latest.pth`` at the latter
    last: stopping in between would lose the epoch (the resumed run trains it again)."""
    latest = train_dir / "latest.pth"
    return latest.is_symlink() and os.readlink(latest) == f"{epoch}epoch.pth"


def should_stop(log_text: str, train_dir: Path, budget_s: float) -> bool:
    """Over budget, with a next epoch to skip, and the last one saved."""
    done = last_epoch(log_text)
    return (
        over_budget(epoch_seconds(log_text), budget_s)
        and done != final_epoch(log_text)
        and saved(train_dir, done)
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exp_dir", required=True, type=Path)
    p.add_argument("--budget_minutes", type=float, default=120.0)
    p.add_argument("--poll_seconds", type=float, default=20.0)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the training command after --")
    if args.budget_minutes <= 0:
        p.error(f"--budget_minutes must be > 0, got {args.budget_minutes}")
    budget_s = args.budget_minutes * 60
    log = args.exp_dir / "asr_train" / "train.log"

    # Own process group, so stopping it stops the pipeline and every ESPnet child.
    started = time.time()
    job = subprocess.Popen(command, start_new_session=True)
    while job.poll() is None:
        # A log older than the job is a previous run's (the pipeline rewrites it).
        fresh = log.exists() and log.stat().st_mtime >= started
        text = log.read_text() if fresh else ""
        if should_stop(text, log.parent, budget_s):
            break
        time.sleep(args.poll_seconds)
    else:
        return job.returncode

    # A resumed run's log holds only its own epochs; ESPnet numbers them from the
    # start of training, and --max_epoch counts the same way.
    done = last_epoch(text)
    epochs = epoch_seconds(text)
    print(
        f"stop_at_budget: {len(epochs)} epochs in {sum(epochs) / 60:.1f} min; the next "
        f"would end at ~{(sum(epochs) + epochs[-1]) / 60:.1f} min > "
        f"{args.budget_minutes:g} min: stopping and resuming with --max_epoch {done}",
        flush=True,
    )
    os.killpg(job.pid, signal.SIGTERM)
    try:
        job.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    log.rename(log.with_name(f"train.epochs{done - len(epochs) + 1}-{done}.log"))
    resume = command + [
        "--stages",
        RESUME_STAGES,
        "--train_args",
        f"--max_epoch {done}",
    ]
    return subprocess.call(resume)


if __name__ == "__main__":
    sys.exit(main())
