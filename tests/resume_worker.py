"""The processes of ``tests/test_resume.py``: each trains its share of the cases.

For a case: ``asr_train`` for 2 epochs straight, and for 1 epoch then again with
``--resume true --max_epoch 2`` in the same directory (ESPnet reseeds every epoch with
``seed + epoch``, so the two must end equal). Both final ``checkpoint.pth`` are
compared tensor by tensor: the model (routers, gate temperature steps, quantised bases,
BatchNorm statistics), the optimiser and the scheduler. The resumed invocation must
really resume: it may run only epoch 2's training forwards.

Then the uninterrupted run's averaged model goes through ESPnet's ``pack`` and
``unpack`` into ``Speech2Text.from_pretrained``, which loads with ``strict=False``: the
model it builds must hold exactly the saved keys and values, and decode an utterance.
"""

import os
import traceback
from pathlib import Path

import torch
from conftest import real_speech_batch
from espnet_trainer import asr_train, write_data
from model_zoo import load_case

NUM_UTTS = 4  # 2 steps of 2 utterances per epoch


def _count_training_forwards():
    """Count the training-mode forwards of every model ``ASRTask`` builds."""
    from espnet2.tasks.asr import ASRTask

    counter = {"train": 0}
    build = ASRTask.build_model.__func__

    def counting(cls, args):
        model = build(cls, args)

        def hook(module, inputs):
            counter["train"] += int(module.training)

        model.register_forward_pre_hook(hook)
        return model

    ASRTask.build_model = classmethod(counting)
    return counter


def _differences(a, b, prefix=""):
    """Paths where two nested checkpoint structures differ (tensors bit-exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{prefix}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{prefix}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{prefix}: lengths {len(a)} != {len(b)}"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b))
            for d in _differences(x, y, f"{prefix}[{i}]")
        ]
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [prefix]
    return [] if a == b else [prefix]


def pack_round_trip(exp: Path, wav: Path) -> dict:
    import soundfile as sf
    from espnet2.bin.asr_inference import Speech2Text
    from espnet2.main_funcs.pack_funcs import pack, unpack

    # Relative paths, as asr.sh packs them from the recipe directory (an absolute
    # path would unpack onto the original file instead of into the new directory).
    cwd = os.getcwd()
    os.chdir(exp)
    try:
        pack(
            files={"asr_model_file": "valid.acc.ave.pth"},
            yaml_files={"asr_train_config": "config.yaml"},
            outpath="asr_model.zip",
        )
    finally:
        os.chdir(cwd)
    files = unpack(exp / "asr_model.zip", exp.parent / "unpacked")
    assert all(exp.parent / "unpacked" in Path(f).parents for f in files.values())
    s2t = Speech2Text.from_pretrained(**files, beam_size=2, ctc_weight=0.3)
    saved = torch.load(exp / "valid.acc.ave.pth", map_location="cpu")
    loaded = s2t.asr_model.state_dict()
    text = s2t(sf.read(wav, dtype="float32")[0])[0][0]
    return {
        "missing": sorted(saved.keys() - loaded.keys()),
        "unexpected": sorted(loaded.keys() - saved.keys()),
        "changed": sorted(
            k
            for k in saved.keys() & loaded.keys()
            if not torch.equal(saved[k], loaded[k])
        ),
        "decoded": isinstance(text, str),
    }


def worker(index: int, shares, out_dir: str, corpus: str, results):
    out, corpus = Path(out_dir), Path(corpus)
    counter = _count_training_forwards()
    tokens, _, wav_paths = real_speech_batch(corpus, NUM_UTTS, space="<space>")
    data = write_data(out / f"data{index}", tokens, corpus, NUM_UTTS)
    for name in shares[index]:
        try:
            conf = load_case(name, tokens, out / name)
            straight, resumed = out / name / "straight", out / name / "resumed"
            asr_train(conf, data, straight, "--max_epoch", "2", batch_size=2)
            asr_train(conf, data, resumed, "--max_epoch", "1", batch_size=2)
            counter["train"] = 0
            asr_train(
                conf,
                data,
                resumed,
                "--max_epoch",
                "2",
                "--resume",
                "true",
                batch_size=2,
            )
            a, b = (
                torch.load(d / "checkpoint.pth", weights_only=False)
                for d in (straight, resumed)
            )
            results[name] = {
                "pack": pack_round_trip(straight, wav_paths[0]),
                "resumed_forwards": counter["train"],
                "differences": {
                    key: _differences(a[key], b[key], key)
                    for key in ("model", "optimizers", "schedulers")
                },
            }
        except BaseException:  # ESPnet's main may sys.exit
            results[name] = {"error": traceback.format_exc()[-2000:]}
