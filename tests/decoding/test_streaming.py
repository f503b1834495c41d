"""StreamingASR: chunk by chunk equals the full forward with the chunk mask."""

import types

import numpy as np
import pytest
import soundfile
import torch
from espnet2.asr.ctc import CTC
from espnet2.asr.frontend.default import DefaultFrontend
from espnet2.text.char_tokenizer import CharTokenizer
from espnet2.text.token_id_converter import TokenIDConverter

from espnet_ext.decoders.bitransformer import BiTransformerDecoder
from espnet_ext.decoding.search import ctc_prefix_beam_search
from espnet_ext.decoding.streaming import StreamingASR
from espnet_ext.encoders.u2_conformer import U2ConformerEncoder
from espnet_ext.models.asr_model import ESPnetExtASRModel

TOKENS = (
    ["<blank>", "<unk>", "<space>"]
    + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ'")
    + ["<sos/eos>"]
)


def _speech2text():
    torch.manual_seed(0)
    V = len(TOKENS)
    encoder = U2ConformerEncoder(
        20,
        output_size=16,
        attention_heads=2,
        linear_units=24,
        num_blocks=2,
        input_layer="conv2d6",
        macaron_style=True,
        rel_pos_type="latest",
        cnn_module_kernel=5,
        use_dynamic_chunk=True,
        causal=True,
    )
    model = ESPnetExtASRModel(
        vocab_size=V,
        token_list=TOKENS,
        frontend=DefaultFrontend(n_fft=512, hop_length=160, n_mels=20),
        specaug=None,
        normalize=None,
        preencoder=None,
        encoder=encoder,
        postencoder=None,
        decoder=BiTransformerDecoder(
            V, 16, attention_heads=2, linear_units=24, num_blocks=1
        ),
        ctc=CTC(V, 16),
        joint_network=None,
        report_cer=False,
        report_wer=False,
        reverse_weight=0.3,
    ).eval()
    return types.SimpleNamespace(
        asr_model=model,
        converter=TokenIDConverter(TOKENS),
        tokenizer=CharTokenizer(non_linguistic_symbols=None),
    )


@pytest.fixture(scope="module")
def audio(speechocean):
    key, rel = (speechocean / "dev" / "wav.scp").read_text().splitlines()[0].split()
    wav, fs = soundfile.read(speechocean / rel, dtype="float32")
    assert fs == 16000
    return wav[: 16000 * 2]  # 2 s keep the test small


@pytest.mark.parametrize("feed", [1000, 2560])
def test_streaming_equals_full_forward_with_chunk_mask(audio, feed):
    s2t = _speech2text()
    model = s2t.asr_model
    stream = StreamingASR(
        s2t, decoding_chunk_size=4, num_decoding_left_chunks=2, beam_size=3
    )
    partials = [
        stream.accept_waveform(audio[i : i + feed]) for i in range(0, len(audio), feed)
    ]
    final = stream.finalize()
    streamed = torch.cat(stream.encoder_out)
    with torch.no_grad():
        feats, flens = model.frontend(
            torch.from_numpy(audio)[None], torch.tensor([len(audio)])
        )
        assert torch.allclose(stream.feats, feats[0], atol=1e-4)
        model.encoder.set_decoding_chunk(4, 2)
        enc, _, _ = model.encoder(feats, flens)
    assert streamed.shape == enc[0].shape
    assert torch.allclose(streamed, enc[0], atol=1e-4)
    nbest = ctc_prefix_beam_search(model.ctc.log_softmax(enc)[0], 3)
    assert [t for t, _ in stream.search.nbest()] == [t for t, _ in nbest]
    assert final.final and not partials[0].final
    assert stream.first_partial_at is not None


@pytest.mark.parametrize("samples", [0, 256])
def test_streaming_too_short_utterance_is_a_clear_error(samples):
    stream = StreamingASR(_speech2text(), decoding_chunk_size=4)
    stream.accept_waveform(np.zeros(samples, dtype=np.float32))
    with pytest.raises(ValueError, match=f"utterance of {samples} samples is too sh"):
        stream.finalize()


def test_streaming_bad_input():
    s2t = _speech2text()
    with pytest.raises(ValueError, match="decoding_chunk_size"):
        StreamingASR(s2t, decoding_chunk_size=0)
    s2t.asr_model.encoder.causal = False
    with pytest.raises(ValueError, match="causal"):
        StreamingASR(s2t, decoding_chunk_size=4)
