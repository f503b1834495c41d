"""Size and decoding speed of a trained ESPnet ASR model, as JSON.

Loads the model with ESPnet's ``Speech2Text`` (the same beam search as
``asr_inference``), decodes one warm-up utterance, then times the first ``--max_utts``
utterances of a Kaldi dir one by one (batch 1, as asr.sh decodes) with ``--nthreads``
torch threads. RTF = decoding seconds / audio seconds.

Example::

    python -m espnet_ext.bin.measure_asr --asr_train_config exp/asr/config.yaml \\
        --asr_model_file exp/asr/valid.acc.ave.pth \\
        --inference_config conf/decode_asr.yaml \\
        --data_dir data/test --output report.json
"""

import argparse
import json
import math
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

from espnet_ext.bin.asr_pipeline import read_kaldi


def training_time(checkpoint: Path) -> Dict[str, object]:
    """Training time, epochs and the learning curve from an ESPnet ``checkpoint.pth``.

    ESPnet's reporter keeps per-epoch timings of the train, valid and plotting phases in
    the checkpoint, so the total survives resumed runs (``train.log`` is rewritten on
    resume) and excludes work a killed job lost on an unfinished epoch.
    ``train_phase_seconds`` counts the update loops only (no validation). ``curve`` has
    one entry per epoch: the training wall-clock so far (seconds) and the validation
    statistics ESPnet logged for that epoch (``acc``, ``cer``, ``cer_ctc``, ``loss``;
    absent ones are left out).
    """
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["reporter"]
    # stats: {epoch: {"train" | "valid" | "att_plot": {"time": timedelta, ...}}}
    seconds, train_phase, curve = 0.0, 0.0, []
    for epoch, phases in sorted(state["stats"].items()):
        seconds += sum(
            ph["time"].total_seconds() for ph in phases.values() if "time" in ph
        )
        if "time" in phases.get("train", {}):
            train_phase += phases["train"]["time"].total_seconds()
        valid = phases.get("valid", {})
        point = {"epoch": epoch, "seconds": seconds}
        for key in ("acc", "cer", "cer_ctc", "loss"):
            value = valid.get(key)
            # ESPnet logs nan for a statistic it could not compute (e.g. acc of a
            # CTC-only model); JSON has no nan, so such points are left out.
            if value is not None and math.isfinite(float(value)):
                point[f"valid_{key}"] = float(value)
        curve.append(point)
    return {
        "train_seconds": seconds,
        "train_phase_seconds": train_phase,
        "epochs": len(curve),
        "curve": curve,
    }


def measure(
    asr_train_config: Path,
    asr_model_file: Path,
    data_dir: Path,
    inference_config: Optional[Path] = None,
    max_utts: int = 50,
    nthreads: int = 1,
    lm_train_config: Optional[Path] = None,
    lm_file: Optional[Path] = None,
) -> Dict[str, float]:
    import soundfile
    import torch
    import yaml
    from espnet2.bin.asr_inference import Speech2Text

    from espnet_ext.decoding.inference_hook import (
        DecodeOptions,
        configure_speech2text,
    )

    torch.set_num_threads(nthreads)
    opts = yaml.safe_load(inference_config.read_text()) if inference_config else {}
    opts = {k: v for k, v in (opts or {}).items() if k not in ("batch_size",)}
    # The U2++ decode-YAML keys are ours (asr_inference gets them through its
    # parser hook): Speech2Text takes ESPnet's, configure_speech2text the rest.
    u2 = {k: opts.pop(k) for k in DecodeOptions._fields if k in opts}
    s2t = Speech2Text(
        asr_train_config=str(asr_train_config),
        asr_model_file=str(asr_model_file),
        lm_train_config=str(lm_train_config) if lm_train_config else None,
        lm_file=str(lm_file) if lm_file else None,
        device="cpu",
        **opts,
    )
    if u2:
        configure_speech2text(s2t, **u2)
    model = s2t.asr_model
    wavs = list(read_kaldi(data_dir / "wav.scp").items())[:max_utts]
    if not wavs:
        raise ValueError(f"{data_dir}/wav.scp lists no utterances")
    reads = [
        soundfile.read(path, dtype="float32") for _, path in wavs
    ]  # (samples, rate)
    audio = [samples for samples, _ in reads]
    s2t(torch.from_numpy(audio[0]))  # warm-up: first-call allocations and lazy init
    start = time.perf_counter()
    for a in audio:
        s2t(torch.from_numpy(a))
    seconds = time.perf_counter() - start
    audio_seconds = sum(len(samples) / rate for samples, rate in reads)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "encoder_params": sum(p.numel() for p in model.encoder.parameters()),
        "checkpoint_mb": asr_model_file.stat().st_size / 2**20,
        "rtf": seconds / audio_seconds,
        "rtf_utts": len(audio),
        "rtf_audio_seconds": audio_seconds,
        "rtf_threads": nthreads,
    }


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--asr_train_config", type=Path, required=True)
    p.add_argument("--asr_model_file", type=Path, required=True)
    p.add_argument("--inference_config", type=Path, default=None)
    p.add_argument(
        "--data_dir", type=Path, required=True, help="Kaldi dir with wav.scp"
    )
    p.add_argument("--max_utts", type=int, default=50)
    p.add_argument("--nthreads", type=int, default=1)
    p.add_argument(
        "--lm_train_config", type=Path, default=None, help="as asr_inference's"
    )
    p.add_argument("--lm_file", type=Path, default=None, help="as asr_inference's")
    p.add_argument(
        "--train_checkpoint",
        type=Path,
        default=None,
        help="ESPnet's checkpoint.pth: adds train_seconds and epochs",
    )
    p.add_argument("--output", type=Path, default=None, help="write the JSON here too")
    args = p.parse_args(argv)
    result = measure(
        args.asr_train_config,
        args.asr_model_file,
        args.data_dir,
        args.inference_config,
        args.max_utts,
        args.nthreads,
        args.lm_train_config,
        args.lm_file,
    )
    if args.train_checkpoint is not None:
        result.update(training_time(args.train_checkpoint))
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
