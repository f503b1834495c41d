"""``python -m espnet_ext.bench <name> [options]``: run one benchmark."""

import sys


def main() -> None:
    names = {
        "moe": "espnet_ext.bench.moe",
        "startup": "espnet_ext.bench.startup",
        "residual": "espnet_ext.bench.residual",
        "saml": "espnet_ext.bench.saml",
        "streaming": "espnet_ext.bench.streaming",
        "shared_moe": "espnet_ext.bench.shared_moe",
        "i3d": "espnet_ext.bench.i3d",
        "long_input": "espnet_ext.bench.long_input",
    }
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        sys.exit(f"usage: python -m espnet_ext.bench {{{','.join(names)}}} [options]")
    import importlib

    importlib.import_module(names[sys.argv[1]]).main(sys.argv[2:])


if __name__ == "__main__":
    main()
