"""No ``assert`` statement in the package: ``python -O`` strips them, so a check written as one would silently stop
guarding anything. A broken invariant raises :class:`~cascade_kv.errors.InternalError` (or a family error where a
caller or a config can cause it). ``bench/`` is the benchmark harness, not the store, and is not scanned."""
from __future__ import annotations

import ast
from pathlib import Path

import cascade_kv

PACKAGE = Path(cascade_kv.__file__).parent
EXCLUDED = {"bench"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if EXCLUDED.isdisjoint(p.relative_to(PACKAGE).parts[:-1]))


def test_the_scan_sees_the_package():
    names = {p.relative_to(PACKAGE).as_posix() for p in _modules()}
    assert {"store.py", "tiers/allocator.py", "cluster/slots.py", "cluster/directory/state.py"} <= names
    assert not any(n.startswith("bench/") for n in names)


def test_no_assert_statements_outside_bench():
    found = [f"{p.relative_to(PACKAGE)}:{node.lineno}: {ast.get_source_segment(p.read_text(), node)}"
             for p in _modules() for node in ast.walk(ast.parse(p.read_text(), str(p)))
             if isinstance(node, ast.Assert)]
    assert not found, "assert statements vanish under python -O; raise instead:\n" + "\n".join(found)
