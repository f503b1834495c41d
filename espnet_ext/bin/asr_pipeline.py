"""Run ESPnet's ASR stages without an ESPnet checkout: the same ``python -m
espnet2.bin.*`` calls, with the same arguments, that ``egs2/TEMPLATE/asr1/asr.sh``
makes for ``--feats_type raw --token_type char`` (or ``bpe``), one job per stage.

Stages (asr.sh numbering in brackets):
  data    [1-4]  copy Kaldi dirs (wav.scp, text, utt2spk), audio paths made absolute
  tokens  [5]    token list (``espnet2.bin.tokenize_text``); for ``bpe`` first a
                 sentencepiece model of the training text, as asr.sh's ``spm_train``
  lm      [6-8]  only with ``--use_lm true``: a token language model of
                 ``--lm_train_text`` (``lm_train --collect_stats true``, then
                 ``lm_train``) into ``--lm_exp_dir``, sharing the ASR token list
  stats   [10]   ``asr_train --collect_stats true`` + ``aggregate_stats_dirs``
  train   [11]   ``asr_train``
  decode  [12]   ``asr_inference`` on every test set (with ``--use_lm true``, shallow
                 fusion with the language model, ``lm_weight`` from the decode YAML)
  score   [13]   WER and CER as asr.sh: ESPnet's word/char tokens (a space is a
                 ``<space>`` token), sclite if installed, else the same alignment
                 in Python (:mod:`espnet_ext.bin.scoring`)
  report  [-]    parameters, checkpoint size, decoding RTF -> ``results.json``
  pack    [14]   ``espnet2.bin.pack asr``

Each stage runs in a fresh interpreter, as under asr.sh, so espnet_ext's classes are
found through its start-up hook, never through an import here.

Example::

    python -m espnet_ext.bin.asr_pipeline --train_dir data/train --valid_dir data/dev \
        --test_dirs data/dev --asr_config conf/tuning/train_asr_moe_conformer.yaml \
        --inference_config conf/decode_asr.yaml --exp_dir exp/moe
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

STAGES = (
    "data",
    "tokens",
    "lm",
    "stats",
    "train",
    "decode",
    "score",
    "report",
    "pack",
)


def _log(msg: str) -> None:
    print(f"[asr_pipeline {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# asr.sh's ``utils/spm_train``: sentencepiece's trainer with the command line's
# ``--key=value`` flags, run as its own job so that its log goes to a file.
_SPM_TRAIN = (
    "import sys, sentencepiece as spm; "
    "spm.SentencePieceTrainer.train(' '.join(sys.argv[1:]))"
)


def _run(cmd: List[str], log_file: Path, name: Optional[str] = None) -> None:
    """Run one ESPnet entry point; its output goes to ``log_file`` (as asr.sh does).

    ``name`` names the job in messages (default: the module after ``-m``).
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    _log(f"$ {name or ' '.join(cmd[:4])} ... (log: {log_file})")
    name = name or cmd[2]
    start = time.time()
    with open(log_file, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(
            f"{name} failed with exit code {proc.returncode}; last lines of "
            f"{log_file}:\n" + "\n".join(tail)
        )
    _log(f"  done in {time.time() - start:.1f} s")


def read_kaldi(path: Path) -> Dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            key, _, value = line.partition(" ")
            out[key] = value.strip()
    return out


def write_kaldi(path: Path, table: Dict[str, str]) -> None:
    path.write_text(
        "".join(f"{k} {table[k]}\n" for k in sorted(table)), encoding="utf-8"
    )


def prepare_data_dir(src: Path, dst: Path, max_utts: Optional[int] = None) -> int:
    """Copy a Kaldi dir, making audio paths absolute; optionally keep the first N.

    Relative ``wav.scp`` paths are resolved against ``src`` and then its parents
    (speechocean762 lists paths relative to the corpus root). Returns #utterances.
    """
    wav = read_kaldi(src / "wav.scp")
    text = read_kaldi(src / "text")
    missing = sorted(set(wav) ^ set(text))
    if missing:
        raise ValueError(f"{src}: wav.scp and text disagree on ids, e.g. {missing[:3]}")
    keys = sorted(wav)[:max_utts] if max_utts else sorted(wav)
    dst.mkdir(parents=True, exist_ok=True)
    abs_wav = {}
    for k in keys:
        p = Path(wav[k])
        if not p.is_absolute():
            for base in (src, *src.resolve().parents):
                if (base / p).exists():
                    p = (base / p).resolve()
                    break
            else:
                raise FileNotFoundError(
                    f"{src}/wav.scp: audio for {k} not found: {wav[k]}"
                )
        abs_wav[k] = str(p)
    write_kaldi(dst / "wav.scp", abs_wav)
    write_kaldi(dst / "text", {k: text[k] for k in keys})
    utt2spk_path = src / "utt2spk"
    utt2spk = (
        read_kaldi(utt2spk_path) if utt2spk_path.exists() else {k: k for k in keys}
    )
    write_kaldi(dst / "utt2spk", {k: utt2spk[k] for k in keys})
    return len(keys)


def _data_args(prefix: str, data_dir: Path) -> List[str]:
    return [
        f"--{prefix}_data_path_and_name_and_type",
        f"{data_dir}/wav.scp,speech,sound",
        f"--{prefix}_data_path_and_name_and_type",
        f"{data_dir}/text,text,text",
    ]


def _write_text_shapes(stats_dir: Path, token_list: Path, token_type: str) -> None:
    """asr.sh's ``text_shape.<token_type>``: each text shape with the vocabulary size
    appended ("len" -> "len,V"), for the train and valid statistics."""
    vocab = len(token_list.read_text(encoding="utf-8").splitlines())
    for split in ("train", "valid"):
        shapes = (stats_dir / split / "text_shape").read_text().splitlines()
        (stats_dir / split / f"text_shape.{token_type}").write_text(
            "".join(f"{line},{vocab}\n" for line in shapes if line.strip())
        )


def _train_lm(
    args: argparse.Namespace,
    common: List[str],
    token_list: Path,
    train_set: Path,
    valid_set: Path,
    lm_exp: Path,
) -> None:
    """asr.sh stages 6-8: LM statistics, then ``lm_train`` on the ASR token list."""
    lm_text = args.lm_train_text or train_set / "text"
    if not lm_text.is_file():
        raise FileNotFoundError(f"--lm_train_text: no such file: {lm_text}")
    if not token_list.is_file():
        raise FileNotFoundError(f"{token_list}: run the tokens stage before lm")
    data = lm_exp / "data"
    data.mkdir(parents=True, exist_ok=True)
    # asr.sh's dump/raw/lm_train.txt: its lines as they are, without empty ones.
    lines = [ln for ln in lm_text.read_text(encoding="utf-8").splitlines() if " " in ln]
    (data / "lm_train.txt").write_text("".join(ln + "\n" for ln in lines), "utf-8")
    shutil.copyfile(valid_set / "text", data / "lm_valid.txt")
    text_args = [
        "--train_data_path_and_name_and_type",
        f"{data}/lm_train.txt,text,text",
        "--valid_data_path_and_name_and_type",
        f"{data}/lm_valid.txt,text,text",
    ]
    stats_dir = lm_exp / "lm_stats"
    _run(
        [args.python, "-m", "espnet2.bin.lm_train", "--collect_stats", "true"]
        + common
        + text_args
        + [
            "--train_shape_file",
            f"{data}/lm_train.txt",
            "--valid_shape_file",
            f"{data}/lm_valid.txt",
            "--output_dir",
            str(stats_dir),
            "--config",
            str(args.lm_config),
        ],
        lm_exp / "logs" / "lm_stats.log",
    )
    _write_text_shapes(stats_dir, token_list, args.token_type)
    _run(
        [args.python, "-m", "espnet2.bin.lm_train"]
        + common
        + text_args
        + [
            "--train_shape_file",
            f"{stats_dir}/train/text_shape.{args.token_type}",
            "--valid_shape_file",
            f"{stats_dir}/valid/text_shape.{args.token_type}",
            "--fold_length",
            "150",
            "--resume",
            "true",
            "--output_dir",
            str(lm_exp),
            "--config",
            str(args.lm_config),
            "--ngpu",
            str(args.ngpu),
            *args.lm_train_args.split(),
        ],
        lm_exp / "train.log",
    )


def _lm_decode_args(lm_exp: Path, inference_lm: str, token_list: Path) -> List[str]:
    """asr_inference's LM options; the LM must share the ASR model's token list."""
    import yaml

    lm_config, lm_file = lm_exp / "config.yaml", lm_exp / inference_lm
    for f in (lm_config, lm_file):
        if not f.exists():
            raise FileNotFoundError(f"--use_lm true: {f} is missing (stage lm)")
    lm_tokens = yaml.safe_load(lm_config.read_text(encoding="utf-8"))["token_list"]
    if isinstance(lm_tokens, str):
        lm_tokens = Path(lm_tokens).read_text(encoding="utf-8").splitlines()
    asr_tokens = token_list.read_text(encoding="utf-8").splitlines()
    if lm_tokens != asr_tokens:
        raise ValueError(
            f"the LM in {lm_exp} was trained on another token list than {token_list}"
        )
    return ["--lm_train_config", str(lm_config), "--lm_file", str(lm_file)]


def _lm_summary(
    lm_exp: Path, inference_lm: str, lm_train_text: Optional[Path]
) -> Dict[str, object]:
    """What results.json says of the LM: where, its size, its training time."""
    import torch

    lm_file = lm_exp / inference_lm
    state = torch.load(lm_file, map_location="cpu")
    summary: Dict[str, object] = {
        "exp_dir": str(lm_exp),
        "file": inference_lm,
        "params": sum(v.numel() for v in state.values()),
        "train_text": str(lm_train_text) if lm_train_text else None,
    }
    ckpt = lm_exp / "checkpoint.pth"
    if ckpt.exists():
        from espnet_ext.bin.measure_asr import training_time

        summary.update(training_time(ckpt))
    return summary


def _teacher_summary(train_config: Path) -> Optional[Dict[str, object]]:
    """What results.json says of a distillation teacher (``model_conf.distill``):
    its files, size and, from the ``checkpoint.pth`` beside its model, its training
    time, which a row trained with a teacher must not leave out. ``None`` without
    distillation."""
    import torch
    import yaml

    conf = yaml.safe_load(train_config.read_text(encoding="utf-8"))
    distill = (conf.get("model_conf") or {}).get("distill")
    if not distill:
        return None
    model = Path(distill["teacher_model"])
    state = torch.load(model, map_location="cpu")
    summary: Dict[str, object] = {
        "config": distill["teacher_config"],
        "model": str(model),
        "params": sum(v.numel() for v in state.values()),  # as _lm_summary counts
    }
    ckpt = model.parent / "checkpoint.pth"
    if ckpt.exists():
        from espnet_ext.bin.measure_asr import training_time

        summary.update(training_time(ckpt))
        summary.pop("curve", None)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, object]]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--train_dir", type=Path, required=True)
    p.add_argument("--valid_dir", type=Path, required=True)
    p.add_argument("--test_dirs", type=Path, nargs="+", default=[])
    p.add_argument("--asr_config", type=Path, required=True)
    p.add_argument("--inference_config", type=Path, default=None)
    p.add_argument("--exp_dir", type=Path, required=True)
    p.add_argument("--token_type", choices=("char", "bpe"), default="char")
    p.add_argument(
        "--nbpe", type=int, default=30, help="asr.sh's --nbpe: sentencepiece vocabulary"
    )
    p.add_argument(
        "--bpemode",
        choices=("unigram", "bpe"),
        default="unigram",
        help="asr.sh's --bpemode: sentencepiece model type",
    )
    p.add_argument("--bpe_char_cover", type=float, default=1.0)
    p.add_argument("--bpe_input_sentence_size", type=int, default=100000000)
    p.add_argument(
        "--max_train_utts", type=int, default=None, help="keep the first N (smoke runs)"
    )
    p.add_argument("--max_eval_utts", type=int, default=None)
    p.add_argument("--ngpu", type=int, default=0)
    p.add_argument("--fs", default="16k")
    p.add_argument(
        "--feats_normalize",
        choices=("global_mvn", "utterance_mvn"),
        default="global_mvn",
        help="asr.sh's --feats_normalize: training-set statistics or per utterance",
    )
    p.add_argument(
        "--inference_model",
        default="valid.acc.ave.pth",
        help="checkpoint in the training dir used for decoding and packing",
    )
    p.add_argument(
        "--decode_tag",
        default="",
        help="decode the trained model again into decode_<model>_<tag>/ and "
        "results_<tag>.json (e.g. the streaming decode of a U2++ model), leaving "
        "the untagged decode alone",
    )
    p.add_argument(
        "--use_lm",
        choices=("true", "false"),
        default="false",
        help="asr.sh's --use_lm: train a token LM (stage lm) and decode with it",
    )
    p.add_argument(
        "--lm_config", type=Path, default=None, help="asr.sh's --lm_config (lm_train)"
    )
    p.add_argument(
        "--lm_train_text",
        type=Path,
        default=None,
        help="asr.sh's --lm_train_text: Kaldi '<id> <sentence>' text (default: the "
        "training transcripts)",
    )
    p.add_argument(
        "--lm_exp_dir",
        type=Path,
        default=None,
        help="where the LM trains (default: lm_<lm_config name> next to --exp_dir, "
        "shared by every ASR config with the same token list, as asr.sh's exp/lm_*)",
    )
    p.add_argument(
        "--lm_train_args",
        default="",
        help="extra lm_train arguments, e.g. '--max_epoch 1'",
    )
    p.add_argument(
        "--inference_lm",
        default="valid.loss.ave.pth",
        help="asr.sh's --inference_lm: LM checkpoint in --lm_exp_dir for decoding",
    )
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument(
        "--train_args",
        default="",
        help="extra asr_train arguments, e.g. '--max_epoch 1'",
    )
    p.add_argument("--python", default=sys.executable)
    p.add_argument(
        "--rtf_utts", type=int, default=50, help="utterances timed by the report stage"
    )
    p.add_argument(
        "--rtf_threads",
        type=int,
        default=1,
        help="torch threads while timing decoding (asr.sh decodes with 1 per job)",
    )
    args = p.parse_args(argv)
    if args.token_type == "bpe" and args.nbpe < 1:
        p.error(f"--nbpe must be >= 1, got {args.nbpe}")
    use_lm = args.use_lm == "true"
    if use_lm and args.lm_config is None:
        p.error("--use_lm true needs --lm_config")
    if use_lm and not args.decode_tag:
        # asr.sh names an LM decode after its LM too; the LM-free decode stays put.
        args.decode_tag = "lm"

    exp = args.exp_dir
    data = exp / "data"
    # Sets keep their directory names (train, dev, test...), as under asr.sh's
    # dump/raw/.
    names = [
        args.train_dir.name,
        args.valid_dir.name,
        *(d.name for d in args.test_dirs),
    ]
    if len(set(names)) != len(names):
        p.error(f"data dirs must have distinct names, got {names}")
    train_set, valid_set = data / args.train_dir.name, data / args.valid_dir.name
    tests = {d.name: d for d in args.test_dirs}
    # asr.sh's layout: data/token_list/char/ or data/token_list/bpe_unigram30/
    if args.token_type == "bpe":
        token_dir = exp / "token_list" / f"bpe_{args.bpemode}{args.nbpe}"
        bpemodel = token_dir / "bpe.model"
        stats_dir = exp / f"asr_stats_raw_bpe{args.nbpe}"
    else:
        token_dir = exp / "token_list" / args.token_type
        bpemodel = None
        stats_dir = exp / f"asr_stats_raw_{args.token_type}"
    token_list = token_dir / "tokens.txt"
    lm_exp = None
    if use_lm:
        lm_exp = args.lm_exp_dir or exp.parent / f"lm_{args.lm_config.stem}"
    asr_dir = exp / "asr_train"
    py = [args.python, "-m"]
    common = [
        "--use_preprocessor",
        "true",
        "--bpemodel",
        str(bpemodel) if bpemodel else "none",
        "--token_type",
        args.token_type,
        "--token_list",
        str(token_list),
        "--non_linguistic_symbols",
        "none",
        "--cleaner",
        "none",
        "--g2p",
        "none",
    ]
    results: Dict[str, Dict[str, object]] = {}

    if "data" in args.stages:
        n = prepare_data_dir(args.train_dir, train_set, args.max_train_utts)
        m = prepare_data_dir(args.valid_dir, valid_set, args.max_eval_utts)
        for name, d in tests.items():
            prepare_data_dir(d, data / name, args.max_eval_utts)
        _log(f"data: {n} train, {m} valid utterances, tests: {sorted(tests)}")

    if "tokens" in args.stages:
        texts = token_dir / "train.txt"
        texts.parent.mkdir(parents=True, exist_ok=True)
        texts.write_text(
            "".join(v + "\n" for v in read_kaldi(train_set / "text").values())
        )
        bpe_args = []
        if bpemodel is not None:
            _run(
                [
                    args.python,
                    "-c",
                    _SPM_TRAIN,
                    f"--input={texts}",
                    f"--vocab_size={args.nbpe}",
                    f"--model_type={args.bpemode}",
                    f"--model_prefix={bpemodel.with_suffix('')}",
                    f"--character_coverage={args.bpe_char_cover}",
                    f"--input_sentence_size={args.bpe_input_sentence_size}",
                ],
                exp / "logs" / "spm_train.log",
                name="sentencepiece (spm_train)",
            )
            bpe_args = ["--bpemodel", str(bpemodel)]
        _run(
            py
            + [
                "espnet2.bin.tokenize_text",
                "--token_type",
                args.token_type,
                *bpe_args,
                "--input",
                str(texts),
                "--output",
                str(token_list),
                "--field",
                "1-",
                "--cleaner",
                "none",
                "--g2p",
                "none",
                "--write_vocabulary",
                "true",
                "--add_symbol",
                "<blank>:0",
                "--add_symbol",
                "<unk>:1",
                "--add_symbol",
                "<sos/eos>:-1",
            ],
            exp / "logs" / "tokens.log",
        )

    if "lm" in args.stages and use_lm:
        _train_lm(args, common, token_list, train_set, valid_set, lm_exp)

    if "stats" in args.stages:
        logdir = stats_dir / "logdir"
        _run(
            py
            + [
                "espnet2.bin.asr_train",
                "--collect_stats",
                "true",
                *common,
                *_data_args("train", train_set),
                *_data_args("valid", valid_set),
                "--train_shape_file",
                f"{train_set}/wav.scp",
                "--valid_shape_file",
                f"{valid_set}/wav.scp",
                "--output_dir",
                f"{logdir}/stats.1",
                "--config",
                str(args.asr_config),
                "--frontend_conf",
                f"fs={args.fs}",
            ],
            logdir / "stats.1.log",
        )
        _run(
            py
            + [
                "espnet2.bin.aggregate_stats_dirs",
                "--input_dir",
                f"{logdir}/stats.1",
                "--output_dir",
                str(stats_dir),
            ],
            logdir / "aggregate.log",
        )
        _write_text_shapes(stats_dir, token_list, args.token_type)

    if args.feats_normalize == "global_mvn":
        stats = f"stats_file={stats_dir}/train/feats_stats.npz"
        normalize = ["--normalize", "global_mvn", "--normalize_conf", stats]
    else:
        normalize = ["--normalize", args.feats_normalize]

    if "train" in args.stages:
        _run(
            py
            + [
                "espnet2.bin.asr_train",
                *common,
                *_data_args("train", train_set),
                *_data_args("valid", valid_set),
                "--train_shape_file",
                f"{stats_dir}/train/speech_shape",
                "--train_shape_file",
                f"{stats_dir}/train/text_shape.{args.token_type}",
                "--valid_shape_file",
                f"{stats_dir}/valid/speech_shape",
                "--valid_shape_file",
                f"{stats_dir}/valid/text_shape.{args.token_type}",
                "--resume",
                "true",
                "--fold_length",
                "80000",
                "--fold_length",
                "150",
                "--output_dir",
                str(asr_dir),
                "--config",
                str(args.asr_config),
                "--frontend_conf",
                f"fs={args.fs}",
                *normalize,
                "--ngpu",
                str(args.ngpu),
                *args.train_args.split(),
            ],
            asr_dir / "train.log",
        )

    model_file = asr_dir / args.inference_model
    if (
        not model_file.exists()
        and (asr_dir / "latest.pth").exists()
        and args.inference_model == "valid.acc.ave.pth"
    ):
        model_file = asr_dir / "latest.pth"  # a 1-epoch run may have no averaged model
    lm_args: List[str] = []
    if use_lm and {"decode", "report"} & set(args.stages):
        # Checked here, not at start-up: `--stages train` must not need a trained LM.
        lm_args = _lm_decode_args(lm_exp, args.inference_lm, token_list)
    tag = f"_{args.decode_tag}" if args.decode_tag else ""
    decode_root = asr_dir / f"decode_{model_file.stem}{tag}"
    results_file = exp / f"results{tag}.json"

    if "decode" in args.stages:
        for name in [valid_set.name, *tests]:
            out = decode_root / name
            extra = (
                ["--config", str(args.inference_config)]
                if args.inference_config
                else []
            )
            _run(
                py
                + [
                    "espnet2.bin.asr_inference",
                    "--batch_size",
                    "1",
                    "--ngpu",
                    str(args.ngpu),
                    "--data_path_and_name_and_type",
                    f"{data / name}/wav.scp,speech,sound",
                    "--key_file",
                    f"{data / name}/wav.scp",
                    "--asr_train_config",
                    f"{asr_dir}/config.yaml",
                    "--asr_model_file",
                    str(model_file),
                    "--output_dir",
                    str(out),
                    *lm_args,
                    *extra,
                ],
                out / "decode.log",
            )

    if "score" in args.stages:
        from espnet_ext.bin.scoring import score_set

        for name in [valid_set.name, *tests]:
            res = score_set(
                data / name / "text",
                decode_root / name / "1best_recog" / "text",
                data / name / "utt2spk",
                decode_root / name,
            )
            results[name] = res
            n_utts = len(read_kaldi(data / name / "text"))
            _log(
                f"{name}: WER {res['wer']:.1f}%  CER {res['cer']:.1f}%  "
                f"({n_utts} utts, {res['scorer']})"
            )
        (decode_root / "scores.json").write_text(json.dumps(results, indent=2))

    if "report" in args.stages:
        # Decoding speed is measured in one process with a fixed thread count, on the
        # first test set (or the valid set), after a warm-up utterance: asr_inference's
        # wall time would mostly measure Python start-up on sets this small.
        rtf_set = data / (next(iter(tests)) if tests else valid_set.name)
        report_json = decode_root / "report.json"
        extra = (
            ["--inference_config", str(args.inference_config)]
            if args.inference_config
            else []
        )
        ckpt = asr_dir / "checkpoint.pth"  # ESPnet's resume file: per-epoch timings
        ckpt = ["--train_checkpoint", str(ckpt)] if ckpt.exists() else []
        _run(
            py
            + [
                "espnet_ext.bin.measure_asr",
                "--asr_train_config",
                f"{asr_dir}/config.yaml",
                "--asr_model_file",
                str(model_file),
                "--data_dir",
                str(rtf_set),
                "--max_utts",
                str(args.rtf_utts),
                "--nthreads",
                str(args.rtf_threads),
                "--output",
                str(report_json),
                *lm_args,
                *extra,
                *ckpt,
            ],
            exp / "logs" / "report.log",
        )
        report = json.loads(report_json.read_text())
        scores_file = decode_root / "scores.json"
        report["sets"] = (
            json.loads(scores_file.read_text()) if scores_file.exists() else {}
        )
        report["asr_config"] = str(args.asr_config)
        if args.inference_config:
            report["inference_config"] = str(args.inference_config)
        if args.decode_tag:
            report["decode_tag"] = args.decode_tag
        if lm_exp is not None:
            report["lm"] = _lm_summary(lm_exp, args.inference_lm, args.lm_train_text)
        teacher = _teacher_summary(asr_dir / "config.yaml")
        if teacher is not None:
            report["teacher"] = teacher
        if bpemodel is not None:
            report["token_type"] = f"bpe_{args.bpemode}"
            report["nbpe"] = args.nbpe
        if args.train_args.strip():
            report["train_args"] = args.train_args.strip()
        if exp.name != Path(args.asr_config).stem:
            report["expdir"] = str(exp)
        # The training set's name tells RESULTS what the model saw (e.g. train_tts_lm:
        # the recipe's real speech plus synthetic speech).
        report["train_dir"] = str(train_set)
        if report.get("train_phase_seconds"):
            # Training throughput: utterances seen per second of update loop.
            n_train = len(read_kaldi(train_set / "text"))
            report["train_utts"] = n_train
            report["train_utts_per_second"] = (
                n_train * report["epochs"] / report["train_phase_seconds"]
            )
        results_file.write_text(json.dumps(report, indent=2))
        params, enc_params = report["params"] / 1e6, report["encoder_params"] / 1e6
        _log(
            f"report: {params:.2f}M params ({enc_params:.2f}M encoder), "
            f"{report['checkpoint_mb']:.1f} MB, decoding RTF {report['rtf']:.3f} -> "
            f"{results_file}"
        )

    if "pack" in args.stages:
        _run(
            py
            + [
                "espnet2.bin.pack",
                "asr",
                "--asr_train_config",
                f"{asr_dir}/config.yaml",
                "--asr_model_file",
                str(model_file),
                "--option",
                f"{stats_dir}/train/feats_stats.npz",
                # asr.sh packs the sentencepiece model too: decoding needs it
                *(["--option", str(bpemodel)] if bpemodel else []),
                "--outpath",
                str(exp / "asr_model.zip"),
            ],
            exp / "logs" / "pack.log",
        )
    return results


if __name__ == "__main__":
    main()
