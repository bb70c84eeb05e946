"""Benchmark of the training pipeline against a faithful reimplementation of the 2020 original.

``python -m bench`` (see bench/README.md) runs both side by side in one process and writes ``results.json``
and ``results.md``.
"""
