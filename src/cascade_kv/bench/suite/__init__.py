"""The evaluation suite (issue 4): ``cascade bench <experiment>``, every system side by side in one run.

Each experiment is a module with ``run(Run) -> Result`` and its ``DEFAULT_SYSTEMS``; :data:`EXPERIMENTS`
lists them. Systems are the adapters of :mod:`cascade_kv.bench.peers`.
"""
from __future__ import annotations

import importlib

EXPERIMENTS = {
    "hot-prefix": "hot_prefix",
    "cold": "cold",
    "models": "models",
}
"""Experiment name on the command line -> module of this package."""


def experiment(name: str):  # noqa: ANN201 - a module
    return importlib.import_module(f".{EXPERIMENTS[name]}", __name__)
