"""Our classes reach ESPnet's class choices in every process, without being imported."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, run_python

from espnet_ext import registry

# Prints the keys of every choices object our table extends, importing only ESPnet:
# what the task modules hold then comes from the start-up hook alone.
CHECK = f"""
import importlib, json
names = {sorted(registry.describe())!r}
print(json.dumps({{
    name: sorted(getattr(importlib.import_module(name.rsplit(".", 1)[0]),
                         name.rsplit(".", 1)[1]).classes)
    for name in names
}}))
"""


def _last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fresh_process_has_every_row_of_the_table():
    # encoders, decoders and the model, ASR and ST, without importing espnet_ext
    out = _last_json(run_python(CHECK))
    for name, keys in registry.describe().items():
        assert set(keys) <= set(out[name]), name
    assert "moe_transformer" in out["espnet2.tasks.asr.decoder_choices"]


def test_spawned_worker_registers_too():
    code = """
import multiprocessing as mp
def child(q):
    import espnet2.tasks.asr as a
    q.put("moe_conformer" in a.encoder_choices.classes)
if __name__ == "__main__":
    ctx = mp.get_context("spawn"); q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,)); p.start()
    print(q.get(timeout=120)); p.join()
"""
    # a spawned DDP worker is a fresh interpreter: the start-up hook must run there
    assert run_python(code).stdout.strip().splitlines()[-1] == "True"


def test_opt_out_variable_disables_and_register_is_explicit_and_idempotent():
    code = CHECK + """
import espnet_ext, espnet2.tasks.asr as asr
espnet_ext.register(); espnet_ext.register()
print(json.dumps(sorted(asr.encoder_choices.classes).count("moe_conformer")))
"""
    lines = run_python(code, {"ESPNET_EXT_DISABLE": "1"}).stdout.strip().splitlines()
    before, after = json.loads(lines[-2]), json.loads(lines[-1])
    assert "moe_conformer" not in before["espnet2.tasks.asr.encoder_choices"]
    assert "espnet_ext" not in before["espnet2.tasks.asr.model_choices"]
    assert after == 1


def test_interpreter_startup_imports_neither_torch_nor_espnet():
    out = run_python(
        "import sys; "
        "print([m for m in ('torch', 'espnet2', 'espnet') if m in sys.modules])"
    )
    assert out.stdout.strip() == "[]"


def test_start_up_hook_imports_nothing_but_our_two_modules(tmp_path):
    """The .pth line, run the way site runs it, adds only espnet_ext + the hook."""
    import shutil

    from espnet_ext.bench.startup import PTH_LINE

    shutil.copytree(
        REPO / "espnet_ext",
        tmp_path / "espnet_ext",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (tmp_path / "espnet_ext.pth").write_text(PTH_LINE)
    code = (
        "import sys, site; before = set(sys.modules); "
        f"site.addsitedir({str(tmp_path)!r}); "
        "print(sorted(set(sys.modules) - before)); "
        "print(any(type(f).__name__ == '_PostImportFinder' for f in sys.meta_path))"
    )
    env = {k: v for k, v in os.environ.items() if k != "ESPNET_EXT_DISABLE"}
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    imported, hooked = proc.stdout.split("\n")[:2]
    assert imported == "['espnet_ext', 'espnet_ext._autoregister']"
    assert hooked == "True"


def test_start_up_hook_is_installed_in_this_environment():
    assert any(type(f).__name__ == "_PostImportFinder" for f in sys.meta_path)


def test_unknown_name_error_lists_ours_and_suggests():
    import espnet2.tasks.asr as asr

    with pytest.raises(ValueError) as err:
        asr.encoder_choices.get_class("moe_conformr")
    provided = re.search(r"espnet_ext provides --encoder: ([^.]*)\.", str(err.value))
    assert provided, str(err.value)
    assert "moe_conformer" in provided.group(1).split(", ")
    assert re.search(r"Did you mean: moe_conformer\b", str(err.value))


def test_table_is_valid():
    registry.validate_table()


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            registry.Entry("espnet2.tasks.asr", "encoder_choices", "MoE", "a:B"),
            "lower case",
        ),
        (
            registry.Entry("espnet2.tasks.asr", "encoder_choices", "none", "a:B"),
            "reserved",
        ),
        (registry.Entry("espnet2.tasks.asr", "encoder", "x", "a:B"), "_choices"),
        (
            registry.Entry("espnet2.tasks.enh", "encoder_choices", "x", "a:B"),
            "does not watch",
        ),
        (
            registry.Entry("espnet2.tasks.asr", "encoder_choices", "x", "a.B"),
            "module:Class",
        ),
    ],
)
def test_table_validation_rejects_bad_rows(entry, message):
    with pytest.raises(ValueError, match=message):
        registry.validate_table((entry,))


def test_table_validation_rejects_duplicates():
    row = registry.ENTRIES[0]
    with pytest.raises(ValueError, match="registered twice"):
        registry.validate_table((row, row))


class _FakeChoices:
    name = "encoder"

    def __init__(self, classes, base_type=None):
        self.classes = dict(classes)
        self.base_type = base_type

    def get_class(self, name):
        return self.classes[name]


def _fake_task(monkeypatch, choices, entries):
    import types

    module = types.ModuleType("fake_task")
    module.encoder_choices = choices
    monkeypatch.setattr(registry, "ENTRIES", tuple(entries))
    return module


def test_clash_with_espnet_name_is_refused(monkeypatch):
    module = _fake_task(
        monkeypatch,
        _FakeChoices({"conformer": int}),
        [registry.Entry("fake_task", "encoder_choices", "conformer", "builtins:str")],
    )
    with pytest.raises(ValueError, match="already has 'conformer'"):
        registry.register_into(module)


def test_wrong_base_class_is_refused(monkeypatch):
    module = _fake_task(
        monkeypatch,
        _FakeChoices({}, base_type=int),
        [registry.Entry("fake_task", "encoder_choices", "mine", "builtins:str")],
    )
    with pytest.raises(ValueError, match="must subclass builtins.int"):
        registry.register_into(module)


def test_model_class_must_be_an_espnet_asr_model():
    from espnet2.asr.espnet_model import ESPnetASRModel

    cls = registry.load_class(registry._EXT_ASR_MODEL)
    assert issubclass(cls, ESPnetASRModel)
