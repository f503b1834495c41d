"""Stream a wav file through a U2++ model chunk by chunk, printing partial results.

    python -m espnet_ext.bin.stream_asr --asr_train_config exp/.../config.yaml \\
        --asr_model_file exp/.../valid.acc.ave.pth --wav utt.flac \\
        --decoding_chunk_size 16 --num_decoding_left_chunks 4

The audio is fed in pieces of ``--feed_ms`` milliseconds (as a microphone would
deliver it); each line shows the audio time, the compute time so far, and the
current best hypothesis. The last line is the final (attention-rescored) result.
"""

import argparse
import sys
import time
from typing import List, Optional

__all__ = ["main", "get_parser"]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--asr_train_config", required=True)
    p.add_argument("--asr_model_file", required=True)
    p.add_argument("--wav", required=True, help="audio file (any soundfile format)")
    p.add_argument("--decoding_chunk_size", type=int, default=16)
    p.add_argument("--num_decoding_left_chunks", type=int, default=-1)
    p.add_argument("--beam_size", type=int, default=10)
    p.add_argument("--ctc_weight", type=float, default=0.5)
    p.add_argument("--reverse_weight", type=float, default=None)
    p.add_argument(
        "--final_mode",
        default="attention_rescoring",
        choices=["attention_rescoring", "ctc_prefix_beam"],
    )
    p.add_argument("--feed_ms", type=float, default=160.0, help="audio per feed")
    p.add_argument("--device", default="cpu")
    return p


def main(cmd: Optional[List[str]] = None) -> str:
    args = get_parser().parse_args(cmd)
    if args.decoding_chunk_size <= 0:
        raise SystemExit(
            f"--decoding_chunk_size must be > 0, got {args.decoding_chunk_size}"
        )
    import soundfile
    from espnet2.bin.asr_inference import Speech2Text

    from espnet_ext.decoding.streaming import StreamingASR

    s2t = Speech2Text(
        asr_train_config=args.asr_train_config,
        asr_model_file=args.asr_model_file,
        device=args.device,
        ctc_weight=args.ctc_weight,
        beam_size=args.beam_size,
    )
    stream = StreamingASR(
        s2t,
        decoding_chunk_size=args.decoding_chunk_size,
        num_decoding_left_chunks=args.num_decoding_left_chunks,
        beam_size=args.beam_size,
        ctc_weight=args.ctc_weight,
        reverse_weight=args.reverse_weight,
        final_mode=args.final_mode,
    )
    audio, fs = soundfile.read(args.wav, dtype="float32")
    if audio.ndim > 1:
        audio = audio[:, 0]
    if fs != stream.fs:
        raise SystemExit(f"{args.wav}: {fs} Hz, the model expects {stream.fs} Hz")
    step = max(int(fs * args.feed_ms / 1000), 1)
    start = time.perf_counter()
    last = None
    for i in range(0, len(audio), step):
        partial = stream.accept_waveform(audio[i : i + step])
        if partial.text != last:
            elapsed = time.perf_counter() - start
            print(
                f"[audio {partial.audio_seconds:6.2f}s | compute {elapsed:6.2f}s] "
                f"partial: {partial.text}",
                flush=True,
            )
            last = partial.text
    final = stream.finalize()
    elapsed = time.perf_counter() - start
    print(
        f"[audio {len(audio) / fs:6.2f}s | compute {elapsed:6.2f}s] final: "
        f"{final.text}",
        flush=True,
    )
    return final.text


if __name__ == "__main__":
    main(sys.argv[1:])
