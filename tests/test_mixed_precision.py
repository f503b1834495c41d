"""bf16 autocast on CPU through every model class of ours, on real utterances.

ESPnet users train with AMP. Each case of ``tests/model_zoo.py`` (every encoder,
decoder, adapter and quantised base of ours) is built as ``asr_train`` builds it, and
one training step runs under
``torch.autocast("cpu", dtype=torch.bfloat16)``: the loss and every gradient must be
finite, and the loss must stay near the fp32 loss of the same weights and batch
(routers, gate predictors and the MoE k-way sum run in fp32 by design, so bf16 only
rounds the matrix products).
"""

import random

import pytest
import torch
from conftest import real_speech_batch
from model_zoo import CASES, build_case, load_case


@pytest.fixture(scope="module")
def real_batch(speechocean):
    return real_speech_batch(speechocean, 2)[:2]


def _loss(model, batch):
    # Same dropout, SpecAugment and dynamic-chunk draws for both precisions.
    torch.manual_seed(1)
    random.seed(1)
    loss, _, _ = model(**batch)
    return loss


@pytest.mark.parametrize("case", CASES)
def test_bf16_autocast_step_is_finite_and_close_to_fp32(case, real_batch):
    tokens, batch = real_batch
    model = build_case(load_case(case, tokens)).train()
    fp32 = _loss(model, batch).detach()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss), f"{case}: bf16 loss {loss}"
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
