"""Reopening a damaged or unusual directory: a failed open changes nothing, damage is skipped and
reported (never an AssertionError, never a deleted block file), files are private, temp files safe."""
from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cascade_kv import CascadeConfig, IntegrityError, InvalidArgumentType, StorageError, Store
from cascade_kv import catalog as catalog_module
from cascade_kv.tiers import DiskTier

from .conftest import HOST, KIB, block, same

TITLED = np.dtype({"names": ["k", "v"], "formats": ["<f2", "<f2"], "titles": ["key half", "value half"]})


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every entry under ``root``: its mode and (for a file) a hash of its bytes."""
    out = {".": (os.lstat(root).st_mode, "")}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            st_ = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st_.st_mode) else ""
            out[str(p.relative_to(root))] = (st_.st_mode, digest)
    return out


def block_files(root: Path) -> set[str]:
    """Names of the block files under blocks/ and quarantine/ (quarantined ones carry a suffix)."""
    names = {p.name for p in (root / "blocks").rglob("*") if p.is_file()}
    names |= {p.name.split(".")[0] for p in (root / "quarantine").glob("*") if p.is_file()} \
        if (root / "quarantine").exists() else set()
    return names


def open_store(disk: Path, **kw: object) -> Store:
    return Store(CascadeConfig(host_capacity=HOST, disk_path=disk, persist=True, **kw))  # type: ignore[arg-type]


def fill(disk: Path, n: int = 6) -> dict[str, np.ndarray]:
    vals = {f"k{i}": block(2 * KIB, seed=i) for i in range(n)}
    vals["titled"] = block(2 * KIB, seed=99, dtype=TITLED)
    with open_store(disk) as s:
        for k, v in vals.items():
            s.put(k, v, is_prefix=k == "k0")
    return vals


# -- item 1: a failed open changes nothing ----------------------------------------------------
def test_a_titled_dtype_survives_reopen(disk_dir: Path):
    vals = fill(disk_dir)
    with open_store(disk_dir) as s:
        got = s.get("titled")
        assert same(got, vals["titled"]) and got.dtype.fields["key half"][2] == "key half"
        assert s.recovery is not None and s.recovery.clean and s.recovery.keys == len(vals)


def test_a_failed_open_changes_no_file_and_gc_writes_nothing(disk_dir: Path, monkeypatch: pytest.MonkeyPatch):
    vals = fill(disk_dir)
    before = tree(disk_dir)

    def broken(self: DiskTier, block_id: bytes, expected: int | None = None) -> int | None:
        raise RuntimeError("injected failure in the read phase")

    monkeypatch.setattr(DiskTier, "adopt", broken)
    with pytest.raises(RuntimeError, match="injected"):
        open_store(disk_dir)
    gc.collect()  # a half-built store's __del__ must not write either
    assert tree(disk_dir) == before
    monkeypatch.undo()
    with open_store(disk_dir) as s:
        assert sorted(s.keys()) == sorted(vals) and all(same(s.get(k), v) for k, v in vals.items())


def test_a_full_disk_at_open_changes_no_file_and_appends_go_on(disk_dir: Path, monkeypatch: pytest.MonkeyPatch):
    vals = fill(disk_dir)
    before = tree(disk_dir)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for name in ("write", "fsync", "replace"):
        monkeypatch.setattr(os, name, full)
    s = open_store(disk_dir)  # compaction is optional: the open succeeds without it
    monkeypatch.undo()
    try:
        assert tree(disk_dir) == before
        assert s.recovery is not None and not s.recovery.compacted
        assert sorted(s.keys()) == sorted(vals)
        s.put("later", block(seed=50))  # appended to the old journal
    finally:
        s.close()
    with open_store(disk_dir) as s:
        assert sorted(s.keys()) == sorted([*vals, "later"]) and same(s.get("later"), block(seed=50))


def test_a_refused_open_changes_no_file(disk_dir: Path):
    fill(disk_dir)
    journal = disk_dir / "journal.log"
    # a legacy (v1) journal damaged in its middle cannot be resynchronised: the open refuses
    body = json.dumps({"op": "del", "k": {"s": "k1"}}).encode()
    rec = struct.pack("<II", len(body), zlib.crc32(body)) + body
    journal.write_bytes(rec[:-1] + b"X" + rec)
    before = tree(disk_dir)
    with pytest.raises(IntegrityError, match="offset 0"):
        open_store(disk_dir)
    gc.collect()
    assert tree(disk_dir) == before


def test_a_v1_journal_opens(disk_dir: Path):
    vals = fill(disk_dir)
    journal = disk_dir / "journal.log"
    state = catalog_module.Journal(journal).read().state
    v1 = b""
    for r in state.values():  # what the previous release wrote: <u32 len><u32 crc32><json>, descr dtypes
        if r.dtype.names is not None and any(len(f) > 2 for f in r.dtype.fields.values()):
            continue  # titles were what v1 could not reload
        body = json.dumps({"op": "put", "k": {"s": r.key}, "id": r.block_id.hex(), "n": r.nbytes,
                           "dt": np.lib.format.dtype_to_descr(r.dtype), "sh": list(r.shape), "p": r.prefix},
                          separators=(",", ":")).encode()
        v1 += struct.pack("<II", len(body), zlib.crc32(body)) + body
    journal.write_bytes(v1)
    with open_store(disk_dir) as s:
        assert s.recovery is not None and s.recovery.journal_version == 1
        assert sorted(s.keys()) == sorted(k for k in vals if k != "titled")
        assert all(same(s.get(k), vals[k]) for k in s.keys()) and s.info("k0").prefix
    assert catalog_module.Journal(journal).read().version == 3


# -- item 2: every dtype put accepts, it reloads --------------------------------------------
def titled_dtypes() -> st.SearchStrategy[np.dtype]:
    @st.composite
    def make(draw: st.DrawFn) -> np.dtype:
        n = draw(st.integers(1, 3))
        names = [f"f{i}" for i in range(n)]
        formats = [draw(hnp.scalar_dtypes().filter(lambda d: not d.hasobject)) for _ in range(n)]
        titles = [draw(st.one_of(st.none(), st.text("abc XYZ", min_size=1, max_size=4).map(lambda t, i=i: f"{t}#{i}")))
                  for i in range(n)]
        overlap = draw(st.booleans())
        offsets = [0] * n if overlap else list(np.cumsum([0] + [f.itemsize for f in formats[:-1]]))
        itemsize = max(o + f.itemsize for o, f in zip(offsets, formats)) + draw(st.integers(0, 3))
        meta = draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.integers() | st.text(max_size=3),
                                                          max_size=2)))
        dt = np.dtype({"names": names, "formats": formats, "offsets": [int(o) for o in offsets],
                       "titles": titles, "itemsize": itemsize})
        return np.dtype(dt, metadata=meta) if meta else dt
    return make()


ANY_DTYPE = st.one_of(hnp.nested_dtypes(), hnp.array_dtypes(allow_subarrays=True), titled_dtypes()).filter(
    lambda d: not d.hasobject and 0 < d.itemsize <= 256)


def exact(a: np.dtype, b: np.dtype) -> bool:
    if a != b or a.metadata != b.metadata or a.type is not b.type or a.isalignedstruct != b.isalignedstruct:
        return False
    if a.names is not None:
        return a.names == b.names and all(exact(a.fields[n][0], b.fields[n][0]) and a.fields[n][1:] == b.fields[n][1:]
                                          for n in a.names)
    return a.subdtype is None or (a.subdtype[1] == b.subdtype[1] and exact(a.subdtype[0], b.subdtype[0]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=ANY_DTYPE)
def test_every_dtype_put_accepts_reloads_exactly(tmp_path: Path, dtype: np.dtype):
    disk = tmp_path / "hyp"
    shutil.rmtree(disk, ignore_errors=True)  # hypothesis reuses tmp_path across examples
    value = np.frombuffer(np.random.default_rng(1).bytes(dtype.itemsize * 3), dtype=dtype)
    with open_store(disk) as s:
        try:
            s.put("v", value)
        except TypeError:  # refused up front is the other allowed outcome: then nothing changed
            assert "v" not in s
            return
    with open_store(disk) as s:
        got = s.get("v")
        assert exact(got.dtype, value.dtype) and got.tobytes() == value.tobytes()


def test_a_dtype_the_journal_cannot_record_is_refused_before_anything_changes(disk_dir: Path):
    with open_store(disk_dir) as s:
        s.put("a", block(seed=1))
        before = tree(disk_dir)
        odd = block(seed=2).view(np.dtype("u1", metadata={"t": (1, 2)}))
        with pytest.raises(InvalidArgumentType, match="put"):  # in the family, and a TypeError
            s.put_many(["a", "b"], [block(seed=3), odd])
        assert s.keys() == ["a"] and same(s.get("a"), block(seed=1)) and tree(disk_dir) == before
    with Store(CascadeConfig(host_capacity=HOST, disk_path=disk_dir / "scratch")) as s:
        s.put("b", odd)  # without persist there is nothing to record: accepted


# -- item 3: a damaged block file at open ------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "grown", "directory"])
def test_a_damaged_block_file_at_open_is_quarantined_and_reported(disk_dir: Path, damage: str):
    vals = fill(disk_dir)
    with open_store(disk_dir) as s:
        path = s.tiers[1].path(bytes.fromhex(s.info("k3").digest))
    if damage == "truncated":
        os.truncate(path, 100)
    elif damage == "grown":
        with open(path, "ab") as f:
            f.write(b"more")
    else:
        path.unlink()
        path.mkdir()
    with open_store(disk_dir) as s:
        r = s.recovery
        assert r is not None and r.lost_keys == ("k3",) and r.read_whole
        assert len(r.quarantined) == 1 and r.quarantined[0].startswith(path.name)
        assert sorted(s.keys()) == sorted(k for k in vals if k != "k3")
        assert s.stats().quarantined == 1
    assert (disk_dir / "quarantine" / r.quarantined[0]).exists() and not path.exists()


def test_recovery_behaves_the_same_under_python_O(disk_dir: Path):
    fill(disk_dir)
    with open_store(disk_dir) as s:
        path = s.tiers[1].path(bytes.fromhex(s.info("k2").digest))
    os.truncate(path, 1)
    code = textwrap.dedent(f"""
        from cascade_kv import CascadeConfig, Store
        with Store(CascadeConfig(host_capacity=65536, disk_path={str(disk_dir)!r}, persist=True)) as s:
            print(s.recovery.lost_keys, len(s.recovery.quarantined), len(s))
    """)
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["('k2',)", "1", "6"]


# -- item 4: a flipped byte in the journal -------------------------------------------------
def churn(live: Path, disk: Path) -> tuple[dict[str, tuple[np.ndarray, bool]], list[tuple[int, int, str]]]:
    """``disk``: a copy of ``live`` taken before close (which compacts), as a kill would leave it: a journal of
    puts, overwrites, deletes, protects and unprotects of several keys. The true final ``key -> (value,
    protected)``, and (start, end, key) of each record."""
    with open_store(live) as s:
        for i in range(4):
            s.put(f"k{i}", block(2 * KIB, seed=i))
        s.put("k1", block(2 * KIB, seed=11))  # overwrite
        s.protect("k2")
        s.delete("k0")
        s.put("k3", block(2 * KIB, seed=13), is_prefix=True)  # overwrite, protected
        s.unprotect("k3")
        s.protect("k1")
        s.delete("k2")
        s.put("k0", block(2 * KIB, seed=20))  # deleted, put again
        s.unprotect("k1")
        s.protect("k0")
        final = {k: (s.get(k), s.info(k).prefix) for k in s.keys()}
        shutil.copytree(live, disk)
    replay = catalog_module.Journal(disk / "journal.log").read()
    assert {k: r.prefix for k, r in replay.state.items()} == {k: p for k, (_, p) in final.items()}
    data = (disk / "journal.log").read_bytes()
    spans, off = [], 0
    while off < len(data):
        length = struct.unpack_from("<I", data, off + 4)[0]
        payload = json.loads(data[off + 24:off + 24 + length])
        spans.append((off, off + 24 + length, payload["k"]["s"]))
        off += 24 + length
    return final, spans


def test_a_flipped_journal_byte_repairs_or_drops_exactly_its_key_and_deletes_no_block_file(tmp_path: Path):
    pristine = tmp_path / "pristine"
    final, spans = churn(tmp_path / "live", pristine)
    data = (pristine / "journal.log").read_bytes()
    files = block_files(pristine)
    work = tmp_path / "work"
    tried = repaired = dropped = 0
    # every header byte of two records, and a spread of the rest (~130 opens)
    offsets = sorted({*range(spans[2][0], spans[2][0] + 24), *range(spans[-1][0], spans[-1][0] + 24),
                      *range(0, len(data), max(1, len(data) // 80))})
    for off in offsets:
        start, end, key = next(span for span in spans if span[0] <= off < span[1])
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work)
        broken = bytearray(data)
        broken[off] ^= 0x5A
        (work / "journal.log").write_bytes(bytes(broken))
        tried += 1
        with open_store(work) as s:
            r = s.recovery
            assert r is not None and r.torn_tail is None and not r.unidentified, off
            got = {k: (s.get(k), s.info(k).prefix) for k in s.keys()}
            # never stale: every key is as it truly is; only the damaged record's key may be missing
            assert all(same(v, final[k][0]) and p == final[k][1] for k, (v, p) in got.items()), off
            if off - start < 24:
                assert r.repaired == (start,) and r.read_whole and set(got) == set(final), off
                repaired += 1
            else:
                assert r.damaged == ((start, end - start),) and set(final) - set(got) <= {key}, off
                # reported by name (a damaged delete's key too: replay cannot know it is gone for good)
                assert set(final) - set(got) <= set(r.journal_lost_keys) <= {key}, off
                dropped += key not in got
            assert not r.clean
        assert block_files(work) >= files, off  # kept in blocks/ or quarantine/, never deleted
    assert tried > 100 and repaired >= 48 and dropped > 0


def test_orphans_of_a_clean_journal_are_removed(disk_dir: Path):
    fill(disk_dir)
    orphan = disk_dir / "blocks" / "07" / ("07" * 32)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"\2" * 100)
    with open_store(disk_dir) as s:
        assert s.recovery is not None and s.recovery.orphans_removed == 1 and s.recovery.orphans_kept == 0
    assert not orphan.exists()


# -- items 7, 9, 10: LOCK errors, permissions, temp files ------------------------------------
def test_a_read_only_lock_file_raises_storage_error(disk_dir: Path, monkeypatch: pytest.MonkeyPatch):
    fill(disk_dir)
    before = tree(disk_dir)
    real_open = os.open

    def erofs(path: object, *args: object, **kwargs: object) -> int:
        if str(path).endswith("LOCK"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", erofs)
    with pytest.raises(StorageError) as info:
        open_store(disk_dir)
    monkeypatch.undo()
    assert info.value.errno == errno.EROFS and "LOCK" in str(info.value)
    assert tree(disk_dir) == before


@pytest.mark.parametrize(("group_access", "file_mode", "dir_mode"), [(False, 0o600, 0o700), (True, 0o640, 0o750)])
@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_files_are_private_by_default(tmp_path: Path, group_access: bool, file_mode: int, dir_mode: int,
                                      umask: int):
    disk = tmp_path / "new" / "disk"
    old = os.umask(umask)
    try:
        with open_store(disk, group_access=group_access) as s:
            s.put("a", block(seed=1))
            s.put("b", block(seed=2))
            s.delete("b")
            s.tiers[1].quarantine_untracked(bytes.fromhex(s.info("a").digest))  # makes quarantine/
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE(os.lstat(p).st_mode) for p in [disk.parent, disk, *disk.rglob("*")]}
    assert {p for p, m in modes.items() if p.is_dir() and m != dir_mode} == set()
    assert {p for p, m in modes.items() if p.is_file() and m != file_mode} == set()
    assert {p.name for p in disk.iterdir()} >= {"blocks", "tmp", "quarantine", "journal.log", "FORMAT", "LOCK"}


def test_existing_directories_keep_their_mode(tmp_path: Path):
    disk = tmp_path / "shared"
    disk.mkdir()
    os.chmod(disk, 0o2770)  # a site's setgid group directory
    with open_store(disk) as s:
        s.put("a", block(seed=1))
    assert stat.S_IMODE(os.stat(disk).st_mode) == 0o2770


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file whatever its mode")
def test_another_user_cannot_read_blocks(disk_dir: Path):  # pragma: no cover - needs a non-root run
    fill(disk_dir)
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in disk_dir.rglob("*") if p.is_file())


def test_links_planted_in_tmp_are_never_written_through(disk_dir: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    with open_store(disk_dir) as s:
        s.put("warm", block(seed=0))
        tmp = disk_dir / "tmp"
        for i in range(4):  # the names the previous release used, and a few others
            digest = hashlib.sha256(str(i).encode()).hexdigest()
            os.symlink(outside, tmp / f"{digest}.{os.getpid()}.{i}.tmp")
        for i in range(8):
            s.put(f"k{i}", block(seed=10 + i))
        assert all(same(s.get(f"k{i}"), block(seed=10 + i)) for i in range(8))
    assert outside.read_bytes() == b"precious"


def test_tmp_that_is_a_link_is_refused(disk_dir: Path, tmp_path: Path):
    fill(disk_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(disk_dir / "tmp")
    os.symlink(elsewhere, disk_dir / "tmp")
    before = tree(disk_dir)
    with pytest.raises(StorageError):
        open_store(disk_dir)
    assert tree(disk_dir) == before and list(elsewhere.iterdir()) == []
