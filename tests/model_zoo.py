"""Every model class and option family of ours as a tiny ESPnet ASR config (tests only).

The reliability tests (bf16 autocast, DDP, resume) run the same checks over every class;
this is their one list. Each case is a tiny config of ``tests/conf`` plus overrides, so
a new encoder, decoder, adapter or model option is added here once and every such test
covers it.
"""

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import torch
import yaml

CONF = Path(__file__).resolve().parent / "conf"

_TRANSFORMER = {"output_size": 32, "attention_heads": 2, "linear_units": 64}
_CONFORMER = dict(_TRANSFORMER, num_blocks=2, cnn_module_kernel=7)
_DECODER = {"attention_heads": 2, "linear_units": 64, "num_blocks": 1}

# name: (tiny config in tests/conf, top-level keys that replace the config's)
CASES: Dict[str, Tuple[str, dict]] = {
    **{p.stem: (p.name, {}) for p in sorted(CONF.glob("tiny_*.yaml"))},
    "residual_transformer": (
        "tiny_residual_conformer.yaml",
        {
            "encoder": "residual_transformer",
            "encoder_conf": dict(_TRANSFORMER, num_blocks=2, lowrank_rank=4),
        },
    ),
    "i3d_transformer": (
        "tiny_i3d_conformer.yaml",
        {
            "encoder": "i3d_transformer",
            "encoder_conf": dict(_TRANSFORMER, num_blocks=2),
        },
    ),
    "u2_bitransformer": (
        "tiny_moe_conformer.yaml",
        {
            "encoder": "u2_conformer",
            "encoder_conf": dict(_CONFORMER, use_dynamic_chunk=True, causal=True),
            "decoder": "bitransformer",
            "decoder_conf": _DECODER,
            "model_conf": {"ctc_weight": 0.3, "reverse_weight": 0.3},
        },
    ),
    "u2_moe_bitransformer": (
        "tiny_moe_conformer.yaml",
        {
            "encoder": "moe_conformer",
            "encoder_conf": dict(
                _CONFORMER, num_experts=4, top_k=2, use_dynamic_chunk=True, causal=True
            ),
            "decoder": "moe_bitransformer",
            "decoder_conf": dict(_DECODER, num_experts=4, top_k=2),
            "model_conf": {"ctc_weight": 0.3, "reverse_weight": 0.3},
        },
    ),
    # A frozen 4-bit base under the LoRA experts (the SAML paper's setting).
    "saml_conformer_nf4": (
        "tiny_saml_conformer.yaml",
        {
            "encoder": "saml_conformer",
            "encoder_conf": dict(
                _CONFORMER,
                num_experts=3,
                lora_rank=2,
                freeze_base=True,
                quantize="nf4",
                quantize_block_size=16,
            ),
        },
    ),
    # ESPnet's adapter mechanism on ESPnet's own conformer, base stored in int8.
    "adapter_saml_int8": (
        "tiny_residual_conformer.yaml",
        {
            "encoder": "conformer",
            "encoder_conf": dict(_CONFORMER, macaron_style=True),
            "use_adapter": True,
            "adapter": "saml",
            "adapter_conf": {
                "num_experts": 2,
                "rank": 2,
                "quantize": "int8",
                "quantize_block_size": 16,
            },
        },
    ),
    # Knowledge distillation from a (random) dense conformer teacher; TEACHER is
    # replaced by a teacher that load_case writes for the case's tokens.
    "distill": (
        "tiny_residual_conformer.yaml",
        {
            "model": "espnet_ext",
            "model_conf": {
                "ctc_weight": 0.3,
                "lsm_weight": 0.1,
                "distill": {"teacher_config": "TEACHER", "teacher_model": "TEACHER"},
            },
        },
    ),
}


def load_case(name: str, tokens, workdir=None) -> dict:
    """The config of case ``name`` (a dict, as ESPnet's config.yaml) for ``tokens``;
    a KD teacher, if the case has one, is written under ``workdir`` (default: a new
    temporary directory)."""
    base, overrides = CASES[name]
    conf = yaml.safe_load((CONF / base).read_text())
    conf.update(copy.deepcopy(overrides))
    conf["token_list"] = list(tokens)
    distill = conf.get("model_conf", {}).get("distill")
    if distill is not None:
        workdir = Path(workdir or tempfile.mkdtemp())
        distill["teacher_config"], distill["teacher_model"] = write_teacher(
            tokens, workdir / "teacher"
        )
    return conf


def full_config(conf: dict) -> argparse.Namespace:
    """Every ``asr_train`` argument: the parser's defaults overlaid with ``conf``."""
    from espnet2.tasks.asr import ASRTask

    args = ASRTask.get_parser().parse_args([])
    for key, value in conf.items():
        setattr(args, key, value)
    return argparse.Namespace(**vars(args))


def write_teacher(tokens, directory: Path) -> Tuple[str, str]:
    """A random tiny ESPnet conformer saved as a trained model is: (config, model)."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = yaml.safe_load((CONF / "tiny_residual_conformer.yaml").read_text())
    conf.update(encoder="conformer", encoder_conf=dict(_CONFORMER, macaron_style=True))
    conf["token_list"] = list(tokens)
    args = full_config(conf)
    config, model = directory / "config.yaml", directory / "model.pth"
    config.write_text(yaml.safe_dump(vars(args)))
    torch.save(build_case(conf, seed=1).state_dict(), model)
    return str(config), str(model)


def build_case(conf: dict, seed: int = 0) -> torch.nn.Module:
    """The model ``asr_train`` trains for ``conf`` (every other key at its default):
    ``ASRTask.build_model``, then the adapter as ESPnet's ``main_worker`` adds it."""
    from espnet2.layers.create_adapter import create_adapter
    from espnet2.tasks.asr import ASRTask

    args = full_config(conf)
    torch.manual_seed(seed)
    model = ASRTask.build_model(args)
    if args.use_adapter:
        create_adapter(model, args.adapter, args.adapter_conf)
    return model
