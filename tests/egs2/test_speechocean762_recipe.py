"""egs2/speechocean762/asr1 on the real corpus.

``local/data.sh`` must write valid Kaldi dirs; ``run_cpu.sh --fast true`` (the
no-checkout runner: the asr.sh chain of ``python -m espnet2.bin.*`` calls, each in a
fresh interpreter that never imports espnet_ext by name) must train, decode, score as
asr.sh does, report and pack the MoE config end to end, and the packed model must decode
as the unpacked one.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import RECIPE, recipe_tool

from espnet_ext.bin.scoring import score_set


def _run(cmd, corpus: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, SPEECHOCEAN762=str(corpus))
    env.pop("ESPNET_EXT_DISABLE", None)
    proc = subprocess.run(
        cmd, cwd=RECIPE, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert (
        proc.returncode == 0
    ), f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _table(path: Path):
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return [tuple(ln.split(" ", 1)) for ln in lines]


@pytest.fixture(scope="module")
def data_dir(speechocean, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    _run(["bash", "local/data.sh", "--data_dir", str(out)], speechocean)
    return out


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_data_sh_writes_sorted_kaldi_dirs_with_matching_ids(data_dir, split):
    d = data_dir / split
    tables = {f: _table(d / f) for f in ("wav.scp", "text", "utt2spk", "spk2utt")}
    for name, rows in tables.items():
        keys = [k for k, _ in rows]
        # LC_ALL=C sort order (bytes), no duplicates: what
        # utils/validate_data_dir.sh checks.
        assert keys == sorted(
            set(keys), key=lambda k: k.encode()
        ), f"{split}/{name} not sorted/unique"
    utts = [k for k, _ in tables["wav.scp"]]
    assert utts == [k for k, _ in tables["text"]] == [k for k, _ in tables["utt2spk"]]
    utt2spk = dict(tables["utt2spk"])
    spk2utt = {s: u.split() for s, u in tables["spk2utt"]}
    assert sorted(u for us in spk2utt.values() for u in us) == utts
    assert all(utt2spk[u] == s for s, us in spk2utt.items() for u in us)
    # Kaldi also needs utterances grouped by speaker in utterance order.
    assert [u for _, us in sorted(spk2utt.items()) for u in us] == utts
    for _, path in tables["wav.scp"]:
        assert Path(path).is_absolute() and Path(path).is_file(), path


def test_data_sh_splits_have_expected_sizes_and_disjoint_speakers(data_dir):
    spk = {
        s: {k for k, _ in _table(data_dir / s / "spk2utt")}
        for s in ("train", "dev", "test")
    }
    n = {s: len(_table(data_dir / s / "text")) for s in ("train", "dev", "test")}
    assert n == {"train": 2400, "dev": 100, "test": 220}
    assert not (spk["train"] & spk["dev"]) and not (spk["train"] & spk["test"])


def test_data_sh_reads_the_original_corpus_layout(tmp_path):
    """OpenSLR 101 ships train/ and test/ with WAVE/SPEAKERxxxx/*.WAV paths."""
    root = tmp_path / "speechocean762"
    for split, spks in (("train", ["0001", "0002"]), ("test", ["0003"])):
        (root / split).mkdir(parents=True)
        rows = [(f"0{s}{i:04d}", s) for s in spks for i in range(2)]
        for utt, s in rows:
            wav = root / "WAVE" / f"SPEAKER{s}" / f"{utt}.WAV"
            wav.parent.mkdir(parents=True, exist_ok=True)
            wav.write_bytes(b"RIFF")
        (root / split / "wav.scp").write_text(
            "".join(f"{u} WAVE/SPEAKER{s}/{u}.WAV\n" for u, s in rows)
        )
        (root / split / "text").write_text(
            "".join(f"{u} HELLO WORLD\n" for u, _ in rows)
        )
        (root / split / "utt2spk").write_text("".join(f"{u} {s}\n" for u, s in rows))
    out = tmp_path / "data"
    _run(["bash", "local/data.sh", "--data_dir", str(out), "--dev_every", "2"], root)
    assert [k for k, _ in _table(out / "test" / "wav.scp")] == [
        "000030000",
        "000030001",
    ]
    assert {s for s, _ in _table(out / "dev" / "spk2utt")} == {"0001"}
    assert {s for s, _ in _table(out / "train" / "spk2utt")} == {"0002"}


def test_data_sh_names_the_corpus_variable_when_the_corpus_is_missing(tmp_path):
    env = dict(os.environ, SPEECHOCEAN762=str(tmp_path / "nowhere"))
    proc = subprocess.run(
        ["bash", "local/data.sh", "--data_dir", str(tmp_path / "d")],
        cwd=RECIPE,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "SPEECHOCEAN762" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def fast_run(speechocean, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fast")
    proc = _run(
        [
            "./run_cpu.sh",
            "--fast",
            "true",
            "--asr_config",
            "conf/tuning/train_asr_moe_conformer.yaml",
            "--expdir",
            str(tmp / "exp"),
            "--datadir",
            str(tmp / "data"),
        ],
        speechocean,
    )
    return tmp / "exp", proc.stdout + proc.stderr


@pytest.mark.slow
def test_fast_run_prints_wer_and_writes_results(fast_run):
    exp, out = fast_run
    res = json.loads((exp / "results.json").read_text())
    assert set(res["sets"]) == {"dev_fast", "test_fast"}
    for name, scores in res["sets"].items():
        assert f"{name}: WER {scores['wer']:.1f}%  CER {scores['cer']:.1f}%" in out
    assert res["params"] > res["encoder_params"] > 0 and res["rtf"] > 0
    assert res["train_seconds"] > 0 and res["epochs"] == 1
    assert Path(res["train_dir"]).name == "train_fast"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dev_fast", "test_fast"])
def test_fast_run_scores_are_asr_sh_scores_of_its_decodes(fast_run, name, tmp_path):
    # Rescore the run's own reference and hypotheses the way asr.sh does (ESPnet's
    # tokens, sclite's alignment) and find exactly the reported numbers.
    exp, _ = fast_run
    decode = next(exp.glob(f"asr_train/decode_*/{name}"))
    expected = score_set(
        exp / "data" / name / "text",
        decode / "1best_recog" / "text",
        exp / "data" / name / "utt2spk",
        tmp_path,
        sclite=None,
    )
    reported = json.loads((exp / "results.json").read_text())["sets"][name]
    assert reported["counts"] == expected["counts"]
    assert (reported["wer"], reported["cer"]) == (expected["wer"], expected["cer"])
    # asr.sh's files: char references carry the spaces as <space> tokens
    assert "<space>" in (decode / "score_cer" / "ref.trn").read_text()


@pytest.mark.slow
def test_fast_run_decodes_every_utterance(fast_run):
    exp, _ = fast_run
    for name in ("dev_fast", "test_fast"):
        ref = {
            ln.split()[0]
            for ln in (exp / "data" / name / "text").read_text().splitlines()
            if ln.strip()
        }
        hyp_file = next(exp.glob(f"asr_train/decode_*/{name}/1best_recog/text"))
        hyp = {ln.split()[0] for ln in hyp_file.read_text().splitlines() if ln.strip()}
        assert len(ref) == 10 and hyp == ref


@pytest.mark.slow
def test_fast_run_logs_aux_losses_and_routing_stats(fast_run):
    exp, _ = fast_run
    log = (exp / "asr_train" / "train.log").read_text()
    for key in ("enc_moe_load_entropy=", "dec_moe_load_max=", "enc_moe_frac_e3="):
        assert key in log


@pytest.mark.slow
def test_fast_run_checkpoint_reloads_without_missing_or_unexpected_keys(fast_run):
    from espnet2.tasks.asr import ASRTask

    from espnet_ext.encoders.moe_conformer import MoEConformerEncoder
    from espnet_ext.models.asr_model import ESPnetExtASRModel

    asr_dir = fast_run[0] / "asr_train"
    model, _ = ASRTask.build_model_from_file(asr_dir / "config.yaml", None, "cpu")
    assert isinstance(model, ESPnetExtASRModel)
    assert isinstance(model.encoder, MoEConformerEncoder)
    state = torch.load(asr_dir / "latest.pth", map_location="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == [] and unexpected == []


def _first_utterance(exp: Path):
    key, path = (exp / "data" / "test_fast" / "wav.scp").read_text().split()[:2]
    return key, torch.tensor(sf.read(path, dtype="float32")[0])


def _best(speech2text, speech):
    # the score too: an untrained model may decode to nothing, its score is never 0
    text, tokens, token_ids, hyp = speech2text(speech)[0]
    return text, token_ids, float(hyp.score)


DECODE = dict(device="cpu", beam_size=2, ctc_weight=0.3, maxlenratio=0.3, nbest=1)


@pytest.mark.slow
def test_fast_run_packed_model_decodes_as_the_unpacked_one(fast_run, tmp_path):
    from espnet2.bin.asr_inference import Speech2Text
    from espnet2.main_funcs.pack_funcs import unpack

    exp = fast_run[0]
    asr_dir = exp / "asr_train"
    model_file = next(asr_dir.glob("decode_*")).name[len("decode_") :] + ".pth"
    _, speech = _first_utterance(exp)
    unpacked = Speech2Text(
        asr_train_config=asr_dir / "config.yaml",
        asr_model_file=asr_dir / model_file,
        **DECODE,
    )
    # A zip given as model_tag goes through espnet_model_zoo, which unpacks a local
    # file with ESPnet's own pack_funcs.unpack: do that directly where it is absent.
    try:
        import espnet_model_zoo  # noqa: F401

        packed = Speech2Text.from_pretrained(str(exp / "asr_model.zip"), **DECODE)
    except ImportError:
        files = unpack(exp / "asr_model.zip", tmp_path / "unpacked")
        packed = Speech2Text.from_pretrained(**files, **DECODE)
    assert _best(packed, speech) == _best(unpacked, speech)


def test_results_table_has_a_row_per_config_and_marks_missing_runs_pending(tmp_path):
    exp = tmp_path / "exp_cpu" / "train_asr_conformer"
    exp.mkdir(parents=True)
    (exp / "results.json").write_text(
        json.dumps(
            {
                "params": 4.63e6,
                "encoder_params": 3.61e6,
                "checkpoint_mb": 17.8,
                "rtf": 0.045,
                "train_seconds": 3000,
                "epochs": 8,
                "sets": {
                    "dev": {"wer": 40.0, "cer": 20.0},
                    "test": {"wer": 61.5, "cer": 33.3},
                },
            }
        )
    )
    readme = tmp_path / "README.md"
    readme.write_text("# r\n<!-- RESULTS:BEGIN -->\nold\n<!-- RESULTS:END -->\ntail\n")
    plot = tmp_path / "results.png"
    subprocess.run(
        [
            "python3",
            "local/results.py",
            "--collect",
            str(tmp_path / "exp_cpu"),
            "--results_dir",
            str(tmp_path / "results"),
            "--readme",
            str(readme),
            "--plot",
            str(plot),
        ],
        cwd=RECIPE,
        check=True,
        capture_output=True,
    )
    text = readme.read_text()
    tuning = sorted((RECIPE / "conf" / "tuning").glob("train_*.yaml"))
    configs = [p.stem for p in tuning if not p.stem.startswith("train_lm")]
    rows = [ln for ln in text.splitlines() if ln.startswith("| train_")]
    assert [r.split(" | ")[0][2:] for r in rows] == configs
    measured = next(r for r in rows if r.startswith("| train_asr_conformer |"))
    assert (
        "| 4.63 | 3.61 | 17.8 | 40.0 | 20.0 | 61.5 | 33.3 | 0.045 | 0h50m (8 ep) | - |"
        in measured
    )
    assert all("pending" in r for r in rows if r is not measured)
    assert "old" not in text and text.endswith("tail\n")
    assert plot.read_bytes()[:4] == b"\x89PNG"


def _fake_espnet(root: Path) -> Path:
    template = root / "egs2" / "TEMPLATE" / "asr1"
    for d in ("utils", "steps", "scripts", "pyscripts"):
        (template / d).mkdir(parents=True)
    (template / "asr.sh").write_text("#!/usr/bin/env bash\n")
    return root


@pytest.mark.parametrize("inside_checkout", [True, False])
def test_setup_sh_links_the_template_and_path_sh_finds_the_espnet_root(
    tmp_path, inside_checkout
):
    import shutil

    espnet = _fake_espnet(tmp_path / "espnet")
    recipe = (
        (espnet if inside_checkout else tmp_path / "elsewhere")
        / "egs2"
        / "speechocean762"
        / "asr1"
    )
    shutil.copytree(
        RECIPE,
        recipe,
        ignore=shutil.ignore_patterns(
            "data", "exp*", "dump", "asr.sh", "utils", "steps", "scripts", "pyscripts"
        ),
    )
    subprocess.run(
        ["./setup.sh"],
        cwd=recipe,
        env=dict(os.environ, ESPNET_ROOT=str(espnet)),
        check=True,
        capture_output=True,
    )
    for name in ("asr.sh", "utils", "steps", "scripts", "pyscripts"):
        link = recipe / name
        assert (
            link.is_symlink()
            and link.resolve() == (espnet / "egs2/TEMPLATE/asr1" / name).resolve()
        )
        assert Path(os.readlink(link)).is_absolute() is not inside_checkout
    out = subprocess.run(
        ["bash", "-c", ". ./path.sh && echo $MAIN_ROOT"],
        cwd=recipe,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert Path(out).resolve() == espnet.resolve()


def test_setup_sh_without_espnet_root_says_what_to_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ESPNET_ROOT"}
    proc = subprocess.run(
        ["bash", str(RECIPE / "setup.sh")], env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "ESPNET_ROOT" in proc.stderr


# A character LM small enough to train in seconds: the point is the plumbing
# (asr.sh stages 6-8, then shallow fusion in asr_inference), not its perplexity.
TINY_LM = """lm: seq_rnn
lm_conf: {unit: 16, nlayers: 1}
batch_type: folded
batch_size: 16
max_epoch: 1
num_workers: 0
best_model_criterion: [[valid, loss, min]]
keep_nbest_models: 1
optim: adam
"""


@pytest.fixture(scope="module")
def fast_lm_run(fast_run, speechocean):
    """The fast run's model decoded again with a freshly trained LM, on the first 2
    of its 10 dev utterances (``dev_lm``): LM decoding is the suite's slow part."""
    exp, _ = fast_run
    dev = exp / "data" / "dev_lm"
    dev.mkdir()
    for name in ("wav.scp", "text", "utt2spk"):
        lines = (exp / "data" / "dev_fast" / name).read_text().splitlines(True)
        (dev / name).write_text("".join(lines[:2]))
    conf = exp.parent / "lm.yaml"
    conf.write_text(TINY_LM)
    decode = exp.parent / "decode_lm.yaml"
    decode.write_text("beam_size: 2\nctc_weight: 0.3\nlm_weight: 0.5\n")
    cmd = [sys.executable, "-m", "espnet_ext.bin.asr_pipeline"]
    cmd += ["--train_dir", str(exp / "data" / "train_fast")]
    cmd += ["--valid_dir", str(dev)]
    cmd += ["--asr_config", "conf/tuning/train_asr_moe_conformer.yaml"]
    cmd += ["--exp_dir", str(exp), "--inference_config", str(decode)]
    cmd += ["--use_lm", "true", "--lm_config", str(conf), "--rtf_utts", "2"]
    cmd += ["--stages", "lm", "decode", "score", "report"]
    out = _run(cmd, speechocean)
    return exp, exp.parent / f"lm_{conf.stem}", out.stdout


@pytest.mark.slow
def test_the_lm_stage_trains_on_the_asr_token_list(fast_lm_run):
    exp, lm, _ = fast_lm_run
    import yaml

    config = yaml.safe_load((lm / "config.yaml").read_text())
    tokens = (exp / "token_list" / "char" / "tokens.txt").read_text().split()
    assert config["token_list"] == tokens
    assert (lm / "valid.loss.ave.pth").exists()


@pytest.mark.slow
def test_an_lm_decode_is_scored_and_reported_under_its_own_tag(fast_lm_run):
    exp, lm, out = fast_lm_run
    res = json.loads((exp / "results_lm.json").read_text())
    assert res["decode_tag"] == "lm" and res["lm"]["exp_dir"] == str(lm)
    assert res["lm"]["params"] > 0 and res["lm"]["epochs"] == 1
    scores = res["sets"]["dev_lm"]
    assert f"dev_lm: WER {scores['wer']:.1f}%  CER {scores['cer']:.1f}%" in out
    # the LM-free decode of the fast run is still there
    assert json.loads((exp / "results.json").read_text()).get("decode_tag") is None
    decode_log = next(exp.glob("asr_train/decode_*_lm/dev_lm/decode.log"))
    assert "SequentialRNNLM" in decode_log.read_text()


@pytest.mark.slow
def test_tune_decoding_scores_its_grid_on_dev(fast_lm_run, speechocean):
    """One grid (decodes of one utterance each) covers CTC and LM weights; LM
    weight 0 decodes without the LM, as a run without ``--lm_exp_dir`` does."""
    exp, lm, _ = fast_lm_run
    cmd = [sys.executable, "local/tune_decoding.py", "--exp_dir", str(exp)]
    cmd += ["--set", "dev_fast", "--max_utts", "1", "--ctc_weights", "0.3", "1.0"]
    cmd += ["--penalties", "0", "--lm_exp_dir", str(lm), "--lm_weights", "0", "0.5"]
    out = _run(cmd, speechocean)
    res = json.loads((exp / "tune_decoding.json").read_text())
    assert res["set"] == "dev_fast" and res["utts"] == 1
    grid = sorted((r["ctc_weight"], r["lm_weight"]) for r in res["rows"])
    assert grid == [(0.3, 0.0), (0.3, 0.5), (1.0, 0.0), (1.0, 0.5)]
    assert [r["cer"] for r in res["rows"]] == sorted(r["cer"] for r in res["rows"])
    assert "best on dev_fast" in out.stdout


def test_tune_decoding_refuses_the_test_set(tmp_path):
    proc = subprocess.run(
        [sys.executable, "local/tune_decoding.py", "--exp_dir", str(tmp_path)]
        + ["--set", "test"],
        cwd=RECIPE,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "test must not take part" in proc.stderr


def _run_sh_args(tmp_path: Path, *options: str) -> list:
    """The arguments run.sh hands asr.sh (a fake that records them)."""
    (tmp_path / "run.sh").write_bytes((RECIPE / "run.sh").read_bytes())
    record = tmp_path / "argv"
    (tmp_path / "asr.sh").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\n')
    (tmp_path / "asr.sh").chmod(0o755)
    subprocess.run(["bash", "run.sh", *options], cwd=tmp_path, check=True)
    return record.read_text().split("\n")


def _values(argv: list, name: str) -> list:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


def test_run_sh_trains_no_lm_by_default(tmp_path):
    argv = _run_sh_args(tmp_path)
    assert _values(argv, "--use_lm") == ["false"]
    assert _values(argv, "--local_data_opts") == [
        "--fast false --lm_text false --tts none --tts_utts 2400"
    ]


def test_run_sh_use_lm_writes_the_lm_text_trains_and_fuses_the_lm(tmp_path):
    argv = _run_sh_args(tmp_path, "--use_lm", "true")
    assert _values(argv, "--use_lm") == ["true"]
    assert _values(argv, "--local_data_opts") == [
        "--fast false --lm_text true --tts none --tts_utts 2400"
    ]
    assert _values(argv, "--lm_train_text") == ["data/lm_train/text"]
    assert _values(argv, "--lm_config") == ["conf/tuning/train_lm_rnn.yaml"]
    # asr.sh takes the last --inference_config: the LM decode's
    assert _values(argv, "--inference_config")[-1] == "conf/decode_asr_lm.yaml"


def test_run_sh_tts_trains_on_the_mixed_set_in_its_own_exp_dir(tmp_path):
    argv = _run_sh_args(tmp_path, "--tts", "lm", "--tts_utts", "100")
    assert _values(argv, "--local_data_opts") == [
        "--fast false --lm_text false --tts lm --tts_utts 100"
    ]
    assert _values(argv, "--train_set") == ["train_tts_lm"]
    assert _values(argv, "--expdir") == ["exp_ttslm"]
    # the LM (when asked for) keeps its own text, not the synthetic transcripts
    assert _values(argv, "--lm_train_text") == ["data/train/text"]


def test_tune_decoding_reads_the_text_of_an_intermediate_ctc_model_too():
    best_text = recipe_tool("tune_decoding").best_text
    nbest = [("A CAT", ["A"], [3], None), ("A HAT", ["A"], [3], None)]
    assert best_text(nbest) == "A CAT"
    # Speech2Text of an interctc model returns (n-best, {layer: CTC outputs})
    assert best_text((nbest, {2: []})) == "A CAT"
