"""A tiny ESPnet CTC/attention model (conformer encoder, transformer decoder)."""

import torch
from espnet2.asr.ctc import CTC
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder
from espnet2.asr.encoder.conformer_encoder import ConformerEncoder
from espnet2.asr.espnet_model import ESPnetASRModel

VOCAB = 10
D = 16


def tiny_model(seed: int = 0) -> ESPnetASRModel:
    torch.manual_seed(seed)
    enc = ConformerEncoder(
        input_size=8,
        output_size=D,
        attention_heads=2,
        linear_units=32,
        num_blocks=2,
        input_layer="linear",
        cnn_module_kernel=3,
        macaron_style=True,
        use_flash_attn=False,
    )
    dec = TransformerDecoder(
        VOCAB,
        D,
        attention_heads=2,
        linear_units=32,
        num_blocks=2,
        use_flash_attn=False,
    )
    model = ESPnetASRModel(
        vocab_size=VOCAB,
        token_list=[str(i) for i in range(VOCAB)],
        frontend=None,
        specaug=None,
        normalize=None,
        preencoder=None,
        encoder=enc,
        postencoder=None,
        decoder=dec,
        ctc=CTC(VOCAB, D),
        joint_network=None,
        ctc_weight=0.3,
    )
    return model.eval()


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    speech = torch.randn(2, 12, 8, generator=g)
    lengths = torch.tensor([12, 9])
    text = torch.randint(1, VOCAB - 1, (2, 4), generator=g)
    text[1, 3] = -1
    text_lengths = torch.tensor([4, 3])
    return speech, lengths, text, text_lengths


def loss(model, b) -> torch.Tensor:
    return model(*b)[0]
