"""Run ESPnet's own ``asr_train`` in-process on a few real utterances (tests only).

The distributed and resume tests train every case of ``tests/model_zoo.py`` through
``ASRTask.main``, as ``asr.sh`` does; one interpreter runs many such trainings, so
ESPnet is imported once.
"""

from pathlib import Path

import yaml


def write_data(root: Path, tokens, corpus: Path, n: int) -> Path:
    """Kaldi-style lists of the first ``n`` training utterances of ``corpus`` (those of
    ``conftest.real_speech_batch``): wav.scp, text, a key-only shape file (for
    ``batch_type: unsorted``) and the token list."""
    root.mkdir(parents=True, exist_ok=True)
    text = dict(
        ln.split(" ", 1) for ln in (corpus / "train/text").read_text().splitlines()
    )
    wavs = [ln.split() for ln in (corpus / "train/wav.scp").read_text().splitlines()]
    wavs = wavs[:n]
    (root / "wav.scp").write_text("".join(f"{k} {corpus / p}\n" for k, p in wavs))
    (root / "text").write_text("".join(f"{k} {text[k]}\n" for k, _ in wavs))
    (root / "shape").write_text("".join(f"{k} 1\n" for k, _ in wavs))
    (root / "tokens.txt").write_text("".join(f"{t}\n" for t in tokens))
    return root


def asr_train(conf: dict, data: Path, out: Path, *args: str, batch_size: int = 4):
    """``asr_train`` with ``conf`` (a config dict) on ``data`` (:func:`write_data`)
    for training and validation, writing into ``out``; ``args`` are appended to the
    command line (they override the config)."""
    from espnet2.tasks.asr import ASRTask

    out.mkdir(parents=True, exist_ok=True)
    conf = {k: v for k, v in conf.items() if k != "token_list"}
    # No attention plots and no TensorBoard: only the checkpoints are looked at.
    conf.update(batch_type="unsorted", batch_size=batch_size, num_att_plot=0)
    conf.update(use_tensorboard=False)
    conf.setdefault("max_epoch", 1)
    (out / "train.yaml").write_text(yaml.safe_dump(conf))
    lists = []
    for split in ("train", "valid"):
        lists += [
            f"--{split}_data_path_and_name_and_type",
            f"{data}/wav.scp,speech,sound",
            f"--{split}_data_path_and_name_and_type",
            f"{data}/text,text,text",
            f"--{split}_shape_file",
            f"{data}/shape",
        ]
    ASRTask.main(
        cmd=[
            "--config",
            str(out / "train.yaml"),
            "--output_dir",
            str(out),
            "--ngpu",
            "0",
            "--seed",
            "0",
            "--token_type",
            "char",
            "--token_list",
            f"{data}/tokens.txt",
            "--use_preprocessor",
            "true",
            *lists,
            *args,
        ]
    )
