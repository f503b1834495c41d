"""Command-line tools of espnet_ext (``python -m espnet_ext.bin.<tool>``)."""
