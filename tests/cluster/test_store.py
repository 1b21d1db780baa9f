"""The distributed store over real ranks (issue 3): every key from every rank, global dedup, spilling to
peers then disk, promotion, cluster-wide deletes, the shared cold tier, races, bad input, close, one rank
(and a store per rank over ``COMM_SELF``), and a stuck peer.

Like ``test_directory.py``, this file is also the MPI program (``python -m mpi4py test_store.py
<scenario>``); MPI is imported only inside the phases, since importing it here would initialise MPI in
the pytest process. A scenario is a list of phases run in one job (each start of mpiexec costs a second
or two); each phase opens a fresh store. Global invariants are checked on values gathered from every
rank, so every rank reaches the same verdict and none is left waiting in a collective. A rank that fails
raises without closing its store (see :func:`_opened`), and ``python -m mpi4py`` aborts the whole job at
once. To run phases alone (names are the phase functions without the underscore, comma-separated)::

    python -c "import sys; from cascade_kv.cluster.launch import run_mpi; d = run_mpi(2, [sys.executable,
    '-m', 'mpi4py', 'tests/cluster/test_store.py', 'spill,churn'], 120); print(d.stdout, d.stderr)"
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

KIB = 1024
BLOCK_SHAPE = (128, 1024)  # float16: one 256 KiB KV block
SLOT_HEADER = 64  # what a block costs in an arena beyond its bytes (tiers/slots.py; a multiple of the alignment)
STORE_TIMEOUT = 10.0  # a lost reply fails the phase with PeerTimeout, well before the job's own limit


def _mpirun(n: int, scenario: str, timeout: float = 90.0) -> str:
    # imported here: this file is also run as a plain MPI program, outside the test package
    from .conftest import run_scenario

    return run_scenario(__file__, n, scenario, timeout)


@pytest.mark.parametrize("n", [2, 4])
def test_reads_dedup_deletes_and_cold_tier_across_ranks(n):
    _mpirun(n, "global")


def test_pressure_spills_to_peers_then_disk_and_keeps_protected_blocks_in_memory():
    _mpirun(2, "pressure")


def test_bytes_deleted_from_the_shared_disk_and_put_again_are_stored_again():
    _mpirun(2, "disk_reuse")


def test_bad_input_on_one_rank_and_close():
    _mpirun(2, "errors")


def test_a_store_per_rank_over_comm_self():
    _mpirun(2, "comm_self")


def test_one_rank_behaves_like_the_single_node_store():
    _mpirun(1, "single")


def test_unresponsive_peer_raises_peer_timeout_naming_it():
    out = _mpirun(2, "timeout")
    assert "rank 0: PeerTimeout" in out and "rank 1" in out, out


# ------------------------------------------------------------------ helpers (no MPI at import)
def _value(tag: str, shape: tuple[int, ...] = BLOCK_SHAPE, dtype: str = "float16") -> np.ndarray:
    """Pseudo-random bytes named by ``tag``: any rank rebuilds the value another rank put."""
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = np.random.default_rng(zlib.crc32(tag.encode())).integers(0, 256, size=nbytes, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes (byte-wise: random float16 bytes hold NaNs)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _open(comm, **overrides):
    from cascade_kv.cluster.store import DistributedStore

    overrides.setdefault("timeout", STORE_TIMEOUT)
    # The scenarios count copies and replicas under a replica after 3 reads from peers (the default, and the
    # seed's), whatever the default becomes.
    overrides.setdefault("replica_threshold", 3)
    return DistributedStore(comm=comm, **overrides)


@contextlib.contextmanager
def _opened(comm, **overrides):
    """A store that is closed when the phase succeeds, and left open when it fails: closing is collective,
    so a rank that failed alone would wait the whole timeout in close for ranks that are elsewhere, and
    the other ranks' own waits could abort the job before its error is printed. ``python -m mpi4py``
    aborts the job at once instead, which frees everything."""
    store = _open(comm, **overrides)
    yield store
    store.close()


def _expect_sum(comm, what: str, mine: int, expected: int) -> None:
    """Collective: ``mine`` summed over the ranks is ``expected`` (the same verdict on every rank)."""
    values = comm.allgather(mine)
    assert sum(values) == expected, f"{what}: {sum(values)} over the ranks, expected {expected} (per rank {values})"


def _expect_all(comm, what: str, ok: bool, detail: object = "") -> None:
    """Collective: ``ok`` on every rank; the failure names the ranks and what each saw."""
    seen = comm.allgather((bool(ok), detail))
    bad = {r: d for r, (o, d) in enumerate(seen) if not o}
    assert not bad, f"{what}: fails on ranks {sorted(bad)}: {bad}"


def _raises(exc: type[BaseException], call: Callable[[], object], what: str) -> BaseException:
    from cascade_kv.errors import CascadeError

    try:
        call()
    except exc as e:
        if not isinstance(e, CascadeError):
            raise AssertionError(f"{what}: {type(e).__name__} is not in the error family: {e}") from e
        return e
    except BaseException as e:
        raise AssertionError(f"{what}: expected {exc.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"{what}: expected {exc.__name__}, nothing raised")


def _host(store):
    return store.stats().tier("host")


def _footprint(nbytes: int) -> int:
    return nbytes + SLOT_HEADER


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


# ------------------------------------------------------------------ phases: reads, dedup, deletes, cold tier
def _visibility(comm, scratch: Path) -> None:
    """Every key put on any rank reads back on every rank, told by a message rather than a barrier."""
    from cascade_kv.cluster.store import TIER_MEMORY

    rank, size = comm.Get_rank(), comm.Get_size()
    layouts = [((8, 1024), "float16"), ((4, 4096), "float32"), ((65536,), "int8"), ((3,), "uint8"),
               ((), "float64"), ((256, 1024), "float16")]

    def key(r: int, i: int) -> str | bytes:
        return f"vis/{r}/{i}" if i % 2 else f"vis/{r}/{i}".encode()  # both key types, homed anywhere

    def value(r: int, i: int) -> np.ndarray:
        shape, dtype = layouts[i]
        return _value(f"vis/{r}/{i}", shape, dtype)

    with _opened(comm, host_capacity="16MiB") as store:
        # 1. a put, at once a message to the next rank, which reads the key first thing
        mine = f"ring/{rank}"
        store.put(mine, _value(mine))
        sent = comm.isend(mine, dest=(rank + 1) % size)
        theirs = comm.recv(source=(rank - 1) % size)
        sent.wait()
        got = store.get(theirs)
        assert _same(got, _value(theirs)), f"rank {rank}: get({theirs!r}) right after its put returned: wrong bytes"

        # 2. a batch per rank, announced to every other rank by a message; then one get_many of everything
        k = len(layouts)
        store.put_many([key(rank, i) for i in range(k)], [value(rank, i) for i in range(k)])
        sends = [comm.isend("batch put", dest=r) for r in range(size) if r != rank]
        for r in range(size):
            if r != rank:
                assert comm.recv(source=r) == "batch put"
        for s in sends:
            s.wait()
        pairs = [(r, i) for r in range(size) for i in range(k)]
        outs = [None if j % 2 else np.zeros(layouts[i][0], layouts[i][1]) for j, (r, i) in enumerate(pairs)]
        got_many = store.get_many([key(r, i) for r, i in pairs], outs)
        for j, (r, i) in enumerate(pairs):
            assert _same(got_many[j], value(r, i)), f"rank {rank}: get_many gave wrong bytes for {key(r, i)!r}"
            assert outs[j] is None or got_many[j] is outs[j], f"rank {rank}: get_many did not fill the out given"
        for r, i in pairs:  # one copy, in the memory of the rank that put it
            where = store.locations(key(r, i))
            assert len(where) == 1 and where[0].rank == r and where[0].tier == TIER_MEMORY \
                and where[0].nbytes == value(r, i).nbytes, f"rank {rank}: locations({key(r, i)!r}) = {where}"
            assert store.contains(key(r, i)) and key(r, i) in store
        assert not store.contains("vis/absent") and "vis/absent" not in store
        listed = store.keys()
        assert len(listed) == len(store) == size * (k + 1) and {key(r, i) for r, i in pairs} <= set(listed), listed

        s = store.stats()
        peer_bytes = _value(theirs).nbytes + sum(value(r, i).nbytes for r, i in pairs if r != rank)
        remote = s.tier("remote")
        assert (remote.hits, remote.bytes_read) == (1 + k * (size - 1), peer_bytes), \
            f"rank {rank}: remote tier hits/bytes_read {remote.hits}/{remote.bytes_read}, " \
            f"expected {1 + k * (size - 1)}/{peer_bytes} (gets served from peers' memory)"
        assert s.tier("host").hits == k, f"rank {rank}: host hits {s.tier('host').hits}, expected {k} (own keys)"
        assert s.bytes_received >= peer_bytes, f"rank {rank}: bytes_received {s.bytes_received} < {peer_bytes} read"
        assert s.ranks == 1, s
        n_keys = size * (k + 1)
        cs = store.cluster_stats()
        assert (cs.ranks, cs.keys, cs.blocks, cs.puts, cs.dedup_hits) == (size, n_keys, n_keys, n_keys, 0), cs
        assert cs.gets == size * (1 + k * size), cs
        assert cs.tier("host").blocks == n_keys and cs.tier("remote").hits == size * (1 + k * (size - 1)), cs

        # 3. rebinding a key: the new bytes are seen at once, the old block is freed
        if rank == 0:
            store.put("ring/0", _value("ring/0 again"))
            for r in range(1, size):
                comm.send("rebound", dest=r)
        else:
            assert comm.recv(source=0) == "rebound"
        assert _same(store.get("ring/0"), _value("ring/0 again")), f"rank {rank}: old bytes after ring/0 was rebound"
        store.barrier()
        _expect_sum(comm, "host-tier blocks after ring/0 was rebound (old block freed)", _host(store).blocks, n_keys)

        # 4. every rank puts other bytes under one key at once: all read the same winner, stored once
        store.put("race", _value(f"race/{rank}"))
        store.barrier()
        seen = comm.allgather(zlib.crc32(store.get("race").tobytes()))
        assert len(set(seen)) == 1 and seen[0] in {zlib.crc32(_value(f"race/{r}").tobytes()) for r in range(size)}, \
            f"ranks read different values of one key after racing puts: crc32 per rank {seen}"
        _expect_sum(comm, "host-tier blocks after racing puts of one key (losers freed)", _host(store).blocks, n_keys + 1)

        # 5. a str key and a bytes key of the same text are two keys; a strided out is filled from a peer
        if rank == 0:
            store.put("twin", _value("twin str"))
        if rank == size - 1:
            store.put(b"twin", _value("twin bytes"))
        store.barrier()
        assert _same(store.get("twin"), _value("twin str")) and _same(store.get(b"twin"), _value("twin bytes"))
        peer = (rank + 1) % size
        strided = np.zeros((8, 2048), np.float16)[:, ::2]
        assert store.get(key(peer, 0), strided) is strided and _same(strided, value(peer, 0)), \
            f"rank {rank}: a strided out was not filled right from rank {peer}"


def _dedup(comm, scratch: Path) -> None:
    """Ranks putting the same bytes at the same moment store one copy; a put of bytes held elsewhere moves
    nothing; a delete on one rank is seen everywhere and frees every copy."""
    from cascade_kv.errors import BlockNotFound

    rank, size = comm.Get_rank(), comm.Get_size()
    # promotion out of reach: the reads below read one digest under many keys, and a replica is a second copy
    with _opened(comm, host_capacity="16MiB", replica_threshold=1000) as store:
        shared = _value("dedup/shared")
        store.barrier()
        store.put(f"dedup/{rank}", shared)  # every rank at once, under different keys
        store.barrier()
        _expect_sum(comm, "host-tier blocks after every rank put the same bytes under its own key",
                    _host(store).blocks, 1)
        cs = store.cluster_stats()
        assert (cs.keys, cs.blocks, cs.dedup_hits, cs.dedup_bytes_saved) == (
            size, 1, size - 1, (size - 1) * shared.nbytes), cs

        same = _value("dedup/same key")
        store.barrier()
        store.put("dedup/same", same)  # every rank at once, under the same key
        store.barrier()
        _expect_sum(comm, "host-tier blocks after every rank put the same bytes under one key", _host(store).blocks, 2)
        cs = store.cluster_stats()
        assert (cs.keys, cs.blocks, cs.dedup_hits) == (size + 1, 2, 2 * (size - 1)), cs

        # a put of bytes another rank holds transfers nothing
        where = store.locations("dedup/0")
        assert len(where) == 1 and comm.allgather(where) == [where] * size, where
        putter = (where[0].rank + 1) % size
        if rank == putter:
            before = store.stats()
            store.put("dedup/again", shared)
            store.put_many(["dedup/twice-a", "dedup/twice-b"], [same.copy(), same.copy()])
            after = store.stats()
            assert after.bytes_received == before.bytes_received, \
                f"rank {rank}: dedup puts received {after.bytes_received - before.bytes_received} bytes"
            assert after.tier("remote").bytes_read == before.tier("remote").bytes_read
            assert after.dedup_hits == before.dedup_hits + 3, (before.dedup_hits, after.dedup_hits)
            assert store.locations("dedup/again") == where, store.locations("dedup/again")
        store.barrier()
        _expect_sum(comm, "host-tier blocks after dedup puts of bytes held by a peer", _host(store).blocks, 2)

        # new bytes given twice in one batch are stored once
        if rank == size - 1:
            fresh = _value("dedup/fresh")
            store.put_many(["dedup/batch-a", "dedup/batch-b"], [fresh, fresh.copy()])
        store.barrier()
        _expect_sum(comm, "host-tier blocks after a batch holding new bytes twice", _host(store).blocks, 3)

        keys = [f"dedup/{r}" for r in range(size)] + ["dedup/same", "dedup/again", "dedup/twice-a",
                                                       "dedup/twice-b", "dedup/batch-a", "dedup/batch-b"]
        expected = [shared] * size + [same, shared, same, same, _value("dedup/fresh"), _value("dedup/fresh")]
        for key, want, got in zip(keys, expected, store.get_many(keys), strict=True):
            assert _same(got, want), f"rank {rank}: wrong bytes for {key!r}"

        # a delete on rank 0 is seen everywhere and frees every copy (once every rank has read: a delete
        # racing a slower rank's get would be that get's miss)
        store.barrier()
        if rank == 0:
            store.delete_many(keys)
        store.barrier()
        for key in keys:
            assert not store.contains(key), f"rank {rank}: contains({key!r}) after rank 0 deleted it"
            e = _raises(BlockNotFound, lambda k=key: store.get(k), f"rank {rank}: get({key!r}) after delete")
            assert isinstance(e, KeyError)
        if rank == size - 1:
            _raises(BlockNotFound, lambda: store.delete("dedup/0"), "delete of a deleted key")
        _expect_sum(comm, "host-tier blocks after the delete", _host(store).blocks, 0)
        _expect_sum(comm, "host-tier used bytes after the delete", _host(store).used_bytes, 0)
        cs = store.cluster_stats()
        assert (cs.keys, cs.blocks) == (0, 0), cs


def _no_dedup(comm, scratch: Path) -> None:
    """``dedup_enabled=False``: every put stores its own copy, even of bytes another rank holds."""
    rank, size = comm.Get_rank(), comm.Get_size()
    with _opened(comm, host_capacity="4MiB", dedup_enabled=False) as store:
        v = _value("nodedup")
        store.barrier()
        store.put_many([f"nd/{rank}/a", f"nd/{rank}/b"], [v, v.copy()])
        store.barrier()
        _expect_sum(comm, "host-tier blocks with dedup off", _host(store).blocks, 2 * size)
        cs = store.cluster_stats()
        assert (cs.keys, cs.blocks, cs.dedup_hits) == (2 * size, 2 * size, 0), cs
        keys = [f"nd/{r}/{x}" for r in range(size) for x in "ab"]
        assert all(_same(g, v) for g in store.get_many(keys))
        store.barrier()  # every rank has read them: a delete now cannot race a read (that is a BlockNotFound)
        if rank == 0:
            store.delete_many(keys)
        store.barrier()
        _expect_sum(comm, "host-tier blocks with dedup off, after the delete", _host(store).blocks, 0)


def _threads(comm, scratch: Path) -> None:
    """Several threads per rank put and read at once, sharing bytes across threads and ranks."""
    from concurrent.futures import ThreadPoolExecutor

    rank, size = comm.Get_rank(), comm.Get_size()
    threads, per = 4, 6
    shared = _value("threads/shared", (16, 1024))

    def expected(key: str) -> np.ndarray:
        return shared if int(key.rsplit("/", 1)[1]) % 3 == 0 else _value(key, (16, 1024))

    def keys_of(r: int, t: int) -> list[str]:
        return [f"th/{r}/{t}/{i}" for i in range(per)]

    # promotion out of reach: each thread reads the shared block, and a replica would be a second copy
    with _opened(comm, host_capacity="16MiB", replica_threshold=1000) as store:
        def work(t: int) -> None:
            mine = keys_of(rank, t)
            for k in mine:
                store.put(k, expected(k))
            for k, g in zip(mine, store.get_many(mine)):
                assert _same(g, expected(k)), f"rank {rank} thread {t}: wrong bytes for {k!r}"

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, range(threads)))
        store.barrier()
        unique = size * threads * (per - 2)  # i = 0 and 3 put the shared bytes
        _expect_sum(comm, "host-tier blocks after threaded puts", _host(store).blocks, unique + 1)
        cs = store.cluster_stats()
        assert (cs.keys, cs.blocks, cs.dedup_hits) == (size * threads * per, unique + 1,
                                                       size * threads * 2 - 1), cs
        everything = [k for r in range(size) for t in range(threads) for k in keys_of(r, t)]

        def read_all(t: int) -> None:
            for k, g in zip(everything, store.get_many(everything)):
                assert _same(g, expected(k)), f"rank {rank} thread {t}: wrong bytes for {k!r}"

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read_all, range(threads)))
        store.barrier()


def _cold(comm, scratch: Path) -> None:
    """Blocks on the shared disk, read by every rank at once, are read from disk once each."""
    from cascade_kv.cluster.store import TIER_DISK, TIER_MEMORY

    rank, size = comm.Get_rank(), comm.Get_size()
    disk = scratch / "cold"
    with _opened(comm, host_capacity="16MiB", disk_path=str(disk)) as store:
        mine = [f"cold/{rank}/{i}" for i in range(2)]
        store.put_many(mine, [_value(k) for k in mine])
        store.demote(mine)
        store.barrier()
        keys = [f"cold/{r}/{i}" for r in range(size) for i in range(2)]
        for key in keys:
            where = store.locations(key)
            assert len(where) == 1 and where[0].tier == TIER_DISK, f"rank {rank}: after demote, {key!r} at {where}"
        _expect_sum(comm, "host-tier blocks after demoting everything", _host(store).blocks, 0)
        _expect_sum(comm, "disk-tier hits before any read", store.stats().tier("disk").hits, 0)

        store.barrier()
        got = store.get_many(keys)  # every rank reads every block at the same moment
        assert all(_same(g, _value(k)) for g, k in zip(got, keys)), f"rank {rank}: wrong bytes from the cold tier"
        _expect_sum(comm, "disk reads when every rank read every cold block at once (one per block)",
                    store.stats().tier("disk").hits, len(keys))
        for key in keys:
            assert any(x.tier == TIER_MEMORY for x in store.locations(key)), \
                f"rank {rank}: {key!r} read from disk but kept in no rank's memory: {store.locations(key)}"
        got = store.get_many(keys)
        assert all(_same(g, _value(k)) for g, k in zip(got, keys))
        _expect_sum(comm, "disk reads after a second read of every block", store.stats().tier("disk").hits, len(keys))

        if rank == 0:  # a protected block cannot be demoted
            store.put("cold/prefix", _value("cold/prefix"), is_prefix=True)
            _raises(ValueError, lambda: store.demote(["cold/prefix"]), "demote of a protected key")
            assert [x.tier for x in store.locations("cold/prefix")] == [TIER_MEMORY], store.locations("cold/prefix")
        store.barrier()
    comm.Barrier()  # every rank has removed its files
    if rank == 0:
        assert _files(disk) == [], f"block files left in the shared disk_path after close: {_files(disk)}"


def _disk_reuse(comm, scratch: Path) -> None:
    """Bytes deleted from the shared disk and put again are stored again, whichever rank read them before."""
    from cascade_kv.cluster.store import TIER_DISK

    rank, size = comm.Get_rank(), comm.Get_size()
    v = _value("reuse")
    with _opened(comm, host_capacity="4MiB", disk_path=str(scratch / "reuse")) as store:
        if rank == 0:
            store.put("reuse/a", v)
            store.demote(["reuse/a"])
        store.barrier()
        last = size - 1
        if rank == last:
            assert _same(store.get("reuse/a"), v)  # read from the shared disk by a rank that did not write it
            assert store.stats().tier("disk").hits == 1
        store.barrier()
        if rank == 0:
            store.delete("reuse/a")  # removes the file
        store.barrier()
        if rank == last:  # a rank that read the old file puts the same bytes again and sends them to disk
            store.put("reuse/b", v)
            store.demote(["reuse/b"])
            where = store.locations("reuse/b")
            assert [x.tier for x in where] == [TIER_DISK], where
        store.barrier()
        try:
            got = store.get("reuse/b")
        except Exception as e:
            raise AssertionError(f"rank {rank}: get of bytes put again after their file was deleted, read once "
                                 f"by rank {last}: {type(e).__name__}: {e}") from e
        assert _same(got, v), f"rank {rank}: wrong bytes for reuse/b"
        store.barrier()


# ------------------------------------------------------------------ phases: pressure, protection, promotion
def _spill(comm, scratch: Path) -> None:
    """One rank puts more than its memory: victims go to the peer's memory, and to disk only once the
    cluster's memory is full; nothing is lost."""
    from cascade_kv.cluster.directory import DEFAULT_LEASE_S
    from cascade_kv.cluster.store import TIER_DISK, TIER_MEMORY

    rank = comm.Get_rank()
    timeout = DEFAULT_LEASE_S / 2  # a read waiting out a load lease raises PeerTimeout (see the last get_many)
    with _opened(comm, host_capacity="4MiB", disk_path=str(scratch / "spill"), timeout=timeout) as store:
        foot = _footprint(_value("x").nbytes)
        fits = _host(store).capacity_bytes // foot  # blocks one rank's memory holds
        first = [f"spill/a{i}" for i in range(fits + fits // 2)]  # more than rank 0 holds, less than the cluster
        if rank == 0:
            for key in first:
                store.put(key, _value(key))
        store.barrier()
        _expect_sum(comm, f"host-tier blocks after rank 0 put {len(first)} blocks ({fits} fit a rank)",
                    _host(store).blocks, len(first))
        holders = {x.rank for k in first for x in store.locations(k) if x.tier == TIER_MEMORY}
        on_disk = [k for k in first if any(x.tier == TIER_DISK for x in store.locations(k))]
        assert holders == {0, 1} and on_disk == [], f"rank {rank}: memory copies on ranks {holders}, on disk {on_disk}"
        _expect_sum(comm, "victims moved out of rank 0 (demotions)", store.stats().demotions if rank == 0 else 0,
                    len(first) - fits)
        got = store.get_many(first)
        assert all(_same(g, _value(k)) for g, k in zip(got, first)), f"rank {rank}: wrong bytes after spilling"

        second = [f"spill/b{i}" for i in range(fits + fits // 2)]  # now more than the cluster's memory
        if rank == 0:
            for key in second:
                store.put(key, _value(key))
        store.barrier()
        host = _host(store)
        _expect_all(comm, "memory full before the disk was used (free bytes < one block)",
                    host.capacity_bytes - host.used_bytes < foot, (host.used_bytes, host.capacity_bytes))
        keys = first + second
        disk_only = [k for k in keys if {x.tier for x in store.locations(k)} == {TIER_DISK}]
        # collective, so that no rank's reads below (which load blocks back) overlap another rank's look
        _expect_all(comm, f"blocks only on disk: {len(keys)} put, {2 * fits} fit the cluster's memory",
                    len(disk_only) == len(keys) - 2 * fits, len(disk_only))
        # Both ranks at once, memory full: blocks loaded from disk push others out. A read that waited for a
        # load lease its holder never ended (no room to publish, and not given back) would wait out the lease
        # and pass slowly; with the store's timeout shorter than the lease it raises PeerTimeout instead. That
        # bound is the library's own, not a wall-clock figure of this test's.
        got = store.get_many(keys)
        assert all(_same(g, _value(k)) for g, k in zip(got, keys)), f"rank {rank}: wrong bytes, memory and disk full"


def _churn(comm, scratch: Path) -> None:
    """Reads on one rank while the owner evicts, and then deletes, the blocks being read: right bytes or
    BlockNotFound (after the delete), never another block's bytes."""
    from cascade_kv.errors import BlockNotFound

    rank = comm.Get_rank()
    with _opened(comm, host_capacity="4MiB", disk_path=str(scratch / "churn")) as store:
        fits = _host(store).capacity_bytes // _footprint(_value("x").nbytes)
        watched = [f"churn/w{i}" for i in range(fits // 2)]
        if rank == 0:
            store.put_many(watched, [_value(k) for k in watched])
        store.barrier()
        if rank == 0:
            for i in range(3 * fits):  # every watched block leaves rank 0's memory, some twice
                store.put(f"churn/x{i}", _value(f"churn/x{i}"))
            comm.send("evicted", dest=1)
        else:
            done, rounds = comm.irecv(source=0), 0
            while not done.test()[0]:
                for k, g in zip(watched, store.get_many(watched)):
                    assert _same(g, _value(k)), f"round {rounds}: wrong bytes for {k!r} while rank 0 evicts"
                rounds += 1
            print(f"rank 1: {rounds} rounds of reads during eviction", flush=True)
        store.barrier()
        if rank == 0:
            for k in watched:
                store.delete(k)
            comm.send("deleted", dest=1)
        else:
            done, outcomes = comm.irecv(source=0), {"read": 0, "gone": 0}
            while not done.test()[0]:
                for k in watched:
                    try:
                        g = store.get(k)
                    except BlockNotFound:
                        outcomes["gone"] += 1
                    else:
                        assert _same(g, _value(k)), f"wrong bytes for {k!r} while rank 0 deletes"
                        outcomes["read"] += 1
            print(f"rank 1: reads during deletes {outcomes}", flush=True)
        store.barrier()
        assert not any(store.contains(k) for k in watched)
        cs = store.cluster_stats()
        assert (cs.keys, cs.blocks) == (3 * fits, 3 * fits), cs
        rest = [f"churn/x{i}" for i in range(3 * fits)]
        assert all(_same(g, _value(k)) for g, k in zip(store.get_many(rest), rest))
        store.barrier()


def _put_delete_race(comm, scratch: Path) -> None:
    """Ranks put and delete keys holding the same bytes at once: a put that deduplicates against a block
    being freed must still leave its key readable; at the end nothing is left."""
    rank = comm.Get_rank()
    v = _value("race/v", (64, 1024))
    with _opened(comm, host_capacity="4MiB", disk_path=str(scratch / "race")) as store:
        store.barrier()
        for i in range(40):
            key = f"race/{rank}/{i}"
            store.put(key, v)
            got = store.get(key)
            assert _same(got, v), f"rank {rank}: wrong bytes for {key!r} at round {i}"
            if i % 7 == 3:
                store.demote([key])  # one shared file per digest: another rank's delete may remove it next
            store.delete(key)
        store.barrier()
        cs = store.cluster_stats()
        assert (cs.keys, cs.blocks, cs.tier("host").blocks) == (0, 0, 0), cs
        comm.Barrier()


def _protected(comm, scratch: Path) -> None:
    """Protected blocks stay in cluster memory under pressure; a protected put that cannot fit there is
    refused and changes nothing; unprotect and protect on one rank hold everywhere."""
    from cascade_kv.cluster.store import TIER_MEMORY
    from cascade_kv.errors import CapacityError

    rank, size = comm.Get_rank(), comm.Get_size()

    def in_memory(key: str) -> bool:
        return any(x.tier == TIER_MEMORY for x in store.locations(key))

    with _opened(comm, host_capacity="4MiB", disk_path=str(scratch / "protected")) as store:
        foot = _footprint(_value("x").nbytes)
        fits = _host(store).capacity_bytes // foot
        prefix = [f"sys/{i}" for i in range(4)]
        bulk = [f"bulk/{i}" for i in range(3 * fits)]  # more than the cluster's memory
        if rank == 0:
            store.put_many(prefix, [_value(k) for k in prefix], is_prefix=True)
            for key in bulk:
                store.put(key, _value(key))
        store.barrier()
        cs = store.cluster_stats()
        assert (cs.protected_blocks, cs.protected_in_memory) == (4, 4), cs
        assert all(in_memory(k) for k in prefix), [store.locations(k) for k in prefix]
        sample = prefix + bulk[::5]
        assert all(_same(g, _value(k)) for g, k in zip(store.get_many(sample), sample)), f"rank {rank}: wrong bytes"
        store.barrier()

        # a protected put larger than the cluster's memory: refused on the calling rank, nothing changes
        def footprint() -> tuple[object, ...]:
            c = store.cluster_stats()
            return (c.keys, c.blocks, c.protected_blocks, c.tier("host").blocks, c.tier("host").used_bytes)

        before = footprint()
        names = [f"sys/batch{i}" for i in range(2 * fits + 1)]
        if rank == 1:
            huge = np.zeros(size * 4 * 1024 * KIB + foot, np.uint8)
            e = _raises(CapacityError, lambda: store.put("sys/huge", huge, is_prefix=True),
                        "protected put larger than the cluster's memory")
            print(f"rank {rank}: CapacityError {e}", flush=True)
            _raises(CapacityError, lambda: store.put_many(names, [_value(k) for k in names], is_prefix=True),
                    "protected put_many whose blocks together exceed the cluster's memory")
        store.barrier()
        assert footprint() == before, (before, footprint())
        for key in ["sys/huge", *names]:
            assert not store.contains(key), f"rank {rank}: {key!r} bound by a refused put"

        # a protected block that fits once unprotected blocks make room is accepted
        if rank == 1:
            store.put("sys/late", _value("sys/late", (512, 1024)), is_prefix=True)
        store.barrier()
        cs = store.cluster_stats()
        assert (cs.protected_blocks, cs.protected_in_memory) == (5, 5), cs

        # unprotect and protect on one rank; then pressure again
        was = set(store.locations("sys/0"))
        if rank == 1:
            store.unprotect("sys/0")
            store.protect(bulk[0])  # from disk, most likely: protect brings it back to memory
        store.barrier()
        cs = store.cluster_stats()
        assert (cs.protected_blocks, cs.protected_in_memory) == (5, 5), cs
        more = [f"bulk/more{i}" for i in range(2 * fits)]
        if rank == 0:
            for key in more:
                store.put(key, _value(key))
        store.barrier()
        now = set(store.locations("sys/0"))
        assert not was & now, f"rank {rank}: unprotected sys/0 still at {was & now} after pressure"
        cs = store.cluster_stats()
        assert (cs.protected_blocks, cs.protected_in_memory) == (5, 5), cs
        assert all(in_memory(k) for k in [*prefix[1:], "sys/late", bulk[0]])
        check = [*prefix, "sys/late", bulk[0]]
        assert all(_same(g, _value(k, g.shape)) for g, k in zip(store.get_many(check), check))
        store.barrier()

        # a protected key put again without the flag is no longer protected
        if rank == 0:
            store.put("sys/1", _value("sys/1 unprotected"))
        store.barrier()
        cs = store.cluster_stats()
        assert (cs.protected_blocks, cs.protected_in_memory) == (4, 4), cs


def _promotion(comm, scratch: Path) -> None:
    """A rank reading a peer's block ``replica_threshold`` times keeps a replica; a delete frees it too;
    under pressure replicas go first."""
    from cascade_kv.cluster.store import TIER_MEMORY
    from cascade_kv.errors import BlockNotFound

    rank = comm.Get_rank()
    threshold = 3
    hot = _value("hot")

    def on(r: int, key: str) -> bool:
        return any(x.rank == r and x.tier == TIER_MEMORY for x in store.locations(key))

    def promote() -> None:
        """Rank 0 puts "hot", rank 1 reads it until it keeps a replica."""
        if rank == 0:
            store.put("hot", hot)
            comm.send("put", dest=1)
            return
        assert comm.recv(source=0) == "put"
        start = store.stats()
        for i in range(threshold):
            got = store.get("hot") if i % 2 == 0 else store.get_many(["hot"])[0]
            assert _same(got, hot)
            s = store.stats()
            if i < threshold - 1:
                assert s.promotions == start.promotions and not on(1, "hot"), \
                    f"replica after {i + 1} reads (threshold {threshold}): {store.locations('hot')}"
        assert s.promotions == start.promotions + 1, f"promotions {start.promotions} -> {s.promotions}"
        assert s.tier("remote").hits == start.tier("remote").hits + threshold
        assert on(1, "hot") and on(0, "hot"), store.locations("hot")
        store.get("hot")
        after = store.stats()
        assert after.tier("host").hits == s.tier("host").hits + 1 and \
            after.tier("remote").hits == s.tier("remote").hits, "the read after the promotion was not local"

    with _opened(comm, host_capacity="4MiB", replica_threshold=threshold) as store:
        promote()
        store.barrier()
        _expect_sum(comm, "host-tier blocks: the block and its replica", _host(store).blocks, 2)

        if rank == 0:  # the delete frees the replica on rank 1 as well
            store.delete("hot")
        store.barrier()
        _expect_sum(comm, "host-tier blocks after deleting a replicated key", _host(store).blocks, 0)
        _expect_sum(comm, "host-tier used bytes after deleting a replicated key", _host(store).used_bytes, 0)
        assert not store.contains("hot")
        _raises(BlockNotFound, lambda: store.get("hot"), f"rank {rank}: get of a deleted, replicated key")
        store.barrier()

        promote()
        store.barrier()
        if rank == 1:  # replicas go first: none of rank 1's own blocks leaves while the replica stays
            fits = _host(store).capacity_bytes // _footprint(hot.nbytes)
            own: list[str] = []
            for i in range(fits):  # with the replica: one block more than rank 1 holds
                own.append(f"own/{i}")
                store.put(own[-1], _value(own[-1]))
                moved = [k for k in own if not on(1, k)]
                assert not (moved and on(1, "hot")), \
                    f"after {len(own)} puts on rank 1, its own blocks {moved} moved out while the replica stayed"
            assert not on(1, "hot"), f"rank 1 holds {fits} own blocks and the replica: {store.locations('hot')}"
            assert _same(store.get("hot"), hot)
            assert all(_same(store.get(k), _value(k)) for k in own)
        store.barrier()


# ------------------------------------------------------------------ phases: errors, close, a store per rank
def _bad_input(comm, scratch: Path) -> None:
    """Bad input on rank 1 raises the single-node errors there; rank 0 carries on; nothing changes."""
    from cascade_kv.errors import BlockNotFound, ConfigError

    rank = comm.Get_rank()
    # a config the distributed store refuses: refused on every rank, nobody left waiting
    # (persist=True on a single-node store's directory: rank 0 finds out, every rank raises)
    if rank == 0:
        (scratch / "persist").mkdir()
        (scratch / "persist" / "journal.log").write_bytes(b"")
    comm.Barrier()
    _raises(ConfigError, lambda: _open(comm, host_capacity="1MiB", persist=True,
                                       disk_path=str(scratch / "persist")), "persist=True on a single-node dir")
    comm.Barrier()

    good = _value("e/good", (64, 256), "float32")
    with _opened(comm, host_capacity="4MiB") as store:
        if rank == 0:
            store.put("e/good", good)
        store.put(f"e/{rank}", _value(f"e/{rank}"))
        store.barrier()
        before = store.cluster_stats()

        if rank == 1:
            read_only = np.zeros(good.shape, good.dtype)
            read_only.flags.writeable = False
            sentinel = np.full(good.shape, 7, good.dtype)
            cases: list[tuple[type[BaseException], Callable[[], object], str]] = [
                (ValueError, lambda: store.get("e/good", np.zeros(good.shape, np.float64)), "out of another dtype"),
                (ValueError, lambda: store.get("e/good", np.zeros((256, 64), good.dtype)), "out of another shape"),
                (ValueError, lambda: store.get("e/good", read_only), "read-only out"),
                (ValueError, lambda: store.get("e/good", [0.0] * 64), "out that is a list"),
                (TypeError, lambda: store.get(3), "int key to get"),
                (TypeError, lambda: store.put(3, good), "int key to put"),
                (TypeError, lambda: store.delete(None), "None key to delete"),
                (TypeError, lambda: store.contains(1.5), "float key to contains"),
                (TypeError, lambda: store.locations(7), "int key to locations"),
                (TypeError, lambda: store.put("e/obj", np.array([object()])), "object array"),
                (TypeError, lambda: store.put("e/str", "not an array"), "str value"),
                (BlockNotFound, lambda: store.get("e/missing"), "get of a missing key"),
                (BlockNotFound, lambda: store.delete("e/missing"), "delete of a missing key"),
                (BlockNotFound, lambda: store.delete_many(["e/good", "e/missing"]), "delete_many with one missing"),
                (BlockNotFound, lambda: store.protect("e/missing"), "protect of a missing key"),
                (BlockNotFound, lambda: store.unprotect("e/missing"), "unprotect of a missing key"),
                (BlockNotFound, lambda: store.get_many(["e/good", "e/missing"], [sentinel, None]),
                 "get_many with one missing key"),
                (ValueError, lambda: store.put_many(["e/a", "e/b"], [good]), "put_many of 2 keys, 1 array"),
                (ValueError, lambda: store.get_many(["e/good"], []), "get_many of 1 key, 0 outs"),
                (ValueError, lambda: store.put_many(["e/a"], [good], is_prefix=[True, False]), "2 flags for 1 key"),
                (TypeError, lambda: store.put_many(["e/a", "e/b"], [good, "not an array"]), "one bad array of two"),
                (TypeError, lambda: store.put_many(["e/a", "e/b"], [good, np.zeros(4, np.dtype("f4", metadata={"t": (1,)}))]),
                 "a dtype whose metadata the directory cannot carry exactly"),
            ]
            for exc, call, what in cases:
                _raises(exc, call, f"rank 1: {what}")
            assert (sentinel == 7).all(), "get_many wrote into an out before finding a key missing"
            assert _same(store.get("e/good"), good)
            comm.send("done", dest=0)
        else:  # carries on meanwhile, reading its own key and rank 1's
            done = comm.irecv(source=1)
            reads = 0
            while not done.test()[0]:
                assert _same(store.get("e/good"), good) and _same(store.get_many(["e/1"])[0], _value("e/1"))
                reads += 1
            assert reads > 0
        store.barrier()
        after = store.cluster_stats()
        assert (after.keys, after.blocks, after.protected_blocks) == (before.keys, before.blocks,
                                                                      before.protected_blocks), (before, after)
        for key in ["e/obj", "e/str", "e/a", "e/b"]:
            assert not store.contains(key), f"rank {rank}: {key!r} bound by a refused call"
        assert _same(store.get("e/good"), good) and _same(store.get(f"e/{1 - rank}"), _value(f"e/{1 - rank}"))


def _shm_mapped() -> set[str]:
    """The /dev/shm files this process maps (Open MPI's shared-memory segments)."""
    with open("/proc/self/maps") as f:
        fields = [line.split() for line in f]
    return {f[5] for f in fields if len(f) >= 6 and f[5].startswith("/dev/shm/")}


def _shm_names() -> set[str]:
    # sm_segment.* are Open MPI's per-job segments (this job's were made at MPI_Init, before any store);
    # a concurrently running MPI job makes its own, which are not this store's leftovers
    return {n for n in os.listdir("/dev/shm") if not n.startswith("sm_segment.")}


def _close(comm, scratch: Path) -> None:
    """Close leaves no shared memory, no block files, no threads; a second close is harmless; a closed
    store refuses every call."""
    from cascade_kv.errors import StoreClosed

    rank = comm.Get_rank()
    disk = scratch / "close"
    names_before, maps_before = _shm_names(), _shm_mapped()
    threads_before = threading.active_count()
    store = _open(comm, host_capacity="4MiB", disk_path=str(disk))
    maps_open = _shm_mapped() - maps_before  # the store's window
    key = f"close/{rank}"
    store.put(key, _value(key))
    store.demote([key])
    store.put(f"close/mem{rank}", _value(f"close/mem{rank}"))
    store.barrier()
    if rank == 0:
        assert _files(disk), "no block file on disk after demote: the check below would prove nothing"
    store.barrier()
    store.close()
    store.close()  # a second close does nothing
    comm.Barrier()
    left = {"new /dev/shm names": sorted(_shm_names() - names_before),
            "mapped while open, still mapped": sorted(_shm_mapped() & maps_open),
            "mapped while open, still a file": sorted(p for p in maps_open if os.path.exists(p)),
            "threads": threading.active_count() - threads_before}
    _expect_all(comm, "nothing left after close", not any(left.values()), left)
    if rank == 0:
        assert _files(disk) == [], f"block files left in the shared disk_path after close: {_files(disk)}"
    for what, call in [("get", lambda: store.get(key)), ("put", lambda: store.put("x", _value("x"))),
                       ("delete", lambda: store.delete(key)), ("get_many", lambda: store.get_many([key]))]:
        _raises(StoreClosed, call, f"{what} after close")

    with _open(comm, host_capacity="1MiB") as again:  # a context manager closes on exit
        again.put(key, _value(key))
    _raises(StoreClosed, lambda: again.get(key), "get after the with block")
    comm.Barrier()


def _store_per_rank(comm, scratch: Path) -> None:
    """A store over ``MPI.COMM_SELF`` on each rank: private stores, as on one node."""
    from mpi4py import MPI

    rank = comm.Get_rank()
    with _opened(MPI.COMM_SELF, host_capacity="1MiB") as store:
        mine = _value(f"self/{rank}", (64, 64))
        store.put("self/k", mine)
        comm.Barrier()  # the other rank has put its own bytes under the same key
        assert _same(store.get("self/k"), mine), f"rank {rank}: a COMM_SELF store saw another rank's put"
        s, cs = store.stats(), store.cluster_stats()
        assert (s.ranks, cs.ranks, cs.keys, s.tier("remote").hits) == (1, 1, 1, 0), (s, cs)
        assert [x.rank for x in store.locations("self/k")] == [0]
        comm.Barrier()


# ------------------------------------------------------------------ phases: one rank, a stuck peer
def _single(comm, scratch: Path) -> None:
    """On one rank the distributed store answers as the single-node store does, call for call."""
    import random

    from cascade_kv import DistributedStore as Lazy
    from cascade_kv import Store
    from cascade_kv.cluster.store import TIER_DISK, DistributedStore
    from cascade_kv.errors import BlockNotFound, CapacityError

    assert comm.Get_size() == 1
    assert Lazy is DistributedStore
    values = [_value(f"single/{i}", (64, 1024)) for i in range(5)]
    keys = ["a", "b", b"c", "d", "e", "f"]

    def outcome(store, op: str, key: str | bytes, value: np.ndarray, flag: bool, other: str | bytes) -> object:
        try:
            if op == "put":
                return ("ok", store.put(key, value, is_prefix=flag))
            if op == "get":
                result = store.get(key)
                return ("array", result.dtype.str, result.shape, result.tobytes())
            if op == "get_many":
                return ("list", [(r.dtype.str, r.shape, r.tobytes()) for r in store.get_many([key, other])])
            return ("ok", getattr(store, op)(key))  # delete, contains, protect, unprotect
        except (BlockNotFound, CapacityError, TypeError, ValueError) as e:  # the same class on both stores
            return ("raised", type(e).__name__)

    with _opened(comm, host_capacity="2MiB") as ds, Store(host_capacity="2MiB") as ss:
        rng = random.Random(3)
        for step in range(300):
            op = rng.choice(["put", "put", "get", "get_many", "delete", "contains", "protect", "unprotect"])
            args = (op, rng.choice(keys), rng.choice(values), rng.random() < 0.3, rng.choice(keys))
            mine, model = outcome(ds, *args), outcome(ss, *args)
            assert mine == model, f"step {step}: {op}({args[1]!r}) distributed {mine!r:.200} single-node {model!r:.200}"
        d, s = ds.stats(), ss.stats()
        fields = ("keys", "blocks", "unique_bytes", "logical_bytes", "puts", "deletes", "dedup_hits",
                  "dedup_bytes_saved", "protected_blocks", "protected_in_memory")
        assert {f: getattr(d, f) for f in fields} == {f: getattr(s, f) for f in fields}, (d, s)
        assert d.tier("host").blocks == s.tier("host").blocks and d.tier("remote").hits == 0, d
        cs = ds.cluster_stats()
        assert (cs.ranks, cs.keys, cs.blocks) == (1, d.keys, d.blocks), cs

        def order(k: str | bytes) -> tuple[str, str | bytes]:
            return type(k).__name__, k

        assert sorted(ds.keys(), key=order) == sorted(ss.keys(), key=order) and len(ds) == len(ss)
        for key in keys:
            if ds.contains(key):
                assert [x.rank for x in ds.locations(key)] == [0]
                mine, model = ds.info(key), ss.info(key)
                fields = ("dtype", "shape", "nbytes", "prefix", "digest", "shared_by")
                assert [getattr(mine, f) for f in fields] == [getattr(model, f) for f in fields], (key, mine, model)

    # pressure with no peer: straight to disk; a protected block bigger than memory is refused
    with _opened(comm, host_capacity="2MiB", disk_path=str(scratch / "single")) as ds:
        fits = _host(ds).capacity_bytes // _footprint(_value("x").nbytes)
        many = [f"p/{i}" for i in range(2 * fits)]
        for key in many:
            ds.put(key, _value(key))
        assert _host(ds).blocks == fits, _host(ds)
        assert sum(1 for k in many if {x.tier for x in ds.locations(k)} == {TIER_DISK}) == fits
        assert all(_same(g, _value(k)) for g, k in zip(ds.get_many(many), many))
        _raises(CapacityError, lambda: ds.put("p/huge", np.zeros(3 * 1024 * KIB, np.uint8), is_prefix=True),
                "protected put larger than memory, one rank")
        assert not ds.contains("p/huge")


def _timeout(comm, scratch: Path) -> None:
    """A peer that stops answering: the caller gets PeerTimeout naming it after the timeout, and the store
    works again once the peer is back. The peer stays stuck until the caller has seen the PeerTimeout, so
    a timeout that never fired hangs the job (which the harness fails) instead of passing once the peer
    recovers; no clock of this test's decides anything."""
    import ctypes
    import re

    from cascade_kv.cluster.homes import home_of_key
    from cascade_kv.errors import PeerTimeout

    rank = comm.Get_rank()
    timeout = 1.0
    key = next(k for k in (f"stuck/{i}" for i in range(1000)) if home_of_key(k, 2) == 1)  # rank 0 must ask rank 1
    release = scratch / "release"  # a FIFO: rank 1 blocks reading it until rank 0 writes
    with _opened(comm, host_capacity="1MiB", timeout=timeout) as store:
        if rank == 1:
            store.put(key, _value(key))
            os.mkfifo(release)
            fd = os.open(release, os.O_RDWR)  # read-write: opening does not wait for a writer
        store.barrier()
        if rank == 1:
            comm.send("stuck", dest=0)
            # Holding the GIL in C (a PyDLL call does not release it) stops this rank's service thread from
            # answering, as a rank stuck in a long native call would; the read returns when rank 0 writes.
            got = ctypes.PyDLL(None, use_errno=True).read(fd, ctypes.create_string_buffer(1), 1)
            os.close(fd)
            assert got == 1, f"rank 1: read of the release FIFO returned {got} (errno {ctypes.get_errno()})"
        else:
            assert comm.recv(source=1) == "stuck"
            e = _raises(PeerTimeout, lambda: store.get(key), "get while the key's home is stuck")
            assert isinstance(e, TimeoutError) and "rank 1" in str(e), e
            # the wait the service measured (its own monotonic clock): it gave up no earlier than the timeout
            waited = re.search(r"after (\d+\.\d+) s", str(e))
            assert waited and float(waited[1]) >= timeout, f"PeerTimeout before the {timeout} s timeout: {e}"
            print(f"rank 0: PeerTimeout: {e}", flush=True)
            fd = os.open(release, os.O_WRONLY)  # rank 1 holds it open for reading: does not wait
            os.write(fd, b"!")
            os.close(fd)
        comm.Barrier()  # not store.barrier(): that one is bounded by the same 1 s, and rank 1 was stuck
        assert _same(store.get(key), _value(key)), f"rank {rank}: get after the peer came back"
        store.barrier()


SCENARIOS: dict[str, list[Callable[..., None]]] = {
    "global": [_visibility, _dedup, _no_dedup, _threads, _cold],
    "pressure": [_spill, _churn, _protected, _promotion],
    "disk_reuse": [_disk_reuse, _put_delete_race],
    "errors": [_bad_input, _close],
    "comm_self": [_store_per_rank],
    "single": [_single],
    "timeout": [_timeout],
}


def _phases(names: str) -> list[tuple[str, Callable[..., None]]]:
    """The phases named (scenarios or single phases, comma-separated), in order."""
    phases = {f.__name__.lstrip("_"): f for fs in SCENARIOS.values() for f in fs}
    return [(f.__name__.lstrip("_"), f) for name in names.split(",")
            for f in (SCENARIOS[name] if name in SCENARIOS else [phases[name]])]


if __name__ == "__main__":
    from mpi_program import run_phases  # this file's folder is on sys.path when it runs as a program

    run_phases(_phases(sys.argv[1]), prefix="cascade-store-test-")
