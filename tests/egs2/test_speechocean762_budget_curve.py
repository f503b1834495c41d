"""``local/budget_curve.py``: checkpoint averaging and the decoded budget points."""

import json

import pytest
import torch
from conftest import recipe_tool


@pytest.fixture(scope="module")
def tool():
    return recipe_tool("budget_curve")


def test_average_is_espnets_floats_averaged_integers_summed(tool, tmp_path):
    files = []
    for i, (w, n) in enumerate([(1.0, 3), (3.0, 4)]):
        files.append(tmp_path / f"{i}epoch.pth")
        torch.save({"w": torch.full((2,), w), "n": torch.tensor(n)}, files[-1])
    tool.average(files, tmp_path / "ave.pth")
    ave = torch.load(tmp_path / "ave.pth")
    assert torch.equal(ave["w"], torch.full((2,), 2.0))
    assert int(ave["n"]) == 7  # as espnet2.main_funcs.average_nbest_models


def test_collect_pairs_each_tagged_decode_with_its_epoch_time(
    tool, tmp_path, monkeypatch
):
    import espnet_ext.bin.measure_asr as measure

    curve = [{"epoch": e, "seconds": 300.0 * e} for e in range(1, 31)]
    monkeypatch.setattr(measure, "training_time", lambda ckpt: {"curve": curve})
    exp = tmp_path / "exp"
    for epochs, cer in ((29, 43.0), (30, 42.0)):
        d = exp / "asr_train" / f"decode_ave_ep{epochs}"
        d.mkdir(parents=True)
        scores = {s: {"cer": cer, "wer": cer + 30} for s in ("dev", "test")}
        (d / "scores.json").write_text(json.dumps(scores))
    row = tmp_path / "row.json"
    sets = {s: {"cer": 46.0, "wer": 75.0} for s in ("dev", "test")}
    row.write_text(json.dumps({"epochs": 23, "train_seconds": 6000.0, "sets": sets}))
    out = tool.collect(exp, row, "dense", tmp_path / "results")
    points = json.loads(out.read_text())["points"]
    assert [(p["epochs"], p["train_seconds"]) for p in points] == [
        (23, 6000.0),
        (29, 8700.0),
        (30, 9000.0),
    ]
    assert [p["test"]["cer"] for p in points] == [46.0, 43.0, 42.0]
    assert out.with_suffix(".png").exists()
