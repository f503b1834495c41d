"""espnet_ext: parameter-efficient ASR architectures for ESPnet, as a plugin.

Besides the package, an install puts two start-up files into site-packages, so our
classes are registered in every Python process that imports an ESPnet task:
``espnet_ext.pth`` (an ``import`` line, Python <= 3.14) and ``espnet_ext.start``
(a PEP 829 entry point; from Python 3.15 it replaces the ``.pth`` import line).
Both ``pip install .`` and ``pip install -e .`` must ship them: regular wheels get them
through ``build_py``; editable wheels through the editable strategy below, because
setuptools maps only packages into an editable install.
"""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

STARTUP_FILES = {
    "espnet_ext.pth": "import espnet_ext._autoregister as _m; _m.install()\n",
    "espnet_ext.start": "espnet_ext._autoregister:install\n",
}


class BuildPyWithStartupFiles(build_py):
    """Regular installs: put the start-up files at the root of the wheel."""

    def run(self):
        super().run()
        for name, text in STARTUP_FILES.items():
            with open(os.path.join(self.build_lib, name), "w", encoding="utf-8") as f:
                f.write(text)

    def get_outputs(self, include_bytecode=1):
        extra = [os.path.join(self.build_lib, name) for name in STARTUP_FILES]
        return super().get_outputs(include_bytecode) + extra


class _StrategyWithStartupFiles:
    """Wraps setuptools' editable strategy and also writes the start-up files.

    ``editable_wheel._select_strategy`` is private API; pyproject.toml pins the
    build-time setuptools range in which it was tested, and tests/test_packaging.py
    builds an editable wheel and checks its contents.
    """

    def __init__(self, inner):
        self._inner = inner

    def __call__(self, wheel, files, mapping):
        self._inner(wheel, files, mapping)
        for name, text in STARTUP_FILES.items():
            wheel.writestr(name, text.encode("utf-8"))

    def __enter__(self):
        self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)


class EditableWheelWithStartupFiles(editable_wheel):
    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithStartupFiles(super()._select_strategy(*args, **kwargs))


setup(
    name="espnet_ext",
    version="0.1.0",
    description=(
        "ESPnet plugin: MoE conformer (U2++ MoE), shared-expert conformer, LoRA-expert "
        "models (SAML), dynamic-depth (I3D) and residual-shared encoders"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Multimedia :: Sound/Audio :: Speech",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.9",
    packages=find_packages(include=["espnet_ext", "espnet_ext.*"]),
    install_requires=[
        # Tested: torch 2.11.0, torchaudio 2.11.0, espnet 202511 (constraints.txt).
        # The registration relies on ClassChoices dicts in espnet2.tasks.*, stable
        # across these releases.
        "torch>=2.1,<3",
        "torchaudio>=2.1,<3",  # espnet2.tasks.asr imports it
        "espnet[train]>=202402",
        "typeguard>=4",
    ],
    extras_require={
        # wheel: tests/test_packaging.py runs the PEP 517 build hooks without isolation
        # torchao: NF4 weights of SAML's quantised base (tests check them);
        # openai-whisper: the SAML adapter test builds a random-weight Whisper;
        # pytest-xdist: the suite runs on two worker processes (pyproject.toml).
        "test": [
            "pytest>=7",
            "pytest-xdist>=3",
            "wheel",
            "torchao>=0.18",
            "openai-whisper>=20240930",
        ],
        # SAML (adapter: saml, quantize: nf4): torchao's NF4 tensor, which moved
        # between releases (constraints.txt pins the tested one).
        "saml": ["torchao>=0.18"],
        # ESPnet's asr.sh stage 3 (format_wav_scp.py) needs resampy; espnet does not
        # install it.
        "recipe": ["resampy>=0.4"],
        # python -m espnet_ext.bench moe adds Hugging Face's Mixtral block as a
        # baseline.
        "bench": ["transformers>=4.36"],
        # ESPnet's formatters and linters (.pre-commit-config.yaml, setup.cfg); .ci/run
        # runs them before the tests. constraints.txt pins the tested versions.
        "lint": [
            "black>=24",
            "isort>=5.12",
            "flake8>=7",
            "pre-commit>=3",
            "pre-commit-hooks>=4",
        ],
    },
    cmdclass={
        "build_py": BuildPyWithStartupFiles,
        "editable_wheel": EditableWheelWithStartupFiles,
    },
)
