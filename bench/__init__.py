"""Benchmark of the training pipeline against a faithful reimplementation of the 2020 original.

``python -m bench`` (see bench/README.md) runs both side by side in one process and writes ``results.json``
and ``results.md``.
"""

from covidxray.tfenv import quiet_tensorflow

# The benchmark is a program, not a library: like the command line, it filters TensorFlow's start-up noise, before
# any of its modules imports TensorFlow.
quiet_tensorflow()
