"""espnet_ext.bin.run: registration reaches spawned workers without .pth files."""

import os
import site
import subprocess
import sys

import pytest
from conftest import REPO

PROBE = """
def child(q):
    import espnet2.tasks.asr as asr
    q.put("moe_conformer" in asr.encoder_choices.classes)
"""

MAIN = """
import multiprocessing as mp
import probe_worker
if __name__ == "__main__":
    ctx = mp.get_context("spawn"); q = ctx.Queue()
    p = ctx.Process(target=probe_worker.child, args=(q,)); p.start(); p.join()
    # after join: the child's import time (minutes on a loaded machine) is not
    # bounded here, only by the test's subprocess timeout
    print("child has moe_conformer:", q.get(timeout=60))
"""


def test_spawned_worker_of_a_python_s_parent_registers_through_the_runner(tmp_path):
    (tmp_path / "probe_worker.py").write_text(PROBE)
    (tmp_path / "probe_main.py").write_text(MAIN)
    # -S: no site-packages, no .pth files; everything comes from PYTHONPATH.
    path = [str(tmp_path), str(REPO), *site.getsitepackages()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    env.pop("ESPNET_EXT_DISABLE", None)
    proc = subprocess.run(
        [sys.executable, "-S", "-m", "espnet_ext.bin.run", "probe_main"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "child has moe_conformer: True" in proc.stdout


def test_runner_without_a_module_prints_its_usage():
    from espnet_ext.bin import run

    with pytest.raises(SystemExit, match="usage: python -m espnet_ext.bin.run"):
        run.main(["--config", "x.yaml"])
