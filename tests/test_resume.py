"""Exact resume and checkpoint integrity through ESPnet's trainer and packer, every
class of ours (``tests/model_zoo.py``).

Two worker processes (``tests/resume_worker.py``) share the cases; for each, training
interrupted after epoch 1 and resumed with ``--resume true`` must end bit-identical to
an uninterrupted 2-epoch run (parameters, buffers, optimiser and scheduler state), and
the trained model must survive ``pack`` -> ``Speech2Text.from_pretrained`` key for key.
"""

import json

import pytest
from conftest import REPO, run_python
from model_zoo import CASES

SCRIPT = r"""
import json, sys
sys.path.insert(0, {tests!r})
import torch.multiprocessing as mp
from resume_worker import worker

if __name__ == "__main__":
    cases = {cases!r}
    shares = [cases[0::2], cases[1::2]]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(shares, {out!r}, {corpus!r}, results), nprocs=2)
        print(json.dumps(dict(results)))
"""


@pytest.fixture(scope="module")
def resume_results(speechocean, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    code = SCRIPT.format(
        tests=str(REPO / "tests"),
        out=str(out),
        corpus=str(speechocean),
        cases=list(CASES),
    )
    proc = run_python(code, {"OMP_NUM_THREADS": "1"}, timeout=900)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_resumed_training_ends_identical_to_an_uninterrupted_one(case, resume_results):
    res = resume_results[case]
    assert "error" not in res, res.get("error")
    assert res["differences"] == {"model": [], "optimizers": [], "schedulers": []}


@pytest.mark.parametrize("case", CASES)
def test_resume_runs_only_the_remaining_epoch(case, resume_results):
    res = resume_results[case]
    assert "error" not in res, res.get("error")
    assert res["resumed_forwards"] == 2  # epoch 2: 4 utterances, batches of 2


@pytest.mark.parametrize("case", CASES)
def test_packed_model_loads_with_no_missing_or_unexpected_keys(case, resume_results):
    res = resume_results[case]
    assert "error" not in res, res.get("error")
    assert res["pack"] == {
        "missing": [],
        "unexpected": [],
        "changed": [],
        "decoded": True,
    }
