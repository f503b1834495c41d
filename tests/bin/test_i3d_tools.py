"""The I3D tools on real speech, through ESPnet's own model building: gate dumps and
plot (i3d_gates), a decode-time threshold through asr_inference's Speech2Text, and
static pruning of a vanilla model (i3d_prune)."""

import json

from conftest import REPO, run_python

TINY_CONFORMER = """
encoder: conformer
encoder_conf: {output_size: 16, attention_heads: 2, linear_units: 24, num_blocks: 3,
    cnn_module_kernel: 5, macaron_style: true, rel_pos_type: latest}
decoder: transformer
decoder_conf: {attention_heads: 2, linear_units: 24, num_blocks: 1}
frontend_conf: {n_fft: 512, hop_length: 160, n_mels: 20}
"""


def test_gate_dump_threshold_config_and_pruning_on_real_speech(speechocean, tmp_path):
    tokens = tmp_path / "tokens.txt"
    chars = sorted(set((speechocean / "dev" / "text").read_text()) - {" ", "\n"})
    tokens.write_text("\n".join(["<blank>", "<unk>", "<space>", *chars, "<sos/eos>"]))
    data = tmp_path / "dev"
    data.mkdir()
    for name in ("wav.scp", "text"):
        lines = (speechocean / "dev" / name).read_text().splitlines()[:3]
        (data / name).write_text("\n".join(lines) + "\n")
    # wav.scp paths are relative to the corpus root: make them absolute
    wav = [ln.split(" ", 1) for ln in (data / "wav.scp").read_text().splitlines()]
    (data / "wav.scp").write_text("".join(f"{k} {speechocean / p}\n" for k, p in wav))
    plain_conf = tmp_path / "plain.yaml"
    plain_conf.write_text(TINY_CONFORMER)
    code = f"""
import json, logging, io, torch, soundfile
from espnet2.tasks.asr import ASRTask
from espnet2.bin.asr_inference import Speech2Text
from espnet_ext.bin import i3d_gates, i3d_prune

def dry(config, out):
    ASRTask.main(cmd=["--config", config, "--iterator_type", "none", "--dry_run",
                      "true", "--output_dir", out, "--token_list", "{tokens}",
                      "--token_type", "char"])
    model, _ = ASRTask.build_model_from_file(out + "/config.yaml", None, "cpu")
    torch.save(model.state_dict(), out + "/model.pth")
    return out + "/config.yaml", out + "/model.pth"

cfg, pth = dry("{REPO / 'tests/conf/tiny_i3d_conformer.yaml'}", "{tmp_path}/i3d")
summary = i3d_gates.main(["--asr_train_config", cfg, "--asr_model_file", pth,
    "--data_dir", "{data}", "--out_dir", "{tmp_path}/gates",
    "--gate_threshold", "0.6", "--write_config", "{tmp_path}/thr.yaml"])

# decode-time threshold through asr_inference's own class, no retraining
s2t = Speech2Text(asr_train_config="{tmp_path}/thr.yaml", asr_model_file=pth,
                  beam_size=1, maxlenratio=0.3, ctc_weight=0.3)
log = io.StringIO()
handler = logging.StreamHandler(log)
logging.getLogger("espnet_ext").addHandler(handler)
logging.getLogger("espnet_ext").setLevel(logging.INFO)
speech, _ = soundfile.read(open("{data}/wav.scp").read().split()[1], dtype="float32")
s2t(torch.from_numpy(speech))

pcfg, ppth = dry("{plain_conf}", "{tmp_path}/plain")
plog = i3d_prune.main(["--asr_train_config", pcfg, "--asr_model_file", ppth,
    "--data_dir", "{data}", "--keep_blocks", "1", "--out_dir", "{tmp_path}/pruned",
    "--max_utts", "2"])
pruned, _ = ASRTask.build_model_from_file("{tmp_path}/pruned/config.yaml", None, "cpu")
state = torch.load("{tmp_path}/pruned/pruned.pth")
res = pruned.load_state_dict(state, strict=True)
orig = torch.load(ppth)
kept = plog["kept"][0]
same = torch.equal(state["encoder.encoders.0.self_attn.linear_q.weight"],
                   orig[f"encoder.encoders.{{kept}}.self_attn.linear_q.weight"])
print(json.dumps(dict(summary=summary, threshold=s2t.asr_model.encoder.gate_threshold,
    log=log.getvalue(), plog=plog, blocks=len(pruned.encoder.encoders), same=same)))
"""
    out = json.loads(run_python(code, timeout=900).stdout.strip().splitlines()[-1])
    s = out["summary"]
    assert s["utterances"] == 3 and s["gate_threshold"] == 0.6
    assert set(s["executed_per_utterance"]) == {"attn", "ffn", "conv"}
    assert len(s["modules"]) == 8  # 2 blocks x (2 FFNs, attention, convolution)
    rows = (tmp_path / "gates" / "gates.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["utt", "block", "module", "kind", "prob", "open"]
    assert len(rows) == 1 + 3 * 8
    assert (tmp_path / "gates" / "gate_probs.png").read_bytes()[:4] == b"\x89PNG"
    assert out["threshold"] == 0.6
    assert "i3d_conformer: executed modules per utterance" in out["log"]
    assert "threshold 0.6" in out["log"]
    plog = out["plog"]
    assert len(plog["kept"]) == 1 and len(plog["removed"]) == 2
    assert len(plog["steps"]) == 3 and len(plog["steps"][1]["candidates"]) == 3
    assert out["blocks"] == 1 and out["same"] is True
