"""The start-up hook: extend ESPnet task modules right after they are imported.

``espnet_ext.pth`` (Python <= 3.14) and ``espnet_ext.start`` (PEP 829, Python >= 3.15)
call :func:`install` at interpreter start-up. It puts a finder at the front of
``sys.meta_path`` that wraps the loader of each task module in :data:`HOOKED_TASKS`;
once the task module has executed, its ``*_choices`` objects get our classes
(:func:`espnet_ext.registry.register_into`). Registration therefore happens before
``get_parser()`` freezes argparse ``choices``, in training, stats collection, decoding
and in DDP workers started with ``spawn`` (fresh interpreters run the same hook, unless
they start with ``-S``: see :mod:`espnet_ext.bin.run`).

Why a post-import hook rather than importing ESPnet here: every Python process of the
environment runs this at start-up, and most never touch ESPnet. So start-up reads
the opt-out variable first and, until an ESPnet task module is imported, this module
uses nothing but ``sys`` and ``os`` (both already loaded by ``site``): no
``importlib.abc`` base classes (they pull in ``importlib.resources``, ``pathlib``,
``tempfile``, ``re``, ``typing``), no ``threading``, not even our own registry.
``python -m espnet_ext.bench startup`` measures the cost.
"""

import os
import sys

OPT_OUT_ENV = "ESPNET_EXT_DISABLE"

# The ESPnet task modules the hook watches. espnet_ext.registry checks that each of
# its rows names one of these (it cannot be imported from here: start-up would pay
# for ``typing`` and ``importlib``).
HOOKED_TASKS = frozenset({"espnet2.tasks.asr", "espnet2.tasks.st"})


def opted_out() -> bool:
    """True when ``ESPNET_EXT_DISABLE`` is set to a true-ish value."""
    value = os.environ.get(OPT_OUT_ENV, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


class _RegisteringLoader:
    """Wraps a task module's loader; registers our classes after it executed.

    A plain class: the import system only calls ``create_module``/``exec_module``
    (``importlib.abc.Loader`` would add nothing but start-up imports).
    """

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        _register_module(module)

    def __getattr__(self, name):
        # get_source, get_filename, is_package, ... behave as the real loader's.
        return getattr(self._inner, name)


class _PostImportFinder:
    """Finds task modules through the other finders and wraps their loader.

    A plain class with ``find_spec``: all ``sys.meta_path`` asks of a finder.
    """

    def __init__(self):
        self._resolving = set()

    def find_spec(self, fullname, path, target=None):
        if fullname not in HOOKED_TASKS or fullname in self._resolving:
            return None
        self._resolving.add(fullname)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._resolving.discard(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


_finder = None


def _register_module(module) -> None:
    from espnet_ext.registry import register_into

    try:
        register_into(module)
    except Exception as e:  # re-raised with the way out in the message
        raise RuntimeError(
            f"espnet_ext could not register its classes into {module.__name__}: {e}. "
            f"Set {OPT_OUT_ENV}=1 to run ESPnet without espnet_ext."
        ) from e


def install(force: bool = False) -> bool:
    """Install the post-import hook and register into already-imported task modules.

    Safe to call again (and from several threads): a second call finds the finder
    installed, and registering twice is a no-op, so no lock is needed (a lock would
    cost ``threading`` at every interpreter start).

    Args:
        force: ignore the opt-out variable (explicit :func:`espnet_ext.register`).

    Returns:
        True if the hook is active after the call.
    """
    global _finder
    if not force and opted_out():
        return False
    if _finder is None:
        _finder = _PostImportFinder()
        sys.meta_path.insert(0, _finder)
    for name in sorted(HOOKED_TASKS):
        module = sys.modules.get(name)
        # A module still executing (partially initialised) is handled by the
        # loader wrapper when it finishes; only complete modules are done here.
        if module is not None and not _initialising(module):
            _register_module(module)
    return True


def _initialising(module) -> bool:
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))
