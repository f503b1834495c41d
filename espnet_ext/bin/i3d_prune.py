"""Statically prune a trained ESPnet encoder: drop its least useful blocks.

The baseline I3D (arXiv 2303.07624) is compared against: a vanilla model pruned to
the same average depth. Protocol (a simpler one than iterative pruning with
fine-tuning after every removal, documented in README.md):

1. greedy backward elimination on a held-out data dir: at each step remove, among
   the blocks still present, the one whose removal gives the lowest loss of the
   whole model (ESPnet's CTC/attention loss, eval mode) until ``--keep_blocks``
   remain; no fine-tuning in between;
2. one fine-tuning run of the pruned model (``--pretrained_model pruned.pth`` with a
   config of ``num_blocks: K``, e.g.
   ``egs2/speechocean762/asr1/conf/tuning/train_asr_conformer_pruned.yaml``).

    python -m espnet_ext.bin.i3d_prune \\
        --asr_train_config exp/asr_train_asr_conformer/config.yaml \\
        --asr_model_file exp/asr_train_asr_conformer/valid.acc.ave.pth \\
        --data_dir data/dev --keep_blocks 3 --out_dir exp/conformer_pruned3

Writes ``pruned.pth`` (the whole model's state dict, kept blocks renumbered
0..K-1: it loads into a model built with ``num_blocks: K``), ``config.yaml`` (the
training config with ``encoder_conf.num_blocks: K``) and ``prune_log.json`` (the
loss of every candidate at every step and the removal order).
"""

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

__all__ = ["greedy_prune", "main"]


def _load_batches(model, train_args, data_dir: Path, max_utts: Optional[int]):
    """[(speech (1, S), lengths (1,), text (1, L), text_lengths (1,))] per
    utterance, tokenised as the model was trained."""
    import soundfile as sf
    import torch
    from espnet2.text.build_tokenizer import build_tokenizer
    from espnet2.text.token_id_converter import TokenIDConverter

    from espnet_ext.bin.i3d_gates import _read_table, resolve_audio

    tokenizer = build_tokenizer(
        token_type=train_args.token_type,
        bpemodel=getattr(train_args, "bpemodel", None),
        non_linguistic_symbols=getattr(train_args, "non_linguistic_symbols", None),
    )
    converter = TokenIDConverter(token_list=model.token_list)
    wav = _read_table(data_dir / "wav.scp")
    text = _read_table(data_dir / "text")
    keys = [k for k in sorted(wav) if k in text]
    keys = keys[:max_utts] if max_utts else keys
    batches = []
    for key in keys:
        audio, _ = sf.read(resolve_audio(data_dir, wav[key]), dtype="float32")
        if audio.ndim > 1:
            audio = audio[:, 0]
        ids = converter.tokens2ids(tokenizer.text2tokens(text[key]))
        batches.append(
            (
                torch.from_numpy(audio)[None],
                torch.tensor([len(audio)]),
                torch.tensor([ids]),
                torch.tensor([len(ids)]),
            )
        )
    if not batches:
        raise ValueError(f"{data_dir}: no utterance with both wav.scp and text")
    return batches


def _mean_loss(model, batches, device: str) -> float:
    import torch

    total = 0.0
    with torch.inference_mode():
        for speech, lengths, text, text_lengths in batches:
            loss, _, _ = model(
                speech.to(device),
                lengths.to(device),
                text.to(device),
                text_lengths.to(device),
            )
            total += float(loss)
    return total / len(batches)


def _use_blocks(encoder, blocks, keep: List[int]) -> None:
    from espnet.nets.pytorch_backend.transformer.repeat import MultiSequential

    encoder.encoders = MultiSequential(*[blocks[i] for i in keep])


def greedy_prune(model, batches, keep_blocks: int, device: str = "cpu") -> Dict:
    """Remove blocks of ``model.encoder`` one at a time (lowest loss first) until
    ``keep_blocks`` remain; the model is left with the kept blocks.

    Returns ``{"kept": [...], "removed": [...], "steps": [...]}`` (0-based indices
    of the original blocks).
    """
    encoder = model.encoder
    if getattr(encoder, "interctc_layer_idx", []):
        raise ValueError("i3d_prune: encoders with interctc_layer_idx are not handled")
    if hasattr(encoder, "gate_slots"):
        raise ValueError("i3d_prune prunes vanilla encoders, not I3D ones")
    blocks = list(encoder.encoders)
    if not 1 <= keep_blocks < len(blocks):
        raise ValueError(
            f"--keep_blocks must be in [1, {len(blocks) - 1}] for an encoder of "
            f"{len(blocks)} blocks, got {keep_blocks}"
        )
    model.eval()
    current = list(range(len(blocks)))
    steps = [{"blocks": list(current), "loss": _mean_loss(model, batches, device)}]
    print(
        f"[i3d_prune] all {len(blocks)} blocks: loss {steps[0]['loss']:.3f}", flush=True
    )
    removed = []
    while len(current) > keep_blocks:
        candidates = {}
        for i in current:
            _use_blocks(encoder, blocks, [j for j in current if j != i])
            candidates[i] = _mean_loss(model, batches, device)
            # Progress: each candidate is a pass over the whole data dir.
            print(
                f"[i3d_prune] {len(current) - 1} blocks, without block {i + 1}: "
                f"loss {candidates[i]:.3f}",
                flush=True,
            )
        drop = min(candidates, key=candidates.get)
        current.remove(drop)
        removed.append(drop)
        steps.append(
            {
                "removed": drop,
                "blocks": list(current),
                "loss": candidates[drop],
                "candidates": {str(k): v for k, v in candidates.items()},
            }
        )
    _use_blocks(encoder, blocks, current)
    return {"kept": current, "removed": removed, "steps": steps}


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--asr_train_config", type=Path, required=True)
    p.add_argument("--asr_model_file", type=Path, required=True)
    p.add_argument("--data_dir", type=Path, required=True, help="wav.scp + text")
    p.add_argument("--keep_blocks", type=int, required=True)
    p.add_argument("--out_dir", type=Path, required=True)
    p.add_argument("--max_utts", type=int, default=100)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import torch
    from espnet2.tasks.asr import ASRTask

    model, train_args = ASRTask.build_model_from_file(
        args.asr_train_config, args.asr_model_file, args.device
    )
    batches = _load_batches(model, train_args, args.data_dir, args.max_utts)
    log = greedy_prune(model, batches, args.keep_blocks, args.device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out_dir / "pruned.pth")
    conf = yaml.safe_load(args.asr_train_config.read_text())
    conf["encoder_conf"]["num_blocks"] = args.keep_blocks
    (args.out_dir / "config.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
    log.update(
        source=str(args.asr_model_file),
        data_dir=str(args.data_dir),
        utterances=len(batches),
    )
    (args.out_dir / "prune_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(
        f"[i3d_prune] kept blocks {[i + 1 for i in log['kept']]} (1-based), removed "
        f"{[i + 1 for i in log['removed']]} in that order; dev loss "
        f"{log['steps'][0]['loss']:.2f} -> {log['steps'][-1]['loss']:.2f}"
    )
    print(f"[i3d_prune] written to {args.out_dir}")
    return log


if __name__ == "__main__":
    main()
