"""DiskTier: the conformance suite in each I/O mode, plus the file format, atomic writes,
integrity checks and crash recovery that only a directory of block files has."""
from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import cascade_kv.tiers.disk as disk_module
from cascade_kv.errors import CascadeError, IntegrityError, StorageError
from cascade_kv.hashing import Hasher
from cascade_kv.ids import BlockId, block_name
from cascade_kv.tiers import DiskTier

from .conformance import TierConformance, block_id, load, store

MakeDisk = Callable[..., DiskTier]


def o_direct_supported(directory: Path) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = directory / ".o_direct_probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


class TestDiskTier(TierConformance):
    o_direct = False
    verify = "auto"
    durable = False

    def make_tier(self, capacity: int) -> DiskTier:
        root = self.tmp_path / f"disk{len(self._opened)}"
        root.mkdir()
        if self.o_direct and not o_direct_supported(root):
            pytest.skip("O_DIRECT is not supported on this file system")
        return DiskTier(root, self.hasher, capacity=capacity, o_direct=self.o_direct,
                        verify=self.verify, durable=self.durable)


class TestDiskTierODirect(TestDiskTier):
    o_direct = True


class TestDiskTierVerifyAlways(TestDiskTier):
    verify = "always"


class TestDiskTierDurableSha256(TestDiskTier):
    durable = True
    hash_algorithm = "sha256"


# -- helpers ----------------------------------------------------------------------------------
def settle(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on the tier's clock runs a minute ahead of the file system's: every file looks settled at its
    verification (past the racy-ctime window, even the 2 s one of whole-second timestamps), as after a pause,
    without waiting one out (a sleep of a little over 100 ms was not enough on a loaded machine)."""
    monkeypatch.setattr(disk_module, "time", SimpleNamespace(time_ns=lambda: time.time_ns() + 60 * 10**9))


def flip_byte(path: Path, offset: int = 0) -> None:
    """Corrupt one byte in place (same inode, same size)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def files_under(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file()) if d.exists() else []


# -- format -----------------------------------------------------------------------------------
def test_traits():
    t = DiskTier.traits
    assert (t.name, t.memory, t.persistent, t.addressable) == ("disk", False, True, False)


def test_layout_is_blocks_ab_hex(make_disk: MakeDisk, hasher: Hasher, rng: np.random.Generator):
    disk = make_disk()
    data = rng.bytes(1000)
    bid = block_id(hasher, data)
    assert disk.allocate(bid, len(data))
    assert files_under(disk.root / "blocks") == []  # allocating writes nothing
    disk.write(bid, memoryview(data))
    name = bid.hex()
    expected = disk.root / "blocks" / name[:2] / name
    assert disk.path(bid) == expected
    assert files_under(disk.root / "blocks") == [expected]
    assert expected.read_bytes() == data  # raw bytes, nothing else
    assert files_under(disk.root / "tmp") == []


def test_serial_block_id_file_name(make_disk: MakeDisk, hasher: Hasher):
    disk = make_disk()
    digest = block_id(hasher, b"payload")
    bid = BlockId(digest + (7).to_bytes(8, "big"))
    assert disk.allocate(bid, 7)
    disk.write(bid, memoryview(b"payload"))
    path = disk.path(bid)
    assert path.name == f"{digest.hex()}-{(7).to_bytes(8, 'big').hex()}" == block_name(bid)
    assert path.parent.name == digest.hex()[:2]
    assert load(disk, bid) == b"payload"  # verified against the digest part


def test_free_removes_the_file(make_disk: MakeDisk, hasher: Hasher):
    disk = make_disk()
    bid = store(disk, hasher, b"gone soon")
    path = disk.path(bid)
    assert path.exists()
    disk.free(bid)
    assert not path.exists()


def test_free_of_never_written_block(make_disk: MakeDisk, hasher: Hasher):
    disk = make_disk()
    bid = block_id(hasher, b"never written")
    assert disk.allocate(bid, 13)
    disk.free(bid)
    assert not disk.contains(bid) and disk.used == 0


def test_unlimited_capacity(make_disk: MakeDisk, hasher: Hasher):
    disk = make_disk()
    assert disk.capacity is None and disk.fits(1 << 60)
    assert disk.allocate(block_id(hasher, b"huge"), 1 << 50)  # only bookkeeping until written
    assert disk.used == 1 << 50


def test_root_that_cannot_be_created_raises_storage_error(tmp_path: Path, hasher: Hasher):
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"")
    with pytest.raises(StorageError) as info:
        DiskTier(blocker / "disk", hasher)
    assert isinstance(info.value, OSError) and info.value.errno is not None


@pytest.mark.parametrize("o_direct", [False, True])
def test_block_larger_than_bounce_buffer(make_disk: MakeDisk, hasher: Hasher, rng: np.random.Generator,
                                         tmp_path: Path, o_direct: bool):
    if o_direct and not o_direct_supported(tmp_path):
        pytest.skip("O_DIRECT is not supported on this file system")
    disk = make_disk(o_direct=o_direct)
    data = rng.bytes((8 << 20) + 4099)  # more than one O_DIRECT staging buffer, unaligned tail
    bid = store(disk, hasher, data)
    assert disk.path(bid).stat().st_size == len(data)  # the padding of the last chunk is gone
    assert load(disk, bid) == data


# -- atomic writes ----------------------------------------------------------------------------
@pytest.mark.parametrize("o_direct", [False, True])
def test_write_is_invisible_until_complete(make_disk: MakeDisk, hasher: Hasher, rng: np.random.Generator,
                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path, o_direct: bool):
    if o_direct and not o_direct_supported(tmp_path):
        pytest.skip("O_DIRECT is not supported on this file system")
    disk = make_disk(o_direct=o_direct)
    data = rng.bytes(10_000)
    bid = block_id(hasher, data)
    assert disk.allocate(bid, len(data))
    seen: list[tuple[list[Path], int]] = []
    real_write = os.write

    def spy(fd: int, buf: memoryview) -> int:
        seen.append((files_under(disk.root / "blocks"), len(files_under(disk.root / "tmp"))))
        return real_write(fd, buf)

    monkeypatch.setattr(os, "write", spy)
    disk.write(bid, memoryview(data))
    monkeypatch.undo()
    assert seen, "the write did not go through os.write"
    assert all(blocks == [] and n_tmp == 1 for blocks, n_tmp in seen)  # staged in tmp/, nothing in blocks/
    assert files_under(disk.root / "blocks") == [disk.path(bid)]
    assert files_under(disk.root / "tmp") == []


@pytest.mark.parametrize("o_direct", [False, True])
def test_failed_write_leaves_no_file(make_disk: MakeDisk, hasher: Hasher, rng: np.random.Generator,
                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path, o_direct: bool):
    if o_direct and not o_direct_supported(tmp_path):
        pytest.skip("O_DIRECT is not supported on this file system")
    disk = make_disk(o_direct=o_direct)
    data = rng.bytes(10_000)
    bid = block_id(hasher, data)
    assert disk.allocate(bid, len(data))

    def full(fd: int, buf: memoryview) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageError) as info:
        disk.write(bid, memoryview(data))
    monkeypatch.undo()
    err = info.value
    assert isinstance(err, OSError) and isinstance(err, CascadeError)
    assert err.errno == errno.ENOSPC
    assert bid.hex() in str(err)  # the message names the file
    assert files_under(disk.root / "blocks") == []
    assert files_under(disk.root / "tmp") == []
    # the allocation stands; once the disk has room the same block can be written
    disk.write(bid, memoryview(data))
    assert load(disk, bid) == data


def test_failed_fsync_leaves_no_file(make_disk: MakeDisk, hasher: Hasher, monkeypatch: pytest.MonkeyPatch):
    disk = make_disk(durable=True)
    bid = block_id(hasher, b"durable")
    assert disk.allocate(bid, 7)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(StorageError) as info:
        disk.write(bid, memoryview(b"durable"))
    monkeypatch.undo()
    assert info.value.errno == errno.EIO
    assert files_under(disk.root / "blocks") == [] and files_under(disk.root / "tmp") == []


def test_durable_writes_fsync_file_and_directory(make_disk: MakeDisk, hasher: Hasher,
                                                 monkeypatch: pytest.MonkeyPatch):
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    plain = make_disk()
    store(plain, hasher, b"not durable")
    assert synced == []
    durable = make_disk(durable=True)
    bid = store(durable, hasher, b"durable")
    assert len(synced) >= 2  # the file, then the directory entry of the rename
    monkeypatch.undo()
    assert load(durable, bid) == b"durable"


# -- integrity --------------------------------------------------------------------------------
@pytest.mark.parametrize("verify", ["auto", "always"])
def test_corrupted_file_raises_integrity_error(make_disk: MakeDisk, hasher: Hasher,
                                               rng: np.random.Generator, verify: str):
    disk = make_disk(verify=verify)
    bid = store(disk, hasher, rng.bytes(5000))
    flip_byte(disk.path(bid), 4321)
    with pytest.raises(IntegrityError) as info:
        load(disk, bid)
    assert isinstance(info.value, ValueError)
    with pytest.raises(IntegrityError):
        load(disk, bid)  # still bad: a failed check is never remembered as a pass
    assert disk.contains(bid)  # the store decides what to do with it (quarantine)


def test_corruption_after_trusted_reads_is_detected(make_disk: MakeDisk, hasher: Hasher,
                                                    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch):
    disk = make_disk(verify="auto")
    data = rng.bytes(5000)
    bid = store(disk, hasher, data)
    settle(monkeypatch)
    assert load(disk, bid) == data
    assert load(disk, bid) == data
    assert disk.hashed_reads == 1  # the second read trusted the unchanged file
    flip_byte(disk.path(bid), 0)  # changes mtime/ctime: the file is no longer the verified one
    with pytest.raises(IntegrityError):
        load(disk, bid)


def test_corruption_right_after_a_read_is_detected(make_disk: MakeDisk, hasher: Hasher,
                                                   rng: np.random.Generator):
    # no pause anywhere: the corrupting write may land in the same timestamp tick as the
    # verification, which is what the racy-ctime rule is for
    disk = make_disk(verify="auto")
    data = rng.bytes(5000)
    bid = store(disk, hasher, data)
    assert load(disk, bid) == data
    flip_byte(disk.path(bid), 100)
    with pytest.raises(IntegrityError):
        load(disk, bid)


def test_file_replaced_by_same_size_file_is_detected(make_disk: MakeDisk, hasher: Hasher,
                                                     rng: np.random.Generator, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    disk = make_disk(verify="auto")
    data = rng.bytes(3000)
    bid = store(disk, hasher, data)
    settle(monkeypatch)
    assert load(disk, bid) == data
    impostor = tmp_path / "impostor"
    impostor.write_bytes(rng.bytes(3000))
    os.replace(impostor, disk.path(bid))  # a new inode under the same name
    with pytest.raises(IntegrityError):
        load(disk, bid)


def test_racy_ctime_is_hashed_again(make_disk: MakeDisk, hasher: Hasher, rng: np.random.Generator,
                                    monkeypatch: pytest.MonkeyPatch):
    """A file verified within 100 ms of its ctime is hashed on the next read too; one verified later
    is trusted. The tier's clock is pinned so the test does not depend on how fast it runs."""
    disk = make_disk(verify="auto")
    data = rng.bytes(2000)
    bid = store(disk, hasher, data)
    ctime_ns = disk.path(bid).stat().st_ctime_ns
    clock = SimpleNamespace(time_ns=lambda: ctime_ns + 50_000_000)
    monkeypatch.setattr(disk_module, "time", clock)
    assert load(disk, bid) == data
    assert load(disk, bid) == data
    assert disk.hashed_reads == 2  # verified 50 ms after the last change: not trusted yet
    clock.time_ns = lambda: ctime_ns + 1_000_000_000
    assert load(disk, bid) == data
    assert disk.hashed_reads == 3  # verified 1 s after the last change ...
    assert load(disk, bid) == data
    assert load(disk, bid) == data
    assert disk.hashed_reads == 3  # ... so later reads of the unchanged file trust it


def test_changed_file_is_hashed_even_when_its_ctime_looks_old(make_disk: MakeDisk, hasher: Hasher,
                                                               rng: np.random.Generator,
                                                               monkeypatch: pytest.MonkeyPatch):
    """The file's identity, not its age, decides trust: a change stamped with a lagging clock (another
    Lustre client's, say) is caught because the inode/mtime/ctime no longer match the verified ones."""
    disk = make_disk(verify="auto")
    data = rng.bytes(2000)
    bid = store(disk, hasher, data)
    settle(monkeypatch)
    assert load(disk, bid) == data  # verified "a minute from now": every ctime looks old
    assert load(disk, bid) == data
    assert disk.hashed_reads == 1
    flip_byte(disk.path(bid), 5)
    with pytest.raises(IntegrityError):
        load(disk, bid)


@pytest.mark.parametrize("verify", ["auto", "always"])
@pytest.mark.parametrize("new_size", [0, 2999, 3001])
def test_wrong_size_file_raises_integrity_error(make_disk: MakeDisk, hasher: Hasher, rng: np.random.Generator,
                                                verify: str, new_size: int):
    disk = make_disk(verify=verify)
    bid = store(disk, hasher, rng.bytes(3000))
    load(disk, bid)
    os.truncate(disk.path(bid), new_size)  # truncated (or grown by a stray append)
    with pytest.raises(IntegrityError):
        load(disk, bid)


@pytest.mark.parametrize("verify", ["auto", "always"])
def test_missing_file_raises_integrity_error(make_disk: MakeDisk, hasher: Hasher, verify: str):
    disk = make_disk(verify=verify)
    bid = store(disk, hasher, b"soon missing")
    disk.path(bid).unlink()
    with pytest.raises(IntegrityError):
        load(disk, bid)
    never_written = block_id(hasher, b"never written")
    assert disk.allocate(never_written, 13)
    with pytest.raises(IntegrityError):
        disk.read_into(never_written, memoryview(bytearray(13)))


def test_hashed_reads_auto_trusts_an_unchanged_settled_file(make_disk: MakeDisk, hasher: Hasher,
                                                             rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch):
    disk = make_disk(verify="auto")
    data = rng.bytes(4000)
    bid = store(disk, hasher, data)
    settle(monkeypatch)
    for _ in range(3):
        assert load(disk, bid) == data
    assert disk.hashed_reads == 1


def test_hashed_reads_always_hashes_every_read(make_disk: MakeDisk, hasher: Hasher,
                                               rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch):
    disk = make_disk(verify="always")
    data = rng.bytes(4000)
    bid = store(disk, hasher, data)
    settle(monkeypatch)
    for i in range(3):
        assert load(disk, bid) == data
        assert disk.hashed_reads == i + 1


def test_rewritten_block_is_hashed_again(make_disk: MakeDisk, hasher: Hasher, rng: np.random.Generator,
                                         monkeypatch: pytest.MonkeyPatch):
    disk = make_disk(verify="auto")
    data = rng.bytes(4000)
    bid = store(disk, hasher, data)
    settle(monkeypatch)
    load(disk, bid)
    disk.free(bid)
    store(disk, hasher, data)
    load(disk, bid)
    assert disk.hashed_reads == 2  # freeing forgot the verification; the new file was checked


# -- quarantine and recovery ------------------------------------------------------------------
def test_quarantine_moves_the_file_aside(make_disk: MakeDisk, hasher: Hasher, rng: np.random.Generator):
    disk = make_disk()
    keep = store(disk, hasher, rng.bytes(100))
    bad = store(disk, hasher, rng.bytes(300))
    flip_byte(disk.path(bad), 7)
    corrupted = disk.path(bad).read_bytes()
    with pytest.raises(IntegrityError):
        load(disk, bad)
    dst = disk.quarantine(bad)
    assert dst is not None and dst.parent == disk.root / "quarantine"
    assert dst.name.startswith(bad.hex())
    assert dst.read_bytes() == corrupted  # kept for inspection, byte for byte
    assert not disk.path(bad).exists()
    assert not disk.contains(bad) and disk.used == 100
    assert sorted(disk.block_ids()) == [keep]
    assert list(disk.scan()) == [keep]


def test_quarantine_of_missing_file(make_disk: MakeDisk, hasher: Hasher):
    disk = make_disk()
    bid = store(disk, hasher, b"vanishing")
    disk.path(bid).unlink()
    assert disk.quarantine(bid) is None
    assert not disk.contains(bid) and disk.used == 0


def test_reopen_scan_and_adopt(make_disk: MakeDisk, hasher: Hasher, rng: np.random.Generator,
                               monkeypatch: pytest.MonkeyPatch):
    first = make_disk()
    blocks = {store(first, hasher, data): data for data in (rng.bytes(n) for n in (0, 10, 5000))}
    settle(monkeypatch)  # old files: if the first read were trusted, it would be for age alone
    reopened = make_disk()
    assert list(reopened.block_ids()) == [] and reopened.used == 0
    assert sorted(reopened.scan()) == sorted(blocks)
    for bid, data in blocks.items():
        assert reopened.adopt(bid) == len(data)
    assert reopened.used == sum(len(d) for d in blocks.values())
    assert sorted(reopened.block_ids()) == sorted(blocks)
    for bid, data in blocks.items():
        assert load(reopened, bid) == data
    assert reopened.hashed_reads == len(blocks)  # adopted files are not trusted: each was hashed
    assert reopened.adopt(block_id(hasher, b"no such file")) is None


def test_adopted_corrupt_file_is_caught(make_disk: MakeDisk, hasher: Hasher, rng: np.random.Generator,
                                        monkeypatch: pytest.MonkeyPatch):
    first = make_disk()
    bid = store(first, hasher, rng.bytes(700))
    flip_byte(first.path(bid), 3)
    settle(monkeypatch)
    reopened = make_disk()
    assert reopened.adopt(bid) == 700
    with pytest.raises(IntegrityError):
        load(reopened, bid)


def test_adopt_twice_counts_once(make_disk: MakeDisk, hasher: Hasher):
    first = make_disk()
    bid = store(first, hasher, b"twice")
    reopened = make_disk()
    assert reopened.adopt(bid) == 5
    assert reopened.adopt(bid) == 5
    assert reopened.used == 5


def test_scan_skips_files_that_are_not_blocks(make_disk: MakeDisk, hasher: Hasher):
    disk = make_disk()
    bid = store(disk, hasher, b"real block")
    blocks = disk.root / "blocks"
    (blocks / "README").write_text("a loose file, not a shard folder")
    (blocks / bid.hex()[:2] / "notes.txt").write_text("not hex")
    (blocks / bid.hex()[:2] / "abcd").write_bytes(b"hex, but not a digest")
    (blocks / bid.hex()[:2] / f"{bid.hex()}-0102").write_bytes(b"a serial of the wrong length")
    (disk.root / "tmp" / f"{bid.hex()}.123.456.tmp").write_bytes(b"leftover")
    assert list(disk.scan()) == [bid]


def test_remove_untracked(make_disk: MakeDisk, hasher: Hasher):
    first = make_disk()
    orphan = store(first, hasher, b"orphan")
    reopened = make_disk()
    assert list(reopened.scan()) == [orphan]
    reopened.remove_untracked(orphan)
    assert not first.path(orphan).exists()
    assert list(reopened.scan()) == []
    reopened.remove_untracked(orphan)  # already gone: nothing to do


def test_clean_tmp(make_disk: MakeDisk, hasher: Hasher):
    disk = make_disk()
    bid = store(disk, hasher, b"survivor")
    for i in range(3):
        (disk.root / "tmp" / f"leftover{i}.tmp").write_bytes(b"half a block")
    assert disk.clean_tmp() == 3
    assert files_under(disk.root / "tmp") == []
    assert disk.clean_tmp() == 0
    assert load(disk, bid) == b"survivor"  # finished blocks are not leftovers


def test_adopt_with_an_expected_size_does_not_track_a_damaged_file(make_disk: MakeDisk, hasher: Hasher):
    first = make_disk()
    bid = store(first, hasher, b"0123456789")
    os.truncate(first.path(bid), 4)
    reopened = make_disk()
    assert reopened.adopt(bid, 10) == 4 and not reopened.contains(bid)
    first.path(bid).unlink()
    first.path(bid).mkdir()
    assert reopened.adopt(bid) == -1 and not reopened.contains(bid)  # not a regular file


def test_remove_untracked_refuses_a_tracked_block_even_under_python_O(make_disk: MakeDisk, hasher: Hasher):
    disk = make_disk()
    bid = store(disk, hasher, b"live")
    with pytest.raises(ValueError):
        disk.remove_untracked(bid)
    assert load(disk, bid) == b"live"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_large_block_is_read_in_parts_right(make_disk: MakeDisk, hasher: Hasher, rng: np.random.Generator,
                                              monkeypatch: pytest.MonkeyPatch, threads: int):
    """Blocks of PARALLEL_MIN or more are read by several threads at once (page-aligned parts, the last one
    short): every byte must land where it belongs, and a read the file cuts short must still be caught."""
    import cascade_kv.memcopy as memcopy

    monkeypatch.setattr(memcopy, "_threads", lambda: threads)
    disk = make_disk(verify="always")  # every read hashed: a misplaced part fails the digest too
    data = rng.bytes(memcopy.PARALLEL_MIN + 5001)
    bid = store(disk, hasher, data)
    assert load(disk, bid) == data
    real = os.preadv

    def cut_short(fd: int, buffers: list, offset: int) -> int:  # the file ends half way while it is read
        end = len(data) // 2
        return 0 if offset >= end else real(fd, [buffers[0][:end - offset]], offset)

    monkeypatch.setattr(disk_module.os, "preadv", cut_short)
    with pytest.raises(IntegrityError, match="truncated while read"):
        load(disk, bid)
