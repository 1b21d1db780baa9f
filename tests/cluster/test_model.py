"""The distributed store against a model (issue 8): random operations from every rank and several threads
per rank, checked against what the operations imply, with global invariants checked by collectives.

Each rank runs ``steps`` random operations from :data:`THREADS` threads, in rounds. Keys come in two kinds:

* **private** keys (``p<rank>.<thread>.<i>``) are written by one thread only, so the model of them is
  exact: after a round every rank reads every private key of the cluster and must see exactly the value
  (or the absence) the owner's model says. A private value is sometimes the very bytes of a shared value,
  so blocks are deduplicated across keys and ranks.
* **shared** keys (``s<i>``) are put, read, deleted and protected by every thread of every rank at once.
  Their bytes are a function of ``(key, version)`` with the pair written into the first bytes, so any
  reader checks any read it makes; a read may miss (another rank deleted the key), never return wrong
  bytes. After a round every rank must see the same shared keys with the same versions.

Arenas are small (a few blocks) and a shared disk tier takes what memory cannot, so nothing is ever
dropped and the model stays exact; evictions, moves to peers, demotions, loads and replicas happen all
the time. After each round, with no operation in flight: the ranks' arenas check their own bookkeeping
(:meth:`~cascade_kv.cluster.arena.Arena.check`), and the directory is checked against every arena and
every key (each listed memory copy is a sealed copy in its owner's arena and every arena copy is listed;
each digest's references and prefix references are the keys bound to it).

Any exception outside the family (:class:`~cascade_kv.errors.CascadeError`), any ``PeerTimeout``, and
any family error the operation cannot explain fails the run. The seed is printed; to reproduce or to run
big (``CASCADE_MODEL_STEPS`` steps per rank, ``CASCADE_MODEL_SEED``)::

    CASCADE_MODEL_STEPS=5000 CASCADE_MODEL_SEED=7 python -m pytest -q tests/cluster/test_model.py
    cascade launch -n 4 python -m mpi4py tests/cluster/test_model.py 5000 7
"""
from __future__ import annotations

import faulthandler
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import zlib
from pathlib import Path

import numpy as np
import pytest

THREADS = 2
PRIVATE_KEYS = 4  # per thread
SHARED_KEYS = 8
VERSIONS = 3  # of each shared value: ranks putting the same version deduplicate
ROUND_STEPS = 25  # per thread between two checks
SIZES = (3072, 8192)  # bytes of a value, by version parity: holes of two sizes fragment the arenas
ARENA_BLOCKS = 4  # arena capacity, in blocks of the larger size
TAG_BYTES = 24  # the value's name, at its start
STORE_TIMEOUT = 20.0


def _steps(default: int) -> int:
    return int(os.environ.get("CASCADE_MODEL_STEPS", default))


def _seed(default: int) -> int:
    return int(os.environ.get("CASCADE_MODEL_SEED", default))


# the arenas' eviction order (policy.ArenaPolicy) changes which copies move, never what a read returns
@pytest.mark.parametrize(("n", "steps", "seed", "order"),
                         [(2, 300, 1, "lru"), (4, 150, 2, "lru"), (2, 150, 3, "reuse")])
def test_random_operations_from_every_rank_agree_with_the_model(n, steps, seed, order, tmp_path):
    from .conftest import run_ranks

    steps, seed = _steps(steps), _seed(seed)
    # the disk tier lies in pytest's tmp_path: a failed run (the job aborted) leaves nothing elsewhere
    out = run_ranks(n, [sys.executable, "-m", "mpi4py", __file__, str(steps), str(seed), str(tmp_path), order],
                    timeout=max(90.0, steps * n / 10))
    for rank in range(n):
        assert f"rank {rank}: ok" in out, out


# ------------------------------------------------------------------ values (no MPI at import)
def _value(tag: str, version: int) -> np.ndarray:
    """The bytes of ``(tag, version)``: its name, then pseudo-random bytes seeded by the name."""
    name = f"{tag}:{version}".encode().ljust(TAG_BYTES, b".")
    n = SIZES[version % 2]
    out = np.random.default_rng(zlib.crc32(name)).integers(0, 256, size=n, dtype=np.uint8)
    out[:TAG_BYTES] = np.frombuffer(name, np.uint8)
    return out


def _named(data: np.ndarray) -> tuple[str, int] | None:
    """The ``(tag, version)`` whose bytes ``data`` holds exactly, or None (wrong bytes)."""
    try:
        tag, _, version = bytes(data[:TAG_BYTES]).rstrip(b".").decode().rpartition(":")
        want = _value(tag, int(version))
    except (UnicodeDecodeError, ValueError):
        return None
    return (tag, int(version)) if want.tobytes() == data.tobytes() else None


def _shared(i: int) -> str:
    return f"s{i}"


# ------------------------------------------------------------------ one thread's random walk
class Walker:
    """One thread's operations and its model of its private keys: key -> ``(tag, version, prefix)``."""

    def __init__(self, store, rank: int, thread: int, seed: int) -> None:
        self.store = store
        self.rng = random.Random(f"{seed}/{rank}/{thread}")
        self.private = [f"p{rank}.{thread}.{i}" for i in range(PRIVATE_KEYS)]
        self.model: dict[str, tuple[str, int, bool]] = {}
        self.failures: list[str] = []
        self.counts: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def _fail(self, op: str, detail: str) -> None:
        self.failures.append(f"{op}: {detail}")

    def _private_value(self, key: str) -> tuple[str, int]:
        if self.rng.random() < 0.4:  # the bytes of a shared value: deduplicated with it
            return _shared(self.rng.randrange(SHARED_KEYS)), self.rng.randrange(VERSIONS)
        return key, self.rng.randrange(VERSIONS)

    def step(self) -> None:
        from cascade_kv.errors import BlockNotFound, CapacityError, CascadeError, PeerTimeout

        ops = (self.put_private, self.put_shared, self.get_private, self.get_shared, self.delete_private,
               self.delete_shared, self.protect_private, self.protect_shared)
        op = self.rng.choices(ops, weights=(5, 4, 4, 4, 2, 2, 2, 1))[0]
        try:
            op()
        except PeerTimeout as e:
            self._fail(op.__name__, f"PeerTimeout: {e}")
        except (BlockNotFound, CapacityError) as e:
            self._fail(op.__name__, f"unexplained {type(e).__name__}: {e}")
        except CascadeError as e:
            self._fail(op.__name__, f"{type(e).__name__}: {e}")
        except Exception as e:  # a raw exception is the bug this test exists for: keep its traceback
            self._fail(op.__name__, f"raw {type(e).__name__}: {e}\n{traceback.format_exc()}")

    # ------------------------------------------------------------- private keys: the model is exact
    def put_private(self) -> None:
        from cascade_kv.errors import CapacityError

        keys = self.rng.sample(self.private, self.rng.randint(1, 3))
        values = [self._private_value(k) for k in keys]
        prefix = self.rng.random() < 0.1 and not any(p for _, _, p in self.model.values())  # one at a time
        try:
            if len(keys) == 1 and self.rng.random() < 0.5:
                self.store.put(keys[0], _value(*values[0]), is_prefix=prefix)
            else:
                self.store.put_many(keys, [_value(*v) for v in values], is_prefix=prefix)
        except CapacityError:
            if not prefix:
                raise
            self._count("capacity")  # all or nothing: the model stays
            return
        for k, v in zip(keys, values):
            self.model[k] = (*v, prefix)
        self._count("put")

    def get_private(self) -> None:
        present = [k for k in self.private if k in self.model]
        if not present:
            return
        keys = self.rng.sample(present, self.rng.randint(1, len(present)))
        got = self.store.get_many(keys) if len(keys) > 1 else [self.store.get(keys[0])]
        for k, data in zip(keys, got):
            want = self.model[k][:2]
            if _named(data) != want:
                self._fail("get_private", f"{k}: read {_named(data)}, model says {want}")
        self._count("get")

    def delete_private(self) -> None:
        from cascade_kv.errors import BlockNotFound

        k = self.rng.choice(self.private)
        if k not in self.model:
            try:
                self.store.delete(k)
            except BlockNotFound:
                return
            self._fail("delete_private", f"{k}: deleted, but the model says it is absent")
            return
        self.store.delete(k)
        del self.model[k]
        self._count("delete")

    def protect_private(self) -> None:
        from cascade_kv.errors import CapacityError

        present = [k for k in self.private if k in self.model]
        if not present:
            return
        k = self.rng.choice(present)
        tag, version, prefix = self.model[k]
        if prefix:
            self.store.unprotect(k)
        elif not any(p for _, _, p in self.model.values()):
            try:
                self.store.protect(k)
            except CapacityError:
                self._count("capacity")
                return
        else:
            return
        self.model[k] = (tag, version, not prefix)
        self._count("protect")

    # ------------------------------------------------------------- shared keys: any version, or a miss
    def put_shared(self) -> None:
        idx = self.rng.sample(range(SHARED_KEYS), self.rng.randint(1, 3))
        self.store.put_many([_shared(i) for i in idx], [_value(_shared(i), self.rng.randrange(VERSIONS)) for i in idx])
        self._count("put")

    def get_shared(self) -> None:
        from cascade_kv.errors import BlockNotFound

        k = _shared(self.rng.randrange(SHARED_KEYS))
        try:
            data = self.store.get(k)
        except BlockNotFound:
            self._count("miss")
            return
        named = _named(data)
        if named is None or named[0] != k:
            self._fail("get_shared", f"{k}: read bytes of {named}")
        self._count("get")

    def delete_shared(self) -> None:
        from cascade_kv.errors import BlockNotFound

        try:
            self.store.delete(_shared(self.rng.randrange(SHARED_KEYS)))
        except BlockNotFound:
            self._count("miss")
            return
        self._count("delete")

    def protect_shared(self) -> None:
        from cascade_kv.errors import BlockNotFound, CapacityError

        k = _shared(self.rng.randrange(SHARED_KEYS))
        try:
            self.store.protect(k)
            self.store.unprotect(k)  # at once: shared protection must not pile up past the arenas
        except BlockNotFound:
            self._count("miss")
            return
        except CapacityError:
            self._count("capacity")
            return
        self._count("protect")


# ------------------------------------------------------------------ checks after a round (collective)
def _check_round(comm, store, walkers: list[Walker], round_no: int) -> list[str]:
    """Every invariant, the same verdict on every rank: the problems found anywhere."""
    rank = comm.Get_rank()
    failures = [f"rank {rank}: {f}" for w in walkers for f in w.failures]
    failures = [f for part in comm.allgather(failures) for f in part]
    if failures:  # the operations' own failures first: the reads below would only add their echoes
        return failures
    problems: list[str] = []
    try:
        _check_reads(comm, store, walkers, problems)
    except Exception as e:  # keeps every rank in step through the collectives below
        problems.append(f"rank {rank}: checking reads raised {type(e).__name__}: {e}\n{traceback.format_exc()}")
    comm.Barrier()  # past it, no rank reads (reads move blocks too: loads, replicas)
    problems += store.arena.check(idle=True)
    problems += _check_directory(comm, store)
    return [p for part in comm.allgather(problems) for p in part]


def _check_reads(comm, store, walkers: list[Walker], problems: list[str]) -> None:
    """Every rank reads every key: private keys as their owner's model says, shared ones the same everywhere."""
    from cascade_kv.errors import BlockNotFound

    rank = comm.Get_rank()

    # private keys: every rank reads every rank's keys and must see exactly what their owner's model says
    model = {k: v for w in walkers for k, v in w.model.items()}
    everyone = comm.allgather((model, [k for w in walkers for k in w.private]))
    for owner, (theirs, names) in enumerate(everyone):
        present = [k for k in names if k in theirs]
        got = store.get_many(present) if present else []
        for k, data in zip(present, got):
            if _named(data) != theirs[k][:2]:
                problems.append(f"rank {rank}: {k} (rank {owner}'s) read {_named(data)}, model {theirs[k][:2]}")
            elif store.info(k).prefix != theirs[k][2]:
                problems.append(f"rank {rank}: {k} prefix {store.info(k).prefix}, model {theirs[k][2]}")
        for k in names:
            if k not in theirs and store.contains(k):
                problems.append(f"rank {rank}: {k} (rank {owner}'s) is in the store, the model says deleted")

    # shared keys: any version, but the same on every rank
    seen: dict[str, tuple[str, int] | None] = {}
    for i in range(SHARED_KEYS):
        try:
            seen[_shared(i)] = _named(store.get(_shared(i)))
            if seen[_shared(i)] is None or seen[_shared(i)][0] != _shared(i):
                problems.append(f"rank {rank}: {_shared(i)} read wrong bytes ({seen[_shared(i)]})")
        except BlockNotFound:
            seen[_shared(i)] = None
    views = comm.allgather(seen)
    if any(v != views[0] for v in views):
        problems.append(f"rank {rank}: ranks disagree on the shared keys: {views}")
    expected_keys = sum(len(m) for m, _ in everyone) + sum(v is not None for v in views[0].values())
    if len(store.keys()) != expected_keys:
        problems.append(f"rank {rank}: store has {len(store.keys())} keys, the model {expected_keys}")


def _check_directory(comm, store) -> list[str]:
    """The directory against the arenas and the keys (no operation in flight, so it must be exact)."""
    rank = comm.Get_rank()
    problems: list[str] = []
    digests, keys = store.directory.state.snapshot()
    copies = {(c.digest, c.offset, c.generation) for c in store.arena.copies()}
    all_digests = [d for part in comm.allgather(digests) for d in part.items()]
    all_keys = [r for part in comm.allgather(keys) for r in part.values()]
    all_copies = comm.allgather(copies)
    refs: dict[bytes, list[int]] = {}
    for r in all_keys:
        count = refs.setdefault(r.digest, [0, 0])
        count[0] += 1
        count[1] += r.prefix
    listed = set()
    for digest, (nrefs, protected, locations) in all_digests:
        name = digest.hex()[:16]
        if [nrefs, protected] != refs.get(digest, [0, 0]):
            problems.append(f"rank {rank}: block {name}: home counts refs {nrefs}, prefix {protected}; keys "
                            f"bound: {refs.get(digest, [0, 0])}")
        if not locations:
            problems.append(f"rank {rank}: block {name}: no copy anywhere")
        for loc in locations:
            if loc.tier == 0:
                listed.add((loc.rank, digest, loc.offset, loc.generation))
                if (digest, loc.offset, loc.generation) not in all_copies[loc.rank]:
                    problems.append(f"rank {rank}: block {name}: home lists {loc}, not in rank {loc.rank}'s arena")
    for digest in set(refs) - {d for d, _ in all_digests}:
        problems.append(f"rank {rank}: block {digest.hex()[:16]}: keys refer to it, no home knows it")
    if rank == 0:
        for r, theirs in enumerate(all_copies):
            for digest, offset, generation in theirs:
                if (r, digest, offset, generation) not in listed:
                    problems.append(f"rank {r}: block {digest.hex()[:16]} at {offset} is in the arena, "
                                    "listed nowhere (leaked)")
    return problems


def _run(comm, scratch: Path, steps: int, seed: int, order: str) -> dict[str, int]:
    from cascade_kv.cluster.store import DistributedStore

    rank = comm.Get_rank()
    store = DistributedStore(comm=comm, timeout=STORE_TIMEOUT, host_capacity=ARENA_BLOCKS * (SIZES[1] + 64),
                             disk_path=str(scratch / "disk"), replica_threshold=2, eviction_order=order)
    walkers = [Walker(store, rank, t, seed) for t in range(THREADS)]
    per_thread = max(1, steps // THREADS)
    done = 0
    round_no = 0
    while done < per_thread:
        n = min(ROUND_STEPS, per_thread - done)
        threads = [threading.Thread(target=lambda w=w, n=n: [w.step() for _ in range(n)]) for w in walkers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done += n
        round_no += 1
        store.barrier()
        problems = _check_round(comm, store, walkers, round_no)
        if problems:
            raise AssertionError(f"seed {seed}, round {round_no} ({done} steps per thread):\n  "
                                 + "\n  ".join(problems[:40]))
        store.barrier()  # every rank's checks read before any rank changes the store again
    counts: dict[str, int] = {}
    for w in walkers:
        for k, v in w.counts.items():
            counts[k] = counts.get(k, 0) + v
    stats = store.cluster_stats()
    store.close()
    counts.update(evictions=stats.tier("host").evictions, demotions=stats.demotions, promotions=stats.promotions,
                  dedup_hits=stats.dedup_hits)
    return counts


def _main(steps: int, seed: int, where: str | None, order: str = "lru") -> None:
    from mpi4py import MPI

    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    # the first pickle-based collective duplicates the communicator with the GIL held: before any store
    scratch = Path(comm.bcast(tempfile.mkdtemp(prefix="cascade-model-test-", dir=where) if rank == 0 else None))
    if rank == 0:
        print(f"model: {comm.Get_size()} ranks x {steps} steps x {THREADS} threads, seed {seed}, {order}", flush=True)
    t0 = time.perf_counter()
    try:
        counts = _run(comm, scratch, steps, seed, order)
        comm.Barrier()
    except BaseException:
        if where is None:  # a run of its own: say what is left behind (the ranks may still use it)
            print(f"rank {rank}: failed; the disk tier is left in {scratch}", file=sys.stderr, flush=True)
        raise
    if rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"rank {rank}: {dict(sorted(counts.items()))} ({time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"rank {rank}: ok", flush=True)


if __name__ == "__main__":
    _main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None, *sys.argv[4:5])
