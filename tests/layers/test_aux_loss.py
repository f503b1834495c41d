"""Aux-loss records: warnings without global state, per-replica lists, base order."""

import pytest
import torch

from espnet_ext.encoders.moe_conformer import MoEConformerEncoder
from espnet_ext.layers.aux_loss import AuxRecorder

ENC = dict(
    input_size=12,
    output_size=16,
    attention_heads=2,
    linear_units=24,
    num_blocks=1,
    moe_balance_weight=0.25,
)


@pytest.mark.parametrize("round", [1, 2])
def test_every_fresh_encoder_warns_when_its_aux_loss_is_never_collected(round):
    # Run twice in one process: the warning must not depend on what ran before.
    enc = MoEConformerEncoder(**ENC).train()
    xs, ilens = torch.randn(2, 40, 12), torch.tensor([40, 33])
    enc(xs, ilens)
    with pytest.warns(UserWarning, match="'enc_moe_balance' .* is not being trained"):
        enc(xs, ilens)  # the previous forward's records were never collected


def test_recorder_listed_after_module_in_the_bases_is_refused():
    with pytest.raises(TypeError, match="list AuxRecorder before torch.nn.Module"):

        class Wrong(torch.nn.Module, AuxRecorder):
            pass
