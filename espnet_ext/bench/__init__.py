"""Benchmarks that print ratios measured side by side in one run.

``python -m espnet_ext.bench moe`` (see :mod:`espnet_ext.bench.moe`) and
``python -m espnet_ext.bench startup`` (:mod:`espnet_ext.bench.startup`).
"""
