"""Distributed data parallel on CPU (gloo), two processes, every class of ours.

ESPnet 202511 trains on CPU in DDP with one process per rank started by a launcher
(``torchrun --nproc_per_node 2 -m espnet2.bin.asr_train --ngpu 0 --dist_backend gloo
--dist_init_method env:// --multiprocessing_distributed false``; its own
``--multiprocessing_distributed`` spawner needs ``--ngpu > 1``). Here the two processes
are spawned by one script (``tests/ddp_worker.py``), which runs every case of
``tests/model_zoo.py`` through DDP without ``find_unused_parameters`` and through
ESPnet's trainer.
"""

import json
import random

import pytest
from conftest import REPO, run_python
from model_zoo import CASES

SCRIPT = r"""
import sys
sys.path.insert(0, {tests!r})
import torch.multiprocessing as mp
from ddp_worker import worker

if __name__ == "__main__":
    mp.spawn(worker, args=(2, {port}, {out!r}, {corpus!r}, {cases!r}), nprocs=2)
"""


@pytest.fixture(scope="module")
def ddp_results(speechocean, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    port = random.Random().randrange(20000, 60000)
    code = SCRIPT.format(
        tests=str(REPO / "tests"),
        port=port,
        out=str(out),
        corpus=str(speechocean),
        cases=list(CASES),
    )
    run_python(code, {"OMP_NUM_THREADS": "1"}, timeout=900)
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_ddp_gradients_equal_one_process_on_the_global_batch(case, ddp_results):
    res = ddp_results[case]
    assert "error" not in res, res.get("error")
    assert res["same_grad_params"] and res["num_grads"] > 0
    assert res["max_grad_diff"] < 1e-5, res


@pytest.mark.parametrize("case", CASES)
def test_ddp_ranks_hold_identical_parameters_after_two_steps(case, ddp_results):
    res = ddp_results[case]
    assert "error" not in res, res.get("error")
    assert res["ranks_agree"]


@pytest.mark.parametrize("case", CASES)
def test_espnet_trainer_runs_ddp_on_cpu_without_unused_parameters(case, ddp_results):
    assert ddp_results[case]["espnet_trainer"] is True, ddp_results[case]
