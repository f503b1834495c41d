"""``local/stop_at_budget.py``: the recipe's wall-clock budget rule, on a fake job."""

import sys

import pytest
from conftest import RECIPE, recipe_tool

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
    return recipe_tool("stop_at_budget")


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


def _fake_job(tmp_path, epochs: int, final: int, save_after: float):
    """A training command that logs ``epochs`` 1-minute epochs of a ``final``-epoch
    run, points latest.pth at the last one ``save_after`` seconds later (as ESPnet
    saves after logging), then hangs, or exits when its last epoch is ``final``. On
    SIGTERM it records whether the last epoch was saved."""
    exp, calls = tmp_path / "exp", tmp_path / "calls"
    job = tmp_path / "job.py"
    job.write_text(
        "import pathlib, signal, sys, time\n"
        f"calls = pathlib.Path({str(calls)!r})\n"
        "calls.open('a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "if '--stages' in sys.argv:\n"
        "    sys.exit(0)\n"
        f"d = pathlib.Path({str(exp)!r}) / 'asr_train'\n"
        "d.mkdir(parents=True)\n"
        "def stopped(*_):\n"
        "    (d / 'stopped').write_text(str((d / 'latest.pth').is_symlink()))\n"
        "    sys.exit(1)\n"
        "signal.signal(signal.SIGTERM, stopped)\n"
        "line = '{0}/%depoch started\\n{0}epoch results: [train] "
        "time=1 minute and 0 seconds, total_count=1\\n'\n"
        f"n = {epochs}\n"
        f"(d / 'train.log').write_text(''.join(line.format(i) for i in range(1, n + 1))"
        f" % (({final},) * n))\n"
        f"time.sleep({save_after})\n"
        "(d / f'{n}epoch.pth').write_text('')\n"
        "(d / 'latest.pth').symlink_to(f'{n}epoch.pth')\n"
        f"time.sleep(1 if n == {final} else 60)\n"
    )
    return exp, calls, job


def _run_tool(exp, job, budget_minutes: str):
    import subprocess

    return subprocess.run(
        [sys.executable, str(TOOL), "--exp_dir", str(exp)]
        + ["--budget_minutes", budget_minutes, "--poll_seconds", "0.2", "--"]
        + [sys.executable, str(job), "--asr_config", "x"],
        capture_output=True,
        text=True,
        timeout=50,
    )


def test_a_job_over_budget_is_stopped_and_resumed_with_the_epochs_done(tmp_path):
    """Two 1-minute epochs of a 5-epoch run with a 2.5-minute budget: the tool must
    stop the job and call it again for the later stages, --max_epoch 2."""
    exp, calls, job = _fake_job(tmp_path, epochs=2, final=5, save_after=0)
    out = _run_tool(exp, job, "2.5")
    assert out.returncode == 0, out.stderr
    first, resumed = calls.read_text().splitlines()
    assert first == "--asr_config x"
    assert resumed == (
        "--asr_config x --stages train decode score report pack "
        "--train_args --max_epoch 2"
    )
    assert (exp / "asr_train" / "train.epochs1-2.log").exists()
    assert "2 epochs in 2.0 min" in out.stdout


def test_a_job_is_stopped_only_after_its_last_epoch_is_saved(tmp_path):
    exp, calls, job = _fake_job(tmp_path, epochs=2, final=5, save_after=1.5)
    out = _run_tool(exp, job, "2.5")
    assert out.returncode == 0, out.stderr
    assert (exp / "asr_train" / "stopped").read_text() == "True"


def test_a_job_in_its_final_epoch_is_left_to_finish(tmp_path):
    """Over budget, but the last epoch logged is max_epoch: nothing to skip."""
    exp, calls, job = _fake_job(tmp_path, epochs=2, final=2, save_after=0)
    out = _run_tool(exp, job, "2.5")
    assert out.returncode == 0, out.stderr
    assert calls.read_text().splitlines() == ["--asr_config x"]
    assert not (exp / "asr_train" / "stopped").exists()


def test_the_final_epoch_is_read_from_espnets_start_lines(tool):
    assert tool.final_epoch("[vm] ... INFO: 3/15epoch started. Estimated time") == 15
    assert tool.final_epoch(LOG) is None


def test_the_last_epoch_is_numbered_from_the_start_of_training(tool):
    resumed = LOG.replace("1epoch results", "24epoch results").replace(
        "2epoch results", "25epoch results"
    )
    assert tool.last_epoch(resumed) == 25 and tool.last_epoch("") == 0
