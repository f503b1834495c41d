"""Every training YAML we ship passes ESPnet's own dry run, in a fresh interpreter.

The same check ESPnet's CI runs on recipe configs:
``asr_train --config F --iterator_type none --dry_run true --output_dir out
--token_list dummy_token_list`` (here, one interpreter loops over all files).
Speech-translation configs (``train_st*.yaml``) go through ``st_train`` instead, which
also needs ``--src_token_list``, and language-model configs (``train_lm*.yaml``)
through ``lm_train``.
"""

import json

from conftest import REPO, run_python


def training_configs():
    files = (
        sorted(REPO.glob("conf/**/train*.yaml"))
        + sorted(REPO.glob("egs2/*/asr1/conf/**/train*.yaml"))
        + sorted(REPO.glob("tests/conf/tiny*.yaml"))
    )
    return [f for f in files if not f.is_symlink() or f.resolve().exists()]


def test_every_training_yaml_passes_espnet_dry_run(tmp_path):
    configs = training_configs()
    assert configs, "no training YAML found"
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("\n".join(["<blank>", "<unk>", "a", "b", "<sos/eos>"]) + "\n")
    code = f"""
import json, os, traceback
from espnet2.tasks.asr import ASRTask
from espnet2.tasks.lm import LMTask
from espnet2.tasks.st import STTask
failures = {{}}
for i, f in enumerate({json.dumps([str(c) for c in configs])}):
    name = os.path.basename(f)
    st = name.startswith("train_st")
    task = STTask if st else LMTask if name.startswith("train_lm") else ASRTask
    extra = ["--src_token_list", "{tokens}"] if st else []
    try:
        task.main(
            cmd=["--config", f, "--iterator_type", "none", "--dry_run", "true",
                 "--output_dir", "{tmp_path}/out%d" % i, "--token_list", "{tokens}",
                 *extra])
    except BaseException:
        failures[f] = traceback.format_exc()[-1500:]
print(json.dumps(failures))
"""
    failures = json.loads(run_python(code, timeout=600).stdout.strip().splitlines()[-1])
    assert failures == {}, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
