"""The key journal: records round-trip, a torn tail is dropped, and load() compacts the file."""
from __future__ import annotations

import errno
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade_kv.catalog import (Journal, KeyRecord, decode_dtype, delete_record, encode_dtype, protect_record,
                                put_record)
from cascade_kv.errors import IntegrityError, StorageError
from cascade_kv.ids import BlockId, Key

DTYPES = [
    np.dtype(np.float16),
    np.dtype(">f2"),
    np.dtype(np.float32),
    np.dtype(np.int64),
    np.dtype(np.bool_),
    np.dtype(np.complex64),
    np.dtype("V7"),
    np.dtype("<U3"),
    np.dtype("M8[ns]"),
    np.dtype([("k", "<f2"), ("v", "<f2")]),
    np.dtype([("a", "<i4"), ("b", "<f8", (2, 3)), ("c", [("x", "u1"), ("y", ">i2")])]),
    np.dtype([("a", "u1"), ("b", "<i8")], align=True),  # padding between and after fields
]
SHAPES = [(), (0,), (3, 0, 2), (4,), (2, 3)]
F16 = np.dtype(np.float16)


def record(key: Key, i: int = 0, dtype: np.dtype = F16, shape: tuple[int, ...] = (4,),
           prefix: bool = False) -> KeyRecord:
    nbytes = dtype.itemsize * int(np.prod(shape))
    return KeyRecord(key, BlockId(bytes([i % 256]) * 32), nbytes, dtype, shape, prefix)


def reopen(path: Path) -> dict[Key, KeyRecord]:
    j = Journal(path)
    try:
        return j.load()
    finally:
        j.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "keys.journal"


@pytest.fixture
def journal(path: Path):
    j = Journal(path)
    assert j.load() == {}
    yield j
    j.close()


def test_load_of_missing_file_is_empty(path: Path):
    assert reopen(path) == {}
    assert path.exists() and path.read_bytes() == b""


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_put_round_trip(journal: Journal, path: Path, dtype: np.dtype, shape: tuple[int, ...]):
    rec = record("k", 1, dtype, shape, prefix=True)
    journal.append([put_record(rec)], sync=True)
    journal.close()
    state = reopen(path)
    assert state == {"k": rec}
    got = state["k"]
    assert got.dtype == dtype and got.dtype.itemsize == dtype.itemsize
    assert got.shape == shape and type(got.shape) is tuple


@pytest.mark.parametrize("key", ["", "plain", "ünïcödé ✓", b"", b"raw", bytes(range(256)), "a/b\n\"q\""],
                         ids=repr)
def test_keys_round_trip(journal: Journal, path: Path, key: Key):
    journal.append([put_record(record(key, 3))], sync=True)
    journal.close()
    state = reopen(path)
    assert list(state) == [key] and type(next(iter(state))) is type(key)


def test_str_and_bytes_keys_are_different_keys(journal: Journal, path: Path):
    journal.append([put_record(record("a", 1)), put_record(record(b"a", 2))], sync=True)
    journal.append([delete_record("a")], sync=False)
    journal.close()
    assert reopen(path) == {b"a": record(b"a", 2)}


def test_put_delete_protect_replay(journal: Journal, path: Path):
    journal.append([put_record(record("a", 1)), put_record(record("b", 2)), put_record(record(b"c", 3))],
                   sync=True)
    journal.append([put_record(record("a", 4, shape=(8,)))], sync=False)  # a later put replaces
    journal.append([delete_record("b"), protect_record(b"c", True)], sync=True)
    journal.append([protect_record("a", True), protect_record("a", False)], sync=True)
    journal.append([delete_record("never"), protect_record("never", True)], sync=True)  # no-ops
    journal.close()
    assert reopen(path) == {"a": record("a", 4, shape=(8,)), b"c": record(b"c", 3, prefix=True)}


def test_delete_then_put_again(journal: Journal, path: Path):
    journal.append([put_record(record("a", 1)), delete_record("a"), put_record(record("a", 2))], sync=True)
    journal.close()
    assert reopen(path) == {"a": record("a", 2)}


def test_append_nothing_is_a_no_op(journal: Journal, path: Path):
    journal.append([], sync=True)
    assert path.read_bytes() == b""


def test_appends_after_load_survive_the_next_load(path: Path):
    j = Journal(path)
    j.load()
    j.append([put_record(record("a", 1))], sync=True)
    j.close()
    j = Journal(path)
    assert j.load() == {"a": record("a", 1)}
    j.append([put_record(record("b", 2))], sync=True)
    j.close()
    assert reopen(path) == {"a": record("a", 1), "b": record("b", 2)}


# -- torn tails -------------------------------------------------------------------------------
def write_history(path: Path) -> tuple[bytes, list[int], list[dict[Key, KeyRecord]]]:
    """Journal a short history; its bytes, where each record ends, and the state after each record."""
    history = [
        (put_record(record("a", 1)), {"a": record("a", 1)}),
        (put_record(record(b"b", 2, np.dtype([("k", "<f2")]), ())),
         {"a": record("a", 1), b"b": record(b"b", 2, np.dtype([("k", "<f2")]), ())}),
        (protect_record("a", True),
         {"a": record("a", 1, prefix=True), b"b": record(b"b", 2, np.dtype([("k", "<f2")]), ())}),
        (delete_record(b"b"), {"a": record("a", 1, prefix=True)}),
        (put_record(record("c", 3, shape=(0,))), {"a": record("a", 1, prefix=True), "c": record("c", 3, shape=(0,))}),
    ]
    j = Journal(path)
    j.load()
    for rec, _ in history:
        j.append([rec], sync=False)
    j.close()
    ends, total = [], 0
    for rec, _ in history:
        total += len(rec)
        ends.append(total)
    return path.read_bytes(), ends, [state for _, state in history]


def expected_at(cut: int, ends: list[int], states: list[dict[Key, KeyRecord]]) -> dict[Key, KeyRecord]:
    complete = [s for end, s in zip(ends, states, strict=True) if end <= cut]
    return complete[-1] if complete else {}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_anywhere_keeps_every_complete_record(tmp_path: Path, data: st.DataObject):
    path = tmp_path / "torn.journal"
    path.unlink(missing_ok=True)  # hypothesis reuses tmp_path across examples
    full, ends, states = write_history(path)
    cut = data.draw(st.integers(0, len(full)), label="cut")
    path.write_bytes(full[:cut])
    assert reopen(path) == expected_at(cut, ends, states)


@pytest.mark.parametrize("garbage", [
    pytest.param(b"\x07", id="shorter-than-a-header"),
    pytest.param(b"\xff\xff\xff\x7f\x00\x00\x00\x00", id="length-never-written"),
    pytest.param(b"\x05\x00\x00\x00\xde\xad\xbe\xef{\"op\"", id="crc-mismatch"),
    # a zero-filled tail is what a crash leaves when the file size reached the disk but the data
    # did not (ext4/XFS delayed allocation): it reads as length 0, crc32(b"") == 0
    pytest.param(b"\x00" * 8, id="zeros-one-header"),
    pytest.param(b"\x00" * 4096, id="zeros-one-page"),
    pytest.param(b"\x00" * 3, id="zeros-short"),
])
def test_garbage_tail_is_ignored(path: Path, garbage: bytes):
    full, ends, states = write_history(path)
    path.write_bytes(full + garbage)
    assert reopen(path) == states[-1]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=4096))
def test_random_garbage_tail_is_a_torn_tail(tmp_path: Path, garbage: bytes):
    # bytes that end the file with no intact record after them are what a crash leaves where the file system
    # shows stale blocks past an append that never reached the disk: a torn tail, every key kept (the records
    # that might have been there were never acknowledged: their fsync did not return)
    path = tmp_path / "garbage.journal"
    path.unlink(missing_ok=True)  # hypothesis reuses tmp_path across examples
    full, ends, states = write_history(path)
    path.write_bytes(full + garbage)
    replay = Journal(path).read()
    assert replay.state == states[-1] and not replay.lost and not replay.unidentified
    assert replay.torn_at == len(full)


def test_damaged_record_in_the_middle_drops_its_key_and_later_ones_are_recovered(path: Path):
    # records delimit themselves: replay resynchronises on the next header. The damaged record was a protect
    # of "a": replaying "a" from its put would serve it unprotected, a state that is no longer true
    full, ends, states = write_history(path)
    broken = bytearray(full)
    broken[ends[1] + 30] ^= 0xFF  # a byte of the third record's payload (protect "a"); its header names "a"
    path.write_bytes(bytes(broken))
    replay = Journal(path).read()
    assert replay.damaged == ((ends[1], ends[2] - ends[1]),) and replay.torn_at is None
    assert replay.state == {"c": record("c", 3, shape=(0,))} and replay.lost == ("a",)
    assert replay.unidentified == () and replay.repaired == ()
    assert path.read_bytes() == bytes(broken)  # read() writes nothing


@pytest.mark.parametrize("where", ["magic", "version", "length", "payload-crc", "key-id", "header-crc"])
def test_a_flipped_header_byte_is_repaired_from_the_payload(path: Path, where: str):
    full, ends, states = write_history(path)
    offset = ends[0] + {"magic": 1, "version": 3, "length": 5, "payload-crc": 9, "key-id": 13, "header-crc": 21}[where]
    broken = bytearray(full)
    broken[offset] ^= 0x40
    path.write_bytes(bytes(broken))
    replay = Journal(path).read()
    assert replay.repaired == (ends[0],) and replay.damaged == () and replay.torn_at is None
    assert replay.records == len(ends) and replay.state == states[-1]


def test_a_flipped_payload_byte_drops_the_key_its_header_names(path: Path):
    full, ends, states = write_history(path)
    broken = bytearray(full)
    broken[ends[0] + 30] ^= 0x40  # the put of b"b": its intact delete decides b"b" again (absent)
    broken[ends[2] + 30] ^= 0x40  # that delete of b"b": now b"b" is unknown, and absent
    broken[ends[3] + 30] ^= 0x40  # the put of "c", which no intact record names: absent, counted unnamed
    path.write_bytes(bytes(broken))
    replay = Journal(path).read()
    assert [off for off, _ in replay.damaged] == [ends[0], ends[2], ends[3]] and replay.records == len(ends) - 3
    assert replay.state == {"a": record("a", 1, prefix=True)}
    assert replay.lost == () and replay.lost_unnamed == 2 and replay.unidentified == ()


def test_damaged_last_record_is_damage_not_a_torn_tail(path: Path):
    full, ends, states = write_history(path)
    broken = bytearray(full)
    broken[-1] ^= 0x01  # a complete record whose bytes changed: not what a crash mid-append leaves
    path.write_bytes(bytes(broken))
    replay = Journal(path).read()
    assert replay.damaged == ((ends[3], ends[4] - ends[3]),) and replay.torn_at is None
    assert replay.state == states[3]


STRUCTURED = np.dtype([("k", "<f2"), ("v", "<f2")])
# every operation on several keys: puts, overwrites, deletes, a delete and put again, protects and
# unprotects, str and bytes keys, a key whose only record is its put ("e")
EVERY_OP: list[tuple[str, Key, KeyRecord | bool | None]] = [
    ("put", "a", record("a", 1)), ("put", b"b", record(b"b", 2, STRUCTURED, (3,))), ("put", "c", record("c", 3)),
    ("prot", "a", True), ("put", b"b", record(b"b", 4)), ("del", "c", None), ("prot", "a", False),
    ("put", "c", record("c", 5, prefix=True)), ("prot", b"b", True), ("del", "a", None),
    ("put", "d", record("d", 6, shape=(2, 3))), ("put", "a", record("a", 7)), ("prot", "c", False),
    ("del", b"b", None), ("put", "e", record("e", 8)), ("prot", "d", True), ("put", "d", record("d", 9)),
]


def write_every_op(path: Path, pack=None) -> tuple[bytes, list[tuple[int, int, Key]], list[dict[Key, KeyRecord]]]:
    """Journal EVERY_OP one append each; its bytes, (start, end, key) of each record, and the true state
    after each record, from a plain dict."""
    encoded = []
    for op, key, value in EVERY_OP:
        encoded.append(put_record(value) if op == "put" else delete_record(key) if op == "del"
                       else protect_record(key, value))
    if pack is not None:
        encoded = [pack(r) for r in encoded]
    state: dict[Key, KeyRecord] = {}
    spans, states, start = [], [], 0
    for raw, (op, key, value) in zip(encoded, EVERY_OP, strict=True):
        _apply(state, op, key, value)
        spans.append((start, start + len(raw), key))
        states.append(dict(state))
        start += len(raw)
    path.write_bytes(b"".join(encoded))
    return path.read_bytes(), spans, states


def true_state(damaged: int, drop_all: bool = False) -> dict[Key, KeyRecord]:
    """EVERY_OP's final state when record ``damaged`` is lost: its key (every key, ``drop_all``) is unknown
    from there on, so absent until a later put or delete decides it (a protect cannot: it needs the state)."""
    state: dict[Key, KeyRecord] = {}
    for i, (op, key, value) in enumerate(EVERY_OP):
        if i == damaged:
            if drop_all:
                state.clear()
            state.pop(key, None)
        else:
            _apply(state, op, key, value)
    return state


def _apply(state: dict[Key, KeyRecord], op: str, key: Key, value: object) -> None:
    """What one record of EVERY_OP does to the key table (a protect of an absent key does nothing)."""
    if op == "put":
        state[key] = value  # type: ignore[assignment]
    elif op == "del":
        state.pop(key, None)
    elif key in state:
        old = state[key]
        state[key] = KeyRecord(key, old.block_id, old.nbytes, old.dtype, old.shape, value)  # type: ignore[arg-type]


def read_bytes(path: Path, data: bytes):
    path.write_bytes(data)
    return Journal(path).read()


def test_every_single_byte_flip_repairs_or_drops_exactly_its_key(path: Path):
    """A flip in a header is repaired (the payload checks out); a flip in a payload drops the key its header
    names, and only that key; never a stale or reverted key, whatever the operation hit was."""
    data, spans, states = write_every_op(path)
    final = states[-1]
    tried = 0
    for i, (start, end, key) in enumerate(spans):
        expected = true_state(i)
        assert set(expected) <= set(final) and all(final[k] == r for k, r in expected.items())
        for off in range(start, end):
            in_header = off - start < 24
            # every value of a header byte; a spread of flips of a payload byte
            masks = range(1, 256) if in_header and i in (0, len(spans) - 1) \
                else (0x01, 0x02, 0x10, 0x40, 0x80, 0xFF, 0x5A)
            for mask in masks:
                broken = bytearray(data)
                broken[off] ^= mask
                replay = read_bytes(path, bytes(broken))
                tried += 1
                where = (off, off - start, hex(mask), key)
                assert replay.torn_at is None and replay.unidentified == (), where
                if in_header:
                    assert replay.repaired == (start,) and replay.damaged == (), where
                    assert replay.state == final and replay.records == len(spans), where
                    continue
                assert replay.damaged == ((start, end - start),) and replay.repaired == (), where
                assert replay.state == expected, where  # its key absent, or as a later record decided it
                if key in final and key not in expected:  # reported: by name if an intact record names it
                    assert replay.lost == (key,) or (replay.lost == () and replay.lost_unnamed == 1), where
    assert tried > 7 * len(data)


def test_truncated_at_every_byte_keeps_every_complete_record(path: Path):
    data, spans, states = write_every_op(path)
    for cut in range(len(data) + 1):
        replay = read_bytes(path, data[:cut])
        complete = [i for i, (_, end, _) in enumerate(spans) if end <= cut]
        assert replay.state == (states[complete[-1]] if complete else {}), cut
        assert replay.damaged == () and replay.lost == () and replay.lost_unnamed == 0, cut
        partial = next((s for s, e, _ in spans if s < cut < e), None)
        assert replay.torn_at == partial, cut


def v2_record(v3: bytes) -> bytes:
    """The same record as the previous release wrote it (v2: no key id in the header)."""
    body = v3[24:]
    head = b"CKV\xa7" + struct.pack("<II", len(body), zlib.crc32(body))
    return head + struct.pack("<I", zlib.crc32(head)) + body


def test_a_v2_journal_never_serves_a_stale_key_after_any_single_byte_flip(path: Path):
    """A v2 header names no key: a damaged v2 payload drops every key before it (those a later put or delete
    does not decide). A damaged v2 header is repaired. Either way no key comes back stale."""
    data, spans, states = write_every_op(path, pack=v2_record)
    final = states[-1]
    assert Journal(path).read().state == final and Journal(path).read().version == 2
    for i, (start, end, key) in enumerate(spans):
        for off in range(start, end):
            broken = bytearray(data)
            broken[off] ^= 0x21
            replay = read_bytes(path, bytes(broken))
            assert all(final.get(k) == r for k, r in replay.state.items()), (off, key)  # never stale
            if off - start < 16:
                assert replay.state == final and replay.repaired == (start,), off
            else:
                assert replay.unidentified == (start,) and replay.state == true_state(i, drop_all=True), off


def test_appends_after_a_torn_tail_are_recovered(path: Path):
    full, ends, states = write_history(path)
    torn = full + put_record(record("d", 4))[:10]
    late = put_record(record("e", 5))
    path.write_bytes(torn + late)  # a torn tail that could not be cut off, then a later append
    replay = Journal(path).read()
    assert replay.state == {**states[-1], "e": record("e", 5)}
    assert [off for off, _ in replay.damaged] == [len(full)]


def v1_record(payload: dict) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return struct.pack("<II", len(body), zlib.crc32(body)) + body


V1 = [{"op": "put", "k": {"s": "a"}, "id": "01" * 32, "n": 8, "dt": "<f2", "sh": [4], "p": False},
      {"op": "put", "k": {"b": "YmI="}, "id": "02" * 32, "n": 8, "dt": [["k", "<f2"], ["v", "<f2"]], "sh": [2], "p": True},
      {"op": "prot", "k": {"s": "a"}, "p": True},
      {"op": "put", "k": {"s": "c"}, "id": "03" * 32, "n": 8, "dt": "<i8", "sh": [], "p": False}]


def test_a_v1_journal_still_opens_and_is_rewritten_as_v2(path: Path):
    path.write_bytes(b"".join(v1_record(p) for p in V1))
    j = Journal(path)
    replay = j.read()
    assert replay.version == 1 and replay.records == 4 and not replay.damaged
    kv = np.dtype([("k", "<f2"), ("v", "<f2")])
    assert replay.state == {"a": record("a", 1, prefix=True), b"bb": record(b"bb", 2, kv, (2,), prefix=True),
                            "c": KeyRecord("c", BlockId(bytes([3]) * 32), 8, np.dtype("<i8"), (), False)}
    j.open()
    j.append([delete_record("c")], sync=True)  # a v2 append after v1 records (compaction had no room)
    j.close()
    assert set(reopen(path)) == {"a", b"bb"}
    assert Journal(path).read().version == 3  # load() compacted it


def test_a_v1_journal_with_a_torn_tail_opens(path: Path):
    data = b"".join(v1_record(p) for p in V1)
    path.write_bytes(data + v1_record(V1[0])[:15])
    replay = Journal(path).read()
    assert replay.records == 4 and replay.torn_at == len(data) and not replay.damaged


def test_a_v1_journal_damaged_in_the_middle_is_refused(path: Path):
    data = bytearray(b"".join(v1_record(p) for p in V1))
    offset = len(v1_record(V1[0])) + 12
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"offset {len(v1_record(V1[0]))}"):
        Journal(path).read()
    assert path.read_bytes() == bytes(data)


# -- dtypes -----------------------------------------------------------------------------------
EXOTIC = [
    np.dtype({"names": ["a", "b"], "formats": ["<i4", "<f8"], "titles": ["A title", None], "offsets": [0, 8],
              "itemsize": 24}),
    np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i2"], "offsets": [0, 2], "itemsize": 4}),  # overlapping
    np.dtype("<f4", metadata={"unit": "K", "scale": [1, 2.5, None]}),
    np.dtype([("x", np.dtype(">i2", metadata={"k": True})), ("y", "<u1", (2, 3))], align=True),
    np.dtype((np.record, [("a", "<i4")])),
    np.dtype([]),
]


def same_dtype(a: np.dtype, b: np.dtype) -> bool:
    """Equal, and equal in what ``==`` ignores: metadata, scalar type, alignment (recursively)."""
    if a != b or a.metadata != b.metadata or a.type is not b.type or a.isalignedstruct != b.isalignedstruct:
        return False
    if a.names is not None:
        return a.names == b.names and all(
            same_dtype(a.fields[n][0], b.fields[n][0]) and a.fields[n][1:] == b.fields[n][1:] for n in a.names)
    if a.subdtype is not None:
        return a.subdtype[1] == b.subdtype[1] and same_dtype(a.subdtype[0], b.subdtype[0])
    return True


@pytest.mark.parametrize("dtype", DTYPES + EXOTIC, ids=str)
def test_dtype_encoding_is_exact(dtype: np.dtype):
    got = decode_dtype(json.loads(json.dumps(encode_dtype(dtype))))
    assert same_dtype(got, dtype)


@pytest.mark.parametrize("dtype", [
    np.dtype("O"), np.dtype([("a", "O")]), np.dtype("<f4", metadata={"f": (1, 2)}),
    np.dtype("<f4", metadata={1: "int key"}), np.dtype("<f4", metadata={"obj": object()}),
    np.dtype({"names": ["a"], "formats": ["<i4"], "titles": [3]}),
], ids=str)
def test_dtype_without_an_exact_encoding_is_refused(dtype: np.dtype):
    with pytest.raises(TypeError):
        encode_dtype(dtype)


# -- compaction -------------------------------------------------------------------------------
def test_load_compacts_to_one_put_per_live_key(path: Path):
    full, ends, states = write_history(path)
    path.write_bytes(full + b"\xff\xff\xff\x7f torn")
    state = reopen(path)
    assert state == states[-1]
    assert path.read_bytes() == b"".join(put_record(r) for r in state.values())
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left
    assert reopen(path) == state  # the compacted file replays to the same state


def test_load_drops_deleted_keys_from_the_file(journal: Journal, path: Path):
    journal.append([put_record(record(f"k{i}", i)) for i in range(20)], sync=False)
    journal.append([delete_record(f"k{i}") for i in range(20)], sync=True)
    journal.close()
    assert reopen(path) == {}
    assert path.read_bytes() == b""


# -- failed appends ---------------------------------------------------------------------------
def test_failed_append_raises_storage_error_and_leaves_the_file(journal: Journal, path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    journal.append([put_record(record("a", 1))], sync=True)
    before = path.read_bytes()

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageError) as info:
        journal.append([put_record(record("b", 2))], sync=True)
    monkeypatch.undo()
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    journal.append([put_record(record("c", 3))], sync=True)  # the journal still works
    journal.close()
    assert reopen(path) == {"a": record("a", 1), "c": record("c", 3)}


def test_short_append_is_rolled_back(journal: Journal, path: Path, monkeypatch: pytest.MonkeyPatch):
    journal.append([put_record(record("a", 1))], sync=True)
    before = path.read_bytes()
    real_write = os.write

    def short(fd: int, data: bytes) -> int:
        return real_write(fd, data[: len(data) // 2])  # the disk filled up halfway

    monkeypatch.setattr(os, "write", short)
    with pytest.raises(StorageError):
        journal.append([put_record(record("b", 2)), put_record(record("c", 3))], sync=True)
    monkeypatch.undo()
    assert path.read_bytes() == before  # no torn record left mid-file to hide later ones
    journal.append([put_record(record("d", 4))], sync=True)
    journal.close()
    assert reopen(path) == {"a": record("a", 1), "d": record("d", 4)}
