"""``adapter: saml`` on trained ESPnet models: attach, freeze, merge, files."""

import copy

import pytest
import torch
from saml_util import batch, loss, tiny_model

from espnet_ext.adapters.saml import (
    attach_saml,
    base_fingerprint,
    load_adapter,
    mean_routes,
    merge_saml,
    merged_plain_model,
    save_adapter,
    set_fixed_routes,
    unmerge_saml,
)

CONF = dict(num_experts=3, rank=2, alpha=8.0, dropout_rate=0.0)


def _adapted(quantize="none", seed=0):
    base = tiny_model(seed)
    model = copy.deepcopy(base)
    groups = attach_saml(model, quantize=quantize, quantize_block_size=16, **CONF)
    return base, model, groups


def _train_step(model, b, lr=0.05):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss(model, b).backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def test_one_router_per_attention_type_and_only_adapter_params_train():
    _, model, groups = _adapted()
    assert sorted(groups) == [
        "decoder__self_attn",
        "decoder__src_attn",
        "encoder__self_attn",
    ]
    assert len(groups["encoder__self_attn"]) == 2
    assert sorted(model.saml_routers) == sorted(groups)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith("saml_routers.") or n.endswith((".lora_a", ".lora_b"))
        for n in trainable
    )
    model.train()
    loss(model, batch()).backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    assert model.saml_routers["encoder__self_attn"].linear.weight.grad is not None


def test_fresh_adapter_equals_base_and_one_step_changes_it():
    base, model, _ = _adapted()
    b = batch()
    with torch.no_grad():
        torch.testing.assert_close(loss(model, b), loss(base, b))
    _train_step(model, b)
    _train_step(model, b)  # B moves at step 1, then A and the routers too
    with torch.no_grad():
        assert abs(loss(model, b) - loss(base, b)) > 1e-4


def test_base_checkpoint_loads_into_the_adapted_model():
    # ESPnet creates the adapter before --init_param: base keys must be unchanged.
    base, model, _ = _adapted()
    other = tiny_model(seed=3)
    missing, unexpected = model.load_state_dict(other.state_dict(), strict=False)
    assert not unexpected
    assert all("lora_" in k or k.startswith("saml_routers.") for k in missing)
    with torch.no_grad():
        torch.testing.assert_close(loss(model, batch()), loss(other, batch()))


def test_merged_equals_unmerged_and_the_plain_merged_model_is_a_base_model():
    base, model, _ = _adapted()
    b = batch()
    _train_step(model, b)
    _train_step(model, b)
    routes = mean_routes(model, lambda: loss(model, b))
    set_fixed_routes(model, routes)
    with torch.no_grad():
        want = loss(model, b)
        assert abs(want - loss(base, b)) > 1e-4
        merge_saml(model, routes)
        torch.testing.assert_close(loss(model, b), want, rtol=1e-4, atol=1e-4)
        unmerge_saml(model)
        plain = merged_plain_model(model, routes)
        torch.testing.assert_close(loss(plain, b), want, rtol=1e-4, atol=1e-4)
    assert set(plain.state_dict()) == set(base.state_dict())


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantised_base_stays_close_and_keeps_adapters_fp32(quantize):
    pytest.importorskip("torchao")
    base, model, _ = _adapted(quantize)
    sd = model.state_dict()
    assert not any(k.endswith("linear_q.weight") for k in sd)
    assert sd["encoder.encoders.0.self_attn.linear_q.lora_a"].dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(
            loss(model, batch()), loss(base, batch()), rtol=0.1, atol=0.1
        )


def test_quantised_base_covers_convolutions_and_embeddings_unless_told_not_to():
    pytest.importorskip("torchao")
    from espnet_ext.layers.quantize import FrozenConv, FrozenEmbedding

    _, model, _ = _adapted("nf4")
    kinds = {type(m) for m in model.modules()}
    assert FrozenConv in kinds and FrozenEmbedding in kinds
    conv = model.encoder.encoders[0].conv_module
    assert isinstance(conv.pointwise_conv1, FrozenConv)
    # the routers' convolutions train: fp32
    assert all(type(r.conv) is torch.nn.Conv1d for r in model.saml_routers.values())
    linear_only = copy.deepcopy(tiny_model())
    attach_saml(
        linear_only,
        quantize="nf4",
        quantize_block_size=16,
        quantize_modules=["linear"],
        **CONF,
    )
    kinds = {type(m) for m in linear_only.modules()}
    assert FrozenConv not in kinds and FrozenEmbedding not in kinds


def test_adapter_file_reproduces_outputs_on_a_fresh_base(tmp_path):
    base, model, _ = _adapted()
    b = batch()
    _train_step(model, b)
    _train_step(model, b)
    path = tmp_path / "spk.pth"
    save_adapter(model, str(path), speaker="spk1")
    fresh = copy.deepcopy(base)
    attach_saml(fresh, **CONF)
    assert base_fingerprint(fresh) == base_fingerprint(model)
    load_adapter(fresh, str(path))
    with torch.no_grad():
        torch.testing.assert_close(loss(fresh, b), loss(model, b))


def test_adapter_file_for_another_base_or_precision_is_refused(tmp_path):
    _, model, _ = _adapted()
    path = tmp_path / "spk.pth"
    save_adapter(model, str(path))
    other = tiny_model(seed=5)
    attach_saml(other, **CONF)
    with pytest.raises(ValueError, match="another base model"):
        load_adapter(other, str(path))
    pytest.importorskip("torchao")
    _, q, _ = _adapted("nf4")
    with pytest.raises(ValueError, match="full precision .* nf4-quantised"):
        load_adapter(q, str(path))


def test_bad_options_name_the_key():
    with pytest.raises(ValueError, match="target_modules"):
        attach_saml(tiny_model(), target_modules=["w_1"])
    with pytest.raises(ValueError, match="quantize"):
        attach_saml(tiny_model(), quantize="nf3")
    with pytest.raises(ValueError, match="attention_types"):
        attach_saml(tiny_model(), attention_types=["encoder__cross"])


def test_espnet_accepts_adapter_saml():
    import espnet2.tasks.asr  # noqa: F401  (the registration hook runs here)
    from espnet2.layers.create_adapter import create_adapter
    from espnet2.tasks.asr import ASRTask

    args = ASRTask.get_parser().parse_args(
        ["--use_adapter", "true", "--adapter", "saml", "--token_list", "x"]
    )
    assert args.adapter == "saml"
    model = tiny_model()
    create_adapter(model, "saml", dict(num_experts=2, rank=2))
    assert "saml_routers.encoder__self_attn.linear.weight" in model.state_dict()


def random_whisper(whisper, dims):
    """Whisper with random weights, every one of them finite.

    ``TextDecoder.positional_embedding`` is ``torch.empty`` (checkpoints fill it), so
    without this it holds whatever the allocator returns, NaN included.
    """
    model = whisper.model.Whisper(dims)
    torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    return model


def test_attaches_to_whisper_built_from_model_dimensions():
    whisper = pytest.importorskip("whisper")
    dims = whisper.model.ModelDimensions(
        n_mels=8,
        n_audio_ctx=6,
        n_audio_state=16,
        n_audio_head=2,
        n_audio_layer=2,
        n_vocab=20,
        n_text_ctx=8,
        n_text_state=16,
        n_text_head=2,
        n_text_layer=2,
    )
    torch.manual_seed(0)
    base = random_whisper(whisper, dims).eval()
    model = copy.deepcopy(base)
    groups = attach_saml(model, **CONF)
    assert sorted(groups) == ["decoder__attn", "decoder__cross_attn", "encoder__attn"]
    mel = torch.randn(2, 8, 12)
    tokens = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(mel, tokens), base(mel, tokens))
    model.train()
    model(mel, tokens).logsumexp(-1).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith("saml_routers.") or "lora_" in n for n in grads)
    assert any("cross_attn" in n for n in grads)


def test_whisper_with_an_nf4_base_stores_its_convolutions_and_tied_embedding():
    whisper = pytest.importorskip("whisper")
    pytest.importorskip("torchao")
    from espnet_ext.layers.quantize import FrozenConv, FrozenEmbedding, FrozenLinear

    dims = whisper.model.ModelDimensions(8, 6, 16, 2, 2, 20, 8, 16, 2, 2)
    torch.manual_seed(0)
    base = random_whisper(whisper, dims).eval()
    model = copy.deepcopy(base)
    attach_saml(model, quantize="nf4", quantize_block_size=16, **CONF)
    assert isinstance(model.encoder.conv2, FrozenConv)
    assert isinstance(model.decoder.token_embedding, FrozenEmbedding)
    # It computes the fp32 Whisper of its dequantised weights (fresh experts add
    # nothing), the output layer included (it reads the tied embedding's .weight).
    dequantised = copy.deepcopy(base)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, FrozenLinear) and m.fmt != "none":
                dequantised.get_submodule(name).weight.copy_(m.base_weight())
        mel, tokens = torch.randn(2, 8, 12), torch.randint(0, 20, (2, 5))
        torch.testing.assert_close(model(mel, tokens), dequantised(mel, tokens))


def test_attaches_to_espnet_whisper_encoder_without_download(monkeypatch):
    whisper = pytest.importorskip("whisper")
    from espnet2.asr.encoder.whisper_encoder import OpenAIWhisperEncoder

    dims = whisper.model.ModelDimensions(
        n_mels=80,
        n_audio_ctx=1500,
        n_audio_state=16,
        n_audio_head=2,
        n_audio_layer=2,
        n_vocab=20,
        n_text_ctx=8,
        n_text_state=16,
        n_text_head=2,
        n_text_layer=1,
    )
    torch.manual_seed(0)
    random_model = random_whisper(whisper, dims)
    monkeypatch.setattr(whisper, "load_model", lambda *a, **k: random_model)
    # ESPnet 202511 imports whisper.audio.N_MELS (80), which openai-whisper removed
    # in its 2024 releases (mel_filters takes n_mels since large-v3).
    monkeypatch.setattr(whisper.audio, "N_MELS", 80, raising=False)
    base = OpenAIWhisperEncoder(whisper_model="tiny").eval()
    enc = copy.deepcopy(base)
    assert list(attach_saml(enc, **CONF)) == ["encoders__attn"]
    speech, lens = torch.randn(2, 8000), torch.tensor([8000, 6000])
    with torch.no_grad():
        torch.testing.assert_close(enc(speech, lens)[0], base(speech, lens)[0])
    assert all(
        n.startswith("saml_routers.") or "lora_" in n
        for n, p in enc.named_parameters()
        if p.requires_grad
    )
