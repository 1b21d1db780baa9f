"""The evaluation suite (issue 4): ``cascade bench <experiment>``, every system side by side in one run.

Each experiment is a module with ``run(Run) -> Result`` and its ``DEFAULT_SYSTEMS``; :data:`EXPERIMENTS`
lists them. Systems are the adapters of :mod:`cascade_kv.bench.peers`.
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace

EXPERIMENTS = {
    "store": "store",
    "hot-prefix": "hot_prefix",
    "cold": "cold",
    "models": "models",
    "trace": "trace_replay",
    "contention": "contention",
    "strong": "scaling:run_strong",
    "weak": "scaling:run_weak",
    "rma": "rma",
    "serve": "serve",
    "engine": "engine",
}
"""Experiment name on the command line -> module of this package (``module:function`` where one module
holds several experiments; the function then stands for ``run``)."""


def experiment(name: str) -> SimpleNamespace:
    """The experiment's ``run``, ``DEFAULT_SYSTEMS``, ``VARIANTS`` (extra system names it accepts), and where it
    has them ``problem`` (what is wrong with a run's options and rank count, before anything starts) and ``render_more``
    (tables of its own after the common ones)."""
    module_name, _, function = EXPERIMENTS[name].partition(":")
    module = importlib.import_module(f".{module_name}", __name__)
    return SimpleNamespace(run=getattr(module, function or "run"), DEFAULT_SYSTEMS=module.DEFAULT_SYSTEMS,
                           VARIANTS=getattr(module, "VARIANTS", {}), problem=getattr(module, "problem", None),
                           render_more=getattr(module, "render_more", None))
