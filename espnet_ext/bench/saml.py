"""SAML model bytes: NF4 (or int8) base + fp32 experts + routers vs the fp32 model.

For each model, the bytes of the saved state dict (``torch.save`` to memory, what a
checkpoint costs) of

1. the fp32 model;
2. the same model with ``adapter: saml`` attached (E experts of rank r on the attention
   projections, one router per attention type) and the weights of its linear layers,
   convolutions and embeddings (``--quantize_modules``) stored in NF4
   (``--quantize``), broken down into quantised weights (codes + scales), what stays
   fp32 (norms, biases, small weights), experts and routers.

Models: the speechocean762 recipe's conformer (``train_asr_conformer.yaml``), the
repository's 12-block conformer (``conf/train_asr_conformer.yaml``) and, when
``openai-whisper`` is installed, Whisper ``base`` and ``small`` built from
``ModelDimensions`` with random weights (sizes do not depend on the values). Target
(issue 13): <= 1/7. Writes ``bench_results/saml.md``.
"""

import argparse
import io
import time
from pathlib import Path
from typing import Dict, List

import torch
import yaml

from espnet_ext.adapters.saml import ROUTERS_ATTR, attach_saml
from espnet_ext.layers.quantize import KINDS, FrozenLinear

REPO = Path(__file__).resolve().parents[2]
CONFORMER_CONFIGS = (
    "egs2/speechocean762/asr1/conf/tuning/train_asr_conformer.yaml",
    "conf/train_asr_conformer.yaml",
)
WHISPER_BASE = dict(
    n_mels=80,
    n_audio_ctx=1500,
    n_audio_state=512,
    n_audio_head=8,
    n_audio_layer=6,
    n_vocab=51865,
    n_text_ctx=448,
    n_text_state=512,
    n_text_head=8,
    n_text_layer=6,
)


WHISPER_SMALL = dict(
    WHISPER_BASE,
    n_audio_state=768,
    n_audio_head=12,
    n_audio_layer=12,
    n_text_state=768,
    n_text_head=12,
    n_text_layer=12,
)


def _saved_bytes(sd: Dict[str, torch.Tensor]) -> int:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.tell()


def _tensor_bytes(sd, pred) -> int:
    return sum(v.numel() * v.element_size() for k, v in sd.items() if pred(k))


def espnet_conformer(config: Path, vocab: int = 32) -> torch.nn.Module:
    from espnet2.asr.ctc import CTC
    from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
    from espnet2.asr.encoder.conformer_encoder import ConformerEncoder
    from espnet2.asr.espnet_model import ESPnetASRModel

    conf = yaml.safe_load(config.read_text())
    n_mels = conf.get("frontend_conf", {}).get("n_mels", 80)
    enc = ConformerEncoder(input_size=n_mels, **conf["encoder_conf"])
    dec = TransformerDecoder(vocab, enc.output_size(), **conf["decoder_conf"])
    return ESPnetASRModel(
        vocab_size=vocab,
        token_list=[str(i) for i in range(vocab)],
        frontend=None,
        specaug=None,
        normalize=None,
        preencoder=None,
        encoder=enc,
        postencoder=None,
        decoder=dec,
        ctc=CTC(vocab, enc.output_size()),
        joint_network=None,
    )


def measure(name: str, model: torch.nn.Module, opts) -> Dict[str, object]:
    fp32 = _saved_bytes(model.state_dict())
    t0 = time.perf_counter()
    attach_saml(
        model,
        num_experts=opts.num_experts,
        rank=opts.rank,
        alpha=64.0,
        quantize=opts.quantize,
        quantize_block_size=opts.block_size,
        quantize_modules=opts.quantize_modules,
    )
    seconds = time.perf_counter() - t0
    sd = model.state_dict()
    total = _saved_bytes(sd)
    quant_keys = {
        f"{n}.{b}" if n else b
        for n, m in model.named_modules()
        if isinstance(m, FrozenLinear) and m.fmt != "none"
        for b in m._buffers
    }
    return dict(
        name=name,
        fp32=fp32,
        total=total,
        quantized=_tensor_bytes(sd, lambda k: k in quant_keys),
        experts=_tensor_bytes(sd, lambda k: k.endswith((".lora_a", ".lora_b"))),
        routers=_tensor_bytes(sd, lambda k: k.startswith(ROUTERS_ATTR + ".")),
        other=_tensor_bytes(
            sd,
            lambda k: k not in quant_keys
            and not k.endswith((".lora_a", ".lora_b"))
            and not k.startswith(ROUTERS_ATTR + "."),
        ),
        params=sum(p.numel() for p in model.parameters())
        + sum(
            m.in_features * m.out_features
            for m in model.modules()
            if isinstance(m, FrozenLinear) and m.fmt != "none"
        ),
        seconds=seconds,
    )


def main(argv: List[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m espnet_ext.bench saml")
    p.add_argument("--num_experts", type=int, default=10)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--quantize", default="nf4", choices=["nf4", "int8"])
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument(
        "--quantize_modules",
        nargs="+",
        default=list(KINDS),
        choices=KINDS,
        help="kinds of base modules stored quantised",
    )
    p.add_argument("--no_whisper", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "bench_results" / "saml.md")
    opts = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for cfg in CONFORMER_CONFIGS:
        path = REPO / cfg
        if path.exists():
            rows.append(measure(f"`{cfg}`", espnet_conformer(path), opts))
    if not opts.no_whisper:
        try:
            import whisper
        except ImportError:
            whisper = None
        if whisper is not None:
            for name, dims in (("base", WHISPER_BASE), ("small", WHISPER_SMALL)):
                model = whisper.model.Whisper(whisper.model.ModelDimensions(**dims))
                rows.append(measure(f"Whisper {name} (random weights)", model, opts))
                del model
    mb = 1e6
    lines = [
        "# SAML model bytes",
        "",
        f"`python -m espnet_ext.bench saml`: E={opts.num_experts} experts of rank "
        f"{opts.rank} on q/k/v/out of every attention, one router per attention "
        f"type; base weights of kinds {' + '.join(opts.quantize_modules)} stored "
        f"as {opts.quantize} (block {opts.block_size}); torch {torch.__version__}. "
        "Bytes of the saved state dict.",
        "",
        "| model | params (M) | fp32 MB | SAML total MB | / fp32 | quantised MB | "
        "fp32 rest MB | experts MB | routers MB | experts + routers / fp32 | "
        "target <= 1/7 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["total"] / r["fp32"]
        floor = (r["experts"] + r["routers"]) / r["fp32"]
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f} | {r['fp32'] / mb:.2f} | "
            f"{r['total'] / mb:.2f} | 1/{1 / ratio:.2f} | {r['quantized'] / mb:.2f} | "
            f"{r['other'] / mb:.2f} | {r['experts'] / mb:.2f} | "
            f"{r['routers'] / mb:.2f} | 1/{1 / floor:.2f} | "
            f"{'met' if ratio <= 1 / 7 else 'not met'} |"
        )
    lines += [
        "",
        "`fp32 rest`: what the base keeps in fp32 (norms, biases, positional tables, "
        "weights the block size does not divide, and kinds not quantised). "
        "`experts + routers / fp32`: the adapter alone, fp32 as the paper keeps it; "
        "no storage of the base can bring the total below it. NF4 itself costs "
        "4 bits per weight plus one int8 scale per block of 64 (about 1/7.8 of "
        "fp32), so a total of 1/7 leaves the fp32 adapter about 1/70 of the fp32 "
        "model.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(text)
