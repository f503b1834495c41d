"""Installed but unused, espnet_ext changes nothing ESPnet computes.

Our start-up hook adds choices to ESPnet's tables and, after registration, wraps parts
of ESPnet's inference entry point (the decode-YAML keys of U2++) and its adapter table
(``adapter: saml``). A user who selects none of our classes must get exactly ESPnet's
numbers. The same script (an ESPnet-only dense conformer config: build with ``ASRTask``,
one Adam step, the loss after it, then a beam-search decode through ``Speech2Text`` of
the saved model) runs once with the plugin disabled (``ESPNET_EXT_DISABLE=1``) and once
enabled; every number must be identical.
"""

import json

from conftest import run_python

SCRIPT = r"""
import json, os, tempfile
import torch, yaml
from espnet2.bin.asr_inference import Speech2Text
import espnet2.tasks.asr as asr_task
from espnet2.tasks.asr import ASRTask

tmp = tempfile.mkdtemp()
tokens = ["<blank>", "<unk>", "a", "b", "c", "<space>", "<sos/eos>"]
conf = {
    "token_list": tokens, "input_size": None,
    "frontend_conf": {"n_fft": 512, "hop_length": 160, "n_mels": 40},
    "normalize": "utterance_mvn",
    "encoder": "conformer",
    "encoder_conf": {"output_size": 32, "attention_heads": 2, "linear_units": 64,
                     "num_blocks": 2, "cnn_module_kernel": 7, "macaron_style": True,
                     "use_flash_attn": False},
    "decoder": "transformer",
    "decoder_conf": {"attention_heads": 2, "linear_units": 64, "num_blocks": 1,
                     "use_flash_attn": False},
    "model_conf": {"ctc_weight": 0.3, "lsm_weight": 0.1},
}
with open(os.path.join(tmp, "c.yaml"), "w") as f:
    yaml.safe_dump(conf, f)
args = ASRTask.get_parser().parse_args(["--config", os.path.join(tmp, "c.yaml")])
torch.manual_seed(0)
model = ASRTask.build_model(args)
g = torch.Generator().manual_seed(1)
batch = dict(
    speech=torch.randn(2, 16000, generator=g),
    speech_lengths=torch.tensor([16000, 12000]),
    text=torch.tensor([[2, 3, 5, 4], [4, 2, -1, -1]]),
    text_lengths=torch.tensor([4, 2]),
)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
model.train()
torch.manual_seed(2)
loss = model(**batch)[0]
loss.backward()
opt.step()
model.eval()
with torch.no_grad():
    after = model(**batch)[0].item()
args.token_list = tokens
with open(os.path.join(tmp, "config.yaml"), "w") as f:
    yaml.safe_dump(vars(args), f)
torch.save(model.state_dict(), os.path.join(tmp, "model.pth"))
s2t = Speech2Text(asr_train_config=os.path.join(tmp, "config.yaml"),
                  asr_model_file=os.path.join(tmp, "model.pth"),
                  beam_size=3, ctc_weight=0.3, nbest=2, maxlenratio=0.2)
hyps = s2t(torch.randn(16000, generator=g).numpy())
print(json.dumps({
    "registered": "moe_conformer" in asr_task.encoder_choices.classes,
    "loss": loss.item(), "after": after,
    "hyps": [[h[2], float(h[3].score)] for h in hyps],
}))
"""


def test_a_dense_espnet_config_trains_and_decodes_identically_with_and_without_us():
    off = json.loads(
        run_python(SCRIPT, {"ESPNET_EXT_DISABLE": "1"}).stdout.strip().splitlines()[-1]
    )
    on = json.loads(run_python(SCRIPT).stdout.strip().splitlines()[-1])
    assert off.pop("registered") is False  # really without the plugin
    assert on.pop("registered") is True  # really with it (registered at import)
    assert on == off
