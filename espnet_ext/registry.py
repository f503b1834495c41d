"""The one table of what espnet_ext adds to ESPnet, and the code that adds it.

Each row says: in ESPnet task module ``task``, add ``key`` to the ``ClassChoices``
object named ``choices``, pointing at ``class_path`` (``"module:Class"``). ESPnet
202511 has no plugin mechanism; adding lower-case keys to those dicts is the only way
in, and it bypasses ``ClassChoices``' own base-class check, so :func:`register_into`
does that check itself.

This module imports only the standard library at import time: it is read at
interpreter start-up. Our classes are imported only when a task module is.
"""

import importlib
from typing import Dict, List, NamedTuple, Tuple

from espnet_ext._autoregister import HOOKED_TASKS

__all__ = [
    "Entry",
    "ENTRIES",
    "TASK_MODULES",
    "validate_table",
    "entries_for",
    "register_into",
    "load_class",
]

_ASR = "espnet2.tasks.asr"
_ST = "espnet2.tasks.st"

_MOE_CONFORMER = "espnet_ext.encoders.moe_conformer:MoEConformerEncoder"
_MOE_TRANSFORMER = "espnet_ext.decoders.moe_transformer:MoETransformerDecoder"
_EXT_ASR_MODEL = "espnet_ext.models.asr_model:ESPnetExtASRModel"
_RESIDUAL_CONFORMER = "espnet_ext.encoders.residual_conformer:ResidualConformerEncoder"
_RESIDUAL_TRANSFORMER = (
    "espnet_ext.encoders.residual_transformer:ResidualTransformerEncoder"
)
_SHARED_MOE_CONFORMER = (
    "espnet_ext.encoders.shared_moe_conformer:SharedMoEConformerEncoder"
)
_U2_CONFORMER = "espnet_ext.encoders.u2_conformer:U2ConformerEncoder"
_BITRANSFORMER = "espnet_ext.decoders.bitransformer:BiTransformerDecoder"
_MOE_BITRANSFORMER = "espnet_ext.decoders.moe_bitransformer:MoEBiTransformerDecoder"

_SAML_CONFORMER = "espnet_ext.encoders.saml_conformer:SAMLConformerEncoder"
_SAML_TRANSFORMER = "espnet_ext.decoders.saml_transformer:SAMLTransformerDecoder"
_SAML_ADAPTER_INSTALL = "espnet_ext.adapters.saml:install_into_espnet"
_I3D_CONFORMER = "espnet_ext.encoders.i3d_conformer:I3DConformerEncoder"
_I3D_TRANSFORMER = "espnet_ext.encoders.i3d_transformer:I3DTransformerEncoder"


class Entry(NamedTuple):
    task: str  # ESPnet task module, e.g. "espnet2.tasks.asr"
    choices: str  # module-level ClassChoices name, e.g. "encoder_choices"
    key: str  # the YAML value, e.g. "moe_conformer"
    class_path: str  # "package.module:ClassName"


# Grouped by architecture. Speech translation takes our encoders and decoders (its
# contracts are the ASR ones); our model class is an ESPnetASRModel, so it is ASR only.
ENTRIES: Tuple[Entry, ...] = (
    Entry(_ASR, "encoder_choices", "moe_conformer", _MOE_CONFORMER),
    Entry(_ST, "encoder_choices", "moe_conformer", _MOE_CONFORMER),
    Entry(_ASR, "decoder_choices", "moe_transformer", _MOE_TRANSFORMER),
    Entry(_ST, "decoder_choices", "moe_transformer", _MOE_TRANSFORMER),
    Entry(_ASR, "model_choices", "espnet_ext", _EXT_ASR_MODEL),
    # ResidualTransformer (arXiv 2310.02489): residual-shared encoders, ASR and ST
    Entry(_ASR, "encoder_choices", "residual_conformer", _RESIDUAL_CONFORMER),
    Entry(_ST, "encoder_choices", "residual_conformer", _RESIDUAL_CONFORMER),
    Entry(_ASR, "encoder_choices", "residual_transformer", _RESIDUAL_TRANSFORMER),
    Entry(_ST, "encoder_choices", "residual_transformer", _RESIDUAL_TRANSFORMER),
    # Shared sparsely-gated experts (arXiv 2209.08326): grouped MoE conformer, ASR and
    # ST (its distillation is a feature of model: espnet_ext, ASR only)
    Entry(_ASR, "encoder_choices", "shared_moe_conformer", _SHARED_MOE_CONFORMER),
    Entry(_ST, "encoder_choices", "shared_moe_conformer", _SHARED_MOE_CONFORMER),
    # I3D (arXiv 2303.07624): input-dependent dynamic depth, ASR and ST (the depth
    # cost needs model: espnet_ext, ASR only; ST trains the gates without it)
    Entry(_ASR, "encoder_choices", "i3d_conformer", _I3D_CONFORMER),
    Entry(_ST, "encoder_choices", "i3d_conformer", _I3D_CONFORMER),
    Entry(_ASR, "encoder_choices", "i3d_transformer", _I3D_TRANSFORMER),
    Entry(_ST, "encoder_choices", "i3d_transformer", _I3D_TRANSFORMER),
    # U2++ (arXiv 2106.05642, 2404.16407): chunk-trained conformer
    Entry(_ASR, "encoder_choices", "u2_conformer", _U2_CONFORMER),
    Entry(_ST, "encoder_choices", "u2_conformer", _U2_CONFORMER),
    # U2++ bidirectional decoders: ASR only (the right-to-left loss lives in
    # model: espnet_ext; ST's decoders see only left to right)
    Entry(_ASR, "decoder_choices", "bitransformer", _BITRANSFORMER),
    Entry(_ASR, "decoder_choices", "moe_bitransformer", _MOE_BITRANSFORMER),
)

# SAML (arXiv 2406.19706): mixtures of LoRA experts on the attention projections, ASR
# and ST (the adapter form, ``adapter: saml``, is in POST_REGISTER below)
ENTRIES += (
    Entry(_ASR, "encoder_choices", "saml_conformer", _SAML_CONFORMER),
    Entry(_ST, "encoder_choices", "saml_conformer", _SAML_CONFORMER),
    Entry(_ASR, "decoder_choices", "saml_transformer", _SAML_TRANSFORMER),
    Entry(_ST, "decoder_choices", "saml_transformer", _SAML_TRANSFORMER),
)

TASK_MODULES = frozenset(e.task for e in ENTRIES)

# What each choices object must hold beyond ClassChoices' own type_check: ESPnet's
# ASRTask.build_model is @typechecked to return an ESPnetASRModel.
_REQUIRED_BASE = {
    (_ASR, "model_choices"): "espnet2.asr.espnet_model:ESPnetASRModel",
}


def load_class(path: str) -> type:
    """Import ``"module:Class"`` and return the class."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"class path {path!r} must look like 'package.module:Class'")
    return getattr(importlib.import_module(module_name), attr)


def validate_table(entries: Tuple[Entry, ...] = ENTRIES) -> None:
    """Check the table's own consistency (no imports).

    Lower-case keys, no duplicates, none of ESPnet's reserved names, and only task
    modules the start-up hook watches (``_autoregister.HOOKED_TASKS``).

    Raises:
        ValueError: naming the offending row.
    """
    seen = set()
    for e in entries:
        where = f"{e.task}.{e.choices}[{e.key!r}]"
        if e.key != e.key.lower() or not e.key.strip():
            raise ValueError(f"{where}: keys must be non-empty lower case")
        if e.key in ("none", "nil", "null"):
            raise ValueError(
                f"{where}: 'none', 'nil' and 'null' are reserved by ESPnet"
            )
        if not e.choices.endswith("_choices"):
            raise ValueError(f"{where}: choices name must end with '_choices'")
        if ":" not in e.class_path:
            raise ValueError(f"{where}: class path must be 'module:Class'")
        if e.task not in HOOKED_TASKS:
            raise ValueError(
                f"{where}: the start-up hook does not watch {e.task}; add it to "
                f"espnet_ext._autoregister.HOOKED_TASKS"
            )
        if (e.task, e.choices, e.key) in seen:
            raise ValueError(f"{where}: registered twice")
        seen.add((e.task, e.choices, e.key))


def entries_for(task: str) -> List[Entry]:
    return [e for e in ENTRIES if e.task == task]


def our_keys(task: str, choices: str) -> List[str]:
    return sorted(e.key for e in ENTRIES if e.task == task and e.choices == choices)


def register_into(module) -> None:
    """Add our classes to the ``*_choices`` objects of an imported task module.

    Idempotent. Raises ``ValueError`` on a key clash with ESPnet's own classes, a
    missing choices object, or a class that is not of the required base type.
    """
    validate_table()
    task = module.__name__
    for e in entries_for(task):
        choices = getattr(module, e.choices, None)
        if choices is None or not hasattr(choices, "classes"):
            raise ValueError(f"{task} has no ClassChoices named {e.choices!r}")
        cls = load_class(e.class_path)
        existing = choices.classes.get(e.key)
        if existing is not None and existing is not cls:
            raise ValueError(
                f"{task}.{e.choices} already has {e.key!r} -> "
                f"{existing.__module__}.{existing.__qualname__}; espnet_ext will not "
                f"replace ESPnet's own classes"
            )
        for base in _required_bases(task, e.choices, choices):
            if not issubclass(cls, base):
                raise ValueError(
                    f"{e.class_path} must subclass "
                    f"{base.__module__}.{base.__qualname__} to be registered as "
                    f"{task}.{e.choices}[{e.key!r}]"
                )
        choices.classes[e.key] = cls
        _install_hint(choices, task, e.choices)
    _run_post_register(task, module)


# Extensions of ESPnet entry points beyond the choices tables, run once a task module
# is registered: "task" -> "module:function(task_module)". They must leave ESPnet's
# behaviour unchanged unless one of our options is used.
POST_REGISTER: Dict[str, Tuple[str, ...]] = {
    # U2++ decoding modes and chunk settings for espnet2.bin.asr_inference
    _ASR: ("espnet_ext.decoding.inference_hook:install",),
}
# SAML: ``adapter: saml`` in ESPnet's hard-coded --adapter choices and adapter table
for _task in (_ASR, _ST):
    POST_REGISTER[_task] = POST_REGISTER.get(_task, ()) + (_SAML_ADAPTER_INSTALL,)


def _run_post_register(task: str, module) -> None:
    import logging

    for path in POST_REGISTER.get(task, ()):
        try:
            load_class(path)(module)
        except Exception as e:  # an optional extension must never block ESPnet
            logging.getLogger("espnet_ext").warning(
                f"espnet_ext: {path} could not be installed ({e!r}); its options "
                f"are unavailable, ESPnet itself is unaffected"
            )


def _required_bases(task: str, choices_name: str, choices) -> List[type]:
    bases = []
    if getattr(choices, "base_type", None) is not None:
        bases.append(choices.base_type)
    extra = _REQUIRED_BASE.get((task, choices_name))
    if extra is not None:
        bases.append(load_class(extra))
    return bases


def _install_hint(choices, task: str, choices_name: str) -> None:
    """Make an unknown name's error list espnet_ext's keys and the closest matches.

    ESPnet's own message lists every key in one tuple; a typo'd plugin name is easier
    to spot with ours apart and a suggestion. Only this instance is changed.
    """
    if getattr(choices, "_espnet_ext_hint", False):
        return
    original = choices.get_class

    def get_class(name):
        import difflib

        try:
            return original(name)
        except ValueError as e:
            ours = our_keys(task, choices_name)
            close = difflib.get_close_matches(
                str(name).lower(), list(choices.classes), n=3, cutoff=0.6
            )
            hint = f" espnet_ext provides --{choices.name}: {', '.join(ours)}."
            if close:
                hint += f" Did you mean: {', '.join(close)}?"
            raise ValueError(f"{e}.{hint}") from None

    choices.get_class = get_class
    choices._espnet_ext_hint = True


def describe() -> Dict[str, List[str]]:
    """``{"espnet2.tasks.asr.encoder_choices": ["moe_conformer", ...], ...}``."""
    out: Dict[str, List[str]] = {}
    for e in ENTRIES:
        out.setdefault(f"{e.task}.{e.choices}", []).append(e.key)
    return out
