"""RESULTS of egs2/speechocean762/asr1 come from the results files, never from hands.

``local/results.py`` builds README.md's table and ``results.png`` from
``results/*.json`` (copies of what the pipeline's report stage and the pocketsphinx
baseline wrote). These tests rebuild both and compare.
"""

import json

import pytest
from conftest import RECIPE, recipe_tool


@pytest.fixture(scope="module")
def results_mod():
    return recipe_tool("results")


@pytest.fixture(scope="module")
def results(results_mod):
    return results_mod.load(
        RECIPE / "results", results_mod.row_configs(RECIPE / "conf" / "tuning")
    )


def test_readme_table_is_the_one_built_from_the_results_files(results_mod, results):
    readme = (RECIPE / "README.md").read_text(encoding="utf-8")
    section = readme.split(results_mod.BEGIN, 1)[1].split(results_mod.END, 1)[0]
    assert section.strip() == results_mod.table(results).strip()


def test_every_curve_file_has_a_note_and_validation_points(results_mod):
    curves = results_mod.load_curves(RECIPE / "results")
    for name, r in curves.items():
        assert r["note"] and r["curve"], name
        assert all("seconds" in p and "valid_cer_ctc" in p for p in r["curve"]), name


def test_every_results_file_has_test_scores_and_a_source(results):
    measured = {k: v for k, v in results.items() if v is not None}
    assert measured, "no results file in results/"
    for name, r in measured.items():
        assert {"wer", "cer"} <= set(r["sets"]["test"]), name
        # A trained row carries what its own report stage measured.
        if not r.get("reference"):
            assert r["curve"] and r["train_seconds"] > 0 and r["params"] > 0, name


def test_plot_is_drawn_from_the_results_files(results_mod, results, tmp_path):
    out = tmp_path / "results.png"
    curves = results_mod.load_curves(RECIPE / "results")
    assert results_mod.plot(results, out, curves)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collect_copies_runs_but_never_smoke_runs(results_mod, tmp_path):
    for name in ("train_asr_x", "train_asr_x_fast"):
        (tmp_path / "exp" / name).mkdir(parents=True)
        (tmp_path / "exp" / name / "results.json").write_text(json.dumps({"n": 1}))
    assert results_mod.collect(tmp_path / "exp", tmp_path / "res") == ["train_asr_x"]


def test_a_tagged_decode_is_its_own_row_after_its_model(results_mod, tmp_path):
    exp = tmp_path / "exp" / "train_asr_x"
    exp.mkdir(parents=True)
    (exp / "results.json").write_text(json.dumps({"asr_config": "c/x.yaml"}))
    tagged = {
        "asr_config": "c/x.yaml",
        "inference_config": "conf/decode_chunk16.yaml",
        "decode_tag": "chunk16",
    }
    (exp / "results_chunk16.json").write_text(json.dumps(tagged))
    copied = results_mod.collect(tmp_path / "exp", tmp_path / "res")
    assert copied == ["train_asr_x", "train_asr_x_chunk16"]
    loaded = results_mod.load(
        tmp_path / "res", [tmp_path / "train_asr_w.yaml", tmp_path / "train_asr_x.yaml"]
    )
    assert list(loaded) == ["train_asr_w", "train_asr_x", "train_asr_x_chunk16"]
    assert results_mod._command("train_asr_x_chunk16", tagged) == (
        "`./run_cpu.sh --asr_config c/x.yaml --inference_config "
        "conf/decode_chunk16.yaml --decode_tag chunk16 --stages 'decode score report'`"
    )


def test_an_lm_decode_row_names_its_lm_and_the_command_that_fuses_it(results_mod):
    lm_decode = {
        "asr_config": "c/x.yaml",
        "inference_config": "conf/decode_asr_lm.yaml",
        "decode_tag": "lm",
        "lm": {"params": 3_300_000, "train_seconds": 2520.0},
        "sets": {"test": {"wer": 60.0, "cer": 35.0}},
    }
    (row,) = results_mod.table({"train_asr_x_lm": lm_decode}).splitlines()[2:]
    assert row.startswith("| train_asr_x_lm (+ LM: 3.30M, trained 0h42m) |")
    assert row.endswith(
        "| `./run_cpu.sh --asr_config c/x.yaml --inference_config "
        "conf/decode_asr_lm.yaml --use_lm true --stages 'lm decode score report'` |"
    )


def test_a_run_of_a_config_in_another_exp_dir_follows_it(results_mod, tmp_path):
    longer = {
        "asr_config": "conf/tuning/train_asr_x.yaml",
        "expdir": "exp_cpu/train_asr_x_long",
        "train_args": "--max_epoch 40",
    }
    (tmp_path / "train_asr_x_long.json").write_text(json.dumps(longer))
    (tmp_path / "train_asr_y_long.json").write_text(json.dumps(longer))  # not y's
    loaded = results_mod.load(
        tmp_path, [tmp_path / "train_asr_x.yaml", tmp_path / "train_asr_y.yaml"]
    )
    assert list(loaded) == ["train_asr_x", "train_asr_x_long", "train_asr_y"]
    assert results_mod._command("train_asr_x_long", longer) == (
        "`./run_cpu.sh --asr_config conf/tuning/train_asr_x.yaml --expdir "
        "exp_cpu/train_asr_x_long --train_args '--max_epoch 40'`"
    )


def test_readme_saml_table_is_the_one_built_from_its_rows_file(results_mod):
    rows = RECIPE / "results" / "saml" / "rows.json"
    readme = (RECIPE / "README.md").read_text()
    block = readme.split(results_mod.SAML_BEGIN, 1)[1].split(results_mod.SAML_END)[0]
    if not rows.exists():
        assert "Not run yet" in block
        return
    assert block.strip() == results_mod.saml_table(rows).strip()


def test_saml_rows_are_gathered_from_the_adaptation_summaries(tmp_path):
    mod = recipe_tool("saml_rows")
    spk = dict(adapt_utts=10, seconds=3.0, adapter_bytes=2000, train_losses=[1.0])
    for row, losses in (("row1_fp32_base", []), ("row3_nf4_lora", [1.0])):
        (tmp_path / row).mkdir()
        summary = {
            "s1": {**spk, "train_losses": losses},
            "s2": {**spk, "train_losses": losses, "seconds": 5.0},
            "_decoding": {"wer": 50.0, "cer": 30.0, "utterances": 20},
        }
        (tmp_path / row / "summary.json").write_text(json.dumps(summary))
    rows = mod.gather(tmp_path, "exp_cpu/base")["rows"]
    assert [r["row"] for r in rows] == ["row1_fp32_base", "row3_nf4_lora"]
    assert rows[0]["adapt_seconds_mean"] == 0.0 and rows[1]["adapt_seconds_mean"] == 4.0
    assert rows[1]["wer"] == 50.0 and rows[1]["speakers"] == 2


def test_a_bpe_run_is_a_row_of_its_config_with_its_token_options(results_mod, tmp_path):
    bpe = {
        "asr_config": "conf/tuning/train_asr_x.yaml",
        "expdir": "exp_cpu/train_asr_x_bpe150",
        "token_type": "bpe_unigram",
        "nbpe": 150,
    }
    (tmp_path / "train_asr_x_bpe150.json").write_text(json.dumps(bpe))
    loaded = results_mod.load(tmp_path, [tmp_path / "train_asr_x.yaml"])
    assert list(loaded) == ["train_asr_x", "train_asr_x_bpe150"]
    assert results_mod._command("train_asr_x_bpe150", bpe) == (
        "`./run_cpu.sh --asr_config conf/tuning/train_asr_x.yaml "
        "--token_type bpe --nbpe 150`"
    )


def test_a_distilled_row_names_its_teacher_s_size_and_training_time(results_mod):
    distilled = {
        "asr_config": "c/x_kd.yaml",
        "teacher": {"params": 3_660_000, "train_seconds": 7080.0},
        "sets": {"test": {"wer": 60.0, "cer": 35.0}},
    }
    (row,) = results_mod.table({"train_asr_x_kd": distilled}).splitlines()[2:]
    assert row.startswith("| train_asr_x_kd (+ teacher: 3.66M, trained 1h58m) |")


def test_a_run_with_synthetic_speech_is_a_row_of_its_config_with_its_tts_option(
    results_mod, tmp_path
):
    tts = {
        "asr_config": "conf/tuning/train_asr_x.yaml",
        "expdir": "exp_cpu/train_asr_x_ttslm",
        "train_dir": "data/train_tts_lm",
        "train_utts": 4800,
        "sets": {"test": {"wer": 60.0, "cer": 35.0}},
    }
    (tmp_path / "train_asr_x_ttslm.json").write_text(json.dumps(tts))
    loaded = results_mod.load(tmp_path, [tmp_path / "train_asr_x.yaml"])
    assert list(loaded) == ["train_asr_x", "train_asr_x_ttslm"]
    (row,) = results_mod.table({"train_asr_x_ttslm": tts}).splitlines()[2:]
    assert row.startswith(
        "| train_asr_x_ttslm (+ synthetic speech: 4800 utts in all) |"
    )
    assert row.endswith(
        "| `./run_cpu.sh --asr_config conf/tuning/train_asr_x.yaml --tts lm` |"
    )
