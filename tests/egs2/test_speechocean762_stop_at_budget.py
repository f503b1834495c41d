"""``local/stop_at_budget.py``: the recipe's wall-clock budget rule, on a fake job."""

import importlib.util
import sys

import pytest
from conftest import REPO

RECIPE = REPO / "egs2" / "speechocean762" / "asr1"
TOOL = RECIPE / "local" / "stop_at_budget.py"

# Two epochs as ESPnet 202511's trainer logs them (shortened).
LOG = (
    "[vm] 2026-11-22 00:47:17,919 (trainer:394) INFO: 1epoch results: [train] "
    "iter_time=0.009, loss=80.0, train_time=2.130, time=6 minutes and 37.62 seconds, "
    "total_count=150, [valid] loss=60.0, time=8.07 seconds, total_count=10\n"
    "[vm] 2026-11-22 00:54:00,000 (trainer:394) INFO: 2epoch results: [train] "
    "loss=70.0, time=1 hour, 2 minutes and 3.5 seconds, total_count=300, [valid] "
    "loss=59.0, time=10 seconds, total_count=20\n"
)


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("stop_at_budget", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_an_epoch_lasts_its_train_and_valid_phases(tool):
    assert tool.epoch_seconds(LOG) == pytest.approx(
        [6 * 60 + 37.62 + 8.07, 3600 + 2 * 60 + 3.5 + 10]
    )


def test_a_timespan_that_is_not_one_is_refused(tool):
    with pytest.raises(ValueError, match="not a timespan"):
        tool.parse_timespan("soon")


def test_the_running_epoch_is_judged_by_the_last_one(tool):
    assert not tool.over_budget([], 10.0)
    assert not tool.over_budget([4.0], 10.0)  # 4 done + 4 running = 8 <= 10
    assert tool.over_budget([4.0, 4.0], 10.0)  # 8 done + 4 running = 12 > 10


def test_a_job_over_budget_is_stopped_and_resumed_with_the_epochs_done(tmp_path):
    """The fake job writes two 1-minute epochs and then hangs; with a 2.5-minute budget
    the tool must stop it and call it again for the later stages, --max_epoch 2."""
    import subprocess

    exp = tmp_path / "exp"
    calls = tmp_path / "calls"
    job = tmp_path / "job.py"
    job.write_text(
        "import pathlib, sys, time\n"
        f"calls = pathlib.Path({str(calls)!r})\n"
        "calls.open('a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "if '--stages' in sys.argv:\n"
        "    sys.exit(0)\n"
        f"log = pathlib.Path({str(exp)!r}) / 'asr_train' / 'train.log'\n"
        "log.parent.mkdir(parents=True)\n"
        "line = '{}epoch results: [train] time=1 minute and 0 seconds, total_count=1'\n"
        "log.write_text(line.format(1) + '\\n' + line.format(2) + '\\n')\n"
        "time.sleep(60)\n"
    )
    out = subprocess.run(
        [sys.executable, str(TOOL), "--exp_dir", str(exp), "--budget_minutes", "2.5"]
        + [
            "--poll_seconds",
            "0.2",
            "--",
            sys.executable,
            str(job),
            "--asr_config",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert out.returncode == 0, out.stderr
    first, resumed = calls.read_text().splitlines()
    assert first == "--asr_config x"
    assert resumed == (
        "--asr_config x --stages train decode score report pack "
        "--train_args --max_epoch 2"
    )
    assert (exp / "asr_train" / "train.epochs1-2.log").exists()
    assert "2 epochs in 2.0 min" in out.stdout


def test_the_last_epoch_is_numbered_from_the_start_of_training(tool):
    resumed = LOG.replace("1epoch results", "24epoch results").replace(
        "2epoch results", "25epoch results"
    )
    assert tool.last_epoch(resumed) == 25 and tool.last_epoch("") == 0
