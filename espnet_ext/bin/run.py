"""Run a module as ``__main__`` with espnet_ext registered, start-up files or not.

    python -S -m espnet_ext.bin.run espnet2.bin.asr_train --config conf/train.yaml ...

Normally nothing is needed: the start-up hook (``espnet_ext.pth``) registers our
classes in every interpreter, ``spawn`` workers included. Where start-up files do not
run (``python -S``, some embedded interpreters), :func:`espnet_ext.register` registers
in the calling process only, and a ``spawn`` child of a ``-S`` parent is started with
``-S`` too, so ESPnet's DDP workers (``--multiprocessing_distributed true``) would miss
our classes. What a spawned child does run is the parent's ``__main__`` module,
re-imported as ``__mp_main__`` before it unpickles its task. So this runner registers
at import and stays ``__main__`` while it runs the target (``runpy.run_module`` with
``alter_sys=False``): every spawned worker imports it again and registers too.

As a ``--python`` for asr.sh: ``--python "python3 -S -m espnet_ext.bin.run"``.
"""

import runpy
import sys

import espnet_ext

# At import, not in main(): spawned children re-import this module as __mp_main__.
espnet_ext.register()

USAGE = "usage: python -m espnet_ext.bin.run MODULE [ARGS...]"


def main(argv=None) -> None:
    """Run ``MODULE`` as ``__main__`` with ``sys.argv = [MODULE, *ARGS]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-"):
        sys.exit(f"{USAGE}\n(got {argv!r}: the first argument must be a module name)")
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=False)


if __name__ == "__main__":
    main()
