"""End to end on real speech: the asr.sh chain of ``python -m espnet2.bin.*`` calls.

collect_stats -> aggregate_stats_dirs -> asr_train -> asr_inference -> pack, each in a
fresh interpreter that never imports espnet_ext by name, on 8 real utterances with a
tiny moe_conformer and ``model: espnet_ext``.
"""

import zipfile

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(speechocean, tmp_path_factory):
    from espnet_ext.bin import asr_pipeline

    exp = tmp_path_factory.mktemp("e2e")
    asr_pipeline.main([
        "--train_dir", str(speechocean / "train"), "--valid_dir", str(speechocean / "dev"),
        "--asr_config", str(REPO / "tests/conf/tiny_moe_conformer.yaml"),
        "--inference_config", str(REPO / "tests/conf/decode_tiny.yaml"),
        "--exp_dir", str(exp), "--max_train_utts", "8", "--max_eval_utts", "3",
    ])
    return exp


def test_every_utterance_is_decoded(trained):
    ref = (trained / "data/valid/text").read_text().split("\n")
    hyp_file = next(trained.glob("asr_train/decode_*/valid/1best_recog/text"))
    ref_ids = {l.split()[0] for l in ref if l.strip()}
    hyp_ids = {l.split()[0] for l in hyp_file.read_text().splitlines() if l.strip()}
    assert len(ref_ids) == 3 and hyp_ids == ref_ids


def test_training_log_shows_aux_losses_and_routing_stats(trained):
    log = (trained / "asr_train/train.log").read_text()
    for key in ("loss_enc_moe_balance=", "enc_moe_load_entropy=", "dec_moe_load_max=",
                "enc_moe_frac_e3="):
        assert key in log


def test_checkpoint_reloads_without_missing_or_unexpected_keys(trained):
    from espnet2.tasks.asr import ASRTask

    from espnet_ext.encoders.moe_conformer import MoEConformerEncoder
    from espnet_ext.models.asr_model import ESPnetExtASRModel

    asr_dir = trained / "asr_train"
    model, _ = ASRTask.build_model_from_file(asr_dir / "config.yaml", None, "cpu")
    assert isinstance(model, ESPnetExtASRModel)
    assert isinstance(model.encoder, MoEConformerEncoder)
    state = torch.load(asr_dir / "latest.pth", map_location="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == [] and unexpected == []


def test_packed_model_contains_config_and_weights(trained):
    with zipfile.ZipFile(trained / "asr_model.zip") as z:
        names = z.namelist()
    assert any(n.endswith("config.yaml") for n in names)
    assert any(n.endswith(".pth") for n in names)
