"""A misspelt ``*_conf`` key is an error that names it, for every class we register.

ESPnet passes ``encoder_conf``/``decoder_conf`` as keyword arguments, so the check is
each constructor's: a class that swallowed unknown keys (``**kwargs``) would silently
train a model other than the one the YAML describes.
"""

import pytest

from espnet_ext import registry

TINY = dict(output_size=32, attention_heads=2, linear_units=64, num_blocks=2)
TINY_DEC = dict(attention_heads=2, linear_units=32, num_blocks=1)


def _ours(choices):
    seen = {}
    for e in registry.ENTRIES:
        if e.choices == choices and e.task == "espnet2.tasks.asr":
            seen[e.key] = e.class_path
    return sorted(seen.items())


@pytest.mark.parametrize("key, path", _ours("encoder_choices"))
def test_encoder_refuses_a_misspelt_key(key, path):
    cls = registry.load_class(path)
    cls(20, **TINY)  # the tiny arguments themselves are fine
    with pytest.raises((TypeError, ValueError), match="num_expertz"):
        cls(20, **TINY, num_expertz=2)


@pytest.mark.parametrize("key, path", _ours("decoder_choices"))
def test_decoder_refuses_a_misspelt_key(key, path):
    cls = registry.load_class(path)
    cls(10, 32, **TINY_DEC)
    with pytest.raises((TypeError, ValueError), match="num_expertz"):
        cls(10, 32, **TINY_DEC, num_expertz=2)


def _with_top_k(choices):
    import inspect

    return [
        (key, path)
        for key, path in _ours(choices)
        if "top_k" in inspect.signature(registry.load_class(path)).parameters
    ]


@pytest.mark.parametrize("key, path", _with_top_k("encoder_choices"))
def test_encoder_refuses_top_k_above_num_experts(key, path):
    with pytest.raises(
        ValueError, match=r"top_k must be in \[1, num_experts=2\], got 3"
    ):
        registry.load_class(path)(20, **TINY, num_experts=2, top_k=3)


@pytest.mark.parametrize("key, path", _with_top_k("decoder_choices"))
def test_decoder_refuses_top_k_above_num_experts(key, path):
    with pytest.raises(
        ValueError, match=r"top_k must be in \[1, num_experts=2\], got 3"
    ):
        registry.load_class(path)(10, 32, **TINY_DEC, num_experts=2, top_k=3)
