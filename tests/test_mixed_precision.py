"""bf16 autocast on CPU through every model class of ours, on real utterances.

ESPnet users train with AMP. Each tiny config (``tests/conf/tiny_*.yaml``: one per
encoder family), plus U2++ (``u2_conformer`` + ``bitransformer``) and
``i3d_transformer``, is built by ESPnet's ``ASRTask``, and one training step runs under
``torch.autocast("cpu", dtype=torch.bfloat16)``: the loss and every gradient must be
finite, and the loss must stay near the fp32 loss of the same weights and batch
(routers, gate predictors and the MoE k-way sum run in fp32 by design, so bf16 only
rounds the matrix products).
"""

import argparse
import random

import pytest
import torch
import yaml
from conftest import REPO, real_speech_batch

TINY = sorted((REPO / "tests" / "conf").glob("tiny_*.yaml"))

VARIANTS = {
    # name: (base tiny config, overrides)
    "u2_bitransformer": (
        "tiny_moe_conformer.yaml",
        {
            "encoder": "u2_conformer",
            "encoder_conf": {
                "output_size": 32,
                "attention_heads": 2,
                "linear_units": 64,
                "num_blocks": 2,
                "cnn_module_kernel": 7,
                "use_dynamic_chunk": True,
                "causal": True,
            },
            "decoder": "bitransformer",
            "decoder_conf": {"attention_heads": 2, "linear_units": 64, "num_blocks": 1},
            "model_conf": {"ctc_weight": 0.3, "reverse_weight": 0.3},
        },
    ),
    "i3d_transformer": (
        "tiny_i3d_conformer.yaml",
        {
            "encoder": "i3d_transformer",
            "encoder_conf": {
                "output_size": 32,
                "attention_heads": 2,
                "linear_units": 64,
                "num_blocks": 2,
            },
        },
    ),
}


def _cases():
    cases = [pytest.param(f, {}, id=f.stem) for f in TINY]
    for name, (base, over) in VARIANTS.items():
        cases.append(pytest.param(REPO / "tests" / "conf" / base, over, id=name))
    return cases


@pytest.fixture(scope="module")
def real_batch(speechocean):
    return real_speech_batch(speechocean, 2)[:2]


def _build(config, overrides, tokens):
    from espnet2.tasks.asr import ASRTask

    conf = yaml.safe_load(config.read_text())
    conf.update(overrides)
    conf["token_list"] = tokens
    parser = ASRTask.get_parser()
    args = parser.parse_args([])
    for key, value in conf.items():
        setattr(args, key, value)
    torch.manual_seed(0)
    return ASRTask.build_model(argparse.Namespace(**vars(args)))


def _loss(model, batch):
    # Same dropout, SpecAugment and dynamic-chunk draws for both precisions.
    torch.manual_seed(1)
    random.seed(1)
    loss, _, _ = model(**batch)
    return loss


@pytest.mark.parametrize("config, overrides", _cases())
def test_bf16_autocast_step_is_finite_and_close_to_fp32(config, overrides, real_batch):
    tokens, batch = real_batch
    model = _build(config, overrides, tokens).train()
    fp32 = _loss(model, batch).detach()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss), f"{config.name}: bf16 loss {loss}"
    bad = [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    assert not bad, f"non-finite bf16 gradients: {bad[:5]}"
    assert any(p.grad is not None for p in model.parameters())
    # bf16 really ran (autocast rounds the products), and stayed near fp32.
    assert loss.item() != fp32.item()
    assert abs(loss.item() - fp32.item()) <= 0.05 * abs(fp32.item()), (
        loss.item(),
        fp32.item(),
    )
