"""espnet_ext: parameter-efficient ASR architectures for ESPnet, as a plugin.

Installing the package adds a start-up hook (``espnet_ext.pth`` / ``espnet_ext.start``)
that registers our encoder, decoder and model classes into ESPnet's class choices the
moment an ESPnet task module (``espnet2.tasks.asr``, ``espnet2.tasks.st``) is imported,
in every Python process. Nothing heavy is imported at start-up: this module imports
only the standard library.

Set ``ESPNET_EXT_DISABLE=1`` to run ESPnet without our classes. Call
:func:`register` explicitly where start-up hooks do not run (``python -S``, some
notebook kernels); it is idempotent and covers the calling process only. For
``spawn`` workers of such a process, run the entry point through
``python -S -m espnet_ext.bin.run MODULE ...`` (:mod:`espnet_ext.bin.run`).
"""

__version__ = "0.1.0"

__all__ = ["register", "__version__"]


def register() -> None:
    """Register espnet_ext's classes into ESPnet's task modules (idempotent).

    Task modules already imported are extended now; the others are extended when
    they are imported, in this process (processes started with ``spawn`` are fresh
    interpreters: see :mod:`espnet_ext.bin.run`). Unlike the automatic start-up hook,
    an explicit call ignores ``ESPNET_EXT_DISABLE``: asking for it by name is an
    opt-in.
    """
    from espnet_ext import _autoregister

    _autoregister.install(force=True)
