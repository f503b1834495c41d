"""Benchmarks that print ratios measured side by side in one run.

``python -m espnet_ext.bench moe`` (see :mod:`espnet_ext.bench.moe`),
``python -m espnet_ext.bench startup`` (:mod:`espnet_ext.bench.startup`) and
``python -m espnet_ext.bench residual`` (:mod:`espnet_ext.bench.residual`).
"""
