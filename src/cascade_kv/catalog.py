"""The key journal: what a persistent store needs to find its keys again.

Block bytes live in content-addressed files (the disk tier); what maps a key to
a block, with its dtype, shape and prefix flag, is appended here as one record
per change, with a JSON payload (small, rare next to the block write it
accompanies, and readable in a pinch). Appending a batch is one ``write`` (it
tears as a unit at most) and ``fsync`` makes it durable.

Record format v3 (written now; v2 and v1 records are still read, also in one file)::

    b"CKV\\xa8" <u32 length> <u32 crc32(payload)> <u64 key id> <u32 crc32(the 20 bytes before)> <payload>
    b"CKV\\xa7" <u32 length> <u32 crc32(payload)> <u32 crc32(the 12 bytes before)> <payload>      (v2)

Each record delimits itself: the header checks itself, so a length is only
trusted when its header is intact, and the magic (whose last byte cannot occur
in a JSON payload, which is ASCII) lets replay *resynchronise* after damage:
reading resumes at the next magic whose header checks out. A damaged region is
told apart from the torn tail a crash leaves (a header whose record runs past
the end of the file, fewer bytes than a header, zeros, or unreadable bytes that
end the file with no intact record after them and no header of their own: a
file system showing stale blocks past an append that never reached the disk): only the latter is
normal (the unanswered last append, dropped); the former is reported, and the
store then keeps the block files it cannot account for instead of deleting them.

Skipping a damaged record is not enough: if it was a delete, an overwrite or an
(un)protect, the key's older records would bring back a state that is no longer
true, served as if current. So damage never falls back on older records:

* header intact, payload damaged: the v3 header names the key (:func:`key_id`,
  a 64-bit hash of the encoded key), which replay then *drops* (reported lost);
  a later intact put or delete of it decides its state again.
* header damaged, payload intact (the region between two intact records is one
  header and a JSON payload that checks out against the header's CRC field, or
  rebuilds the header but for one byte): the record is *repaired*, replayed as is.
* anything else (damage across records; a damaged v2 payload, whose header names
  no key) cannot be tied to a key: every key live before it is dropped unless a
  later intact put or delete decides it. Keeping them could serve stale data;
  refusing to open was rejected because the remedy left to an operator (moving
  the journal aside) loses every key, more than this does. A KV cache recomputes
  what it lost; it must not serve what is no longer true. The region's offset is
  reported, the damaged journal and the unaccounted block files are kept.

So any single flipped byte either repairs exactly or drops exactly the key of
the record it hit (in a v3 journal; a store compacts to v3 at its first open).

v1 (``<u32 length><u32 crc32><payload>``) has no marker to resynchronise on: a
v1 record that fails its check is skipped when it is the last one (or the last
before v2/v3 records), and anything else refuses with :class:`IntegrityError`
naming the offset, leaving the file as it is.

Reading (:meth:`Journal.read`) never writes; rewriting the journal compactly
(:meth:`Journal.compact`) is a separate, optional step: it needs free space,
and when there is none the old journal stays and appends go on after it.

An append-only file was chosen over SQLite because SQLite's locking is unsafe on
Lustre mounts without ``flock``, and a journal needs none: one writer owns one
journal (a single-node store; in the distributed store, each home rank its own).
"""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import IntegrityError, InvalidArgumentType, StorageError
from .ids import BlockId, SpacedKey, StoreKey
from .tiers.disk import CLOEXEC, NOFOLLOW, PRIVATE_FILE, create_exclusive, fsync_dir

MAGIC = b"CKV\xa7"  # v2; as a v1 length it would be 2.8 GB: a v1 file never starts a record with it
MAGIC3 = b"CKV\xa8"  # v3: the header also names the record's key
_MARK = b"CKV"  # both magics start with it; as a v1 length, >= 5.6 MB: no v1 record starts with it either
_HEADER = struct.Struct("<4sIII")  # v2: magic, payload length, crc32(payload), crc32(magic + length + payload crc)
_HEADER3 = struct.Struct("<4sIIQI")  # v3: magic, payload length, crc32(payload), key id, crc32(the 20 bytes before)
_HEADERS = {MAGIC3: _HEADER3, MAGIC: _HEADER}
_V1_HEADER = struct.Struct("<II")  # payload length, crc32(payload)
_V1_PLAUSIBLE = 1 << 24  # no v1 record was this long (one key's JSON)
_SMALLEST = _HEADER.size + len(b'{"op":"del","k":{"s":""}}')  # no whole record is shorter


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """The journalled state of one key."""

    key: StoreKey
    block_id: BlockId
    nbytes: int
    dtype: np.dtype
    shape: tuple[int, ...]
    prefix: bool


@dataclass(frozen=True, slots=True)
class Replay:
    """What :meth:`Journal.read` found. Reading changes nothing; the caller decides what to write."""

    state: dict[StoreKey, KeyRecord]
    """The live keys after every intact record, less those that damage made unknown (``lost``)."""
    records: int
    """Intact (or repaired) records replayed."""
    version: int
    """Format of the first record: 1 (legacy), 2, 3, or 0 for an empty or missing journal."""
    damaged: tuple[tuple[int, int], ...]
    """(offset, length) of each region that failed its checks and was skipped (not a torn tail)."""
    torn_at: int | None
    """Offset of the incomplete last record a crash left mid-append (dropped), if any."""
    size: int
    """Bytes in the file when it was read."""
    exists: bool
    repaired: tuple[int, ...] = ()
    """Offsets of records whose header was damaged but whose payload checked out: replayed as written."""
    lost: tuple[StoreKey, ...] = ()
    """Keys dropped because a damaged record concerned them, or (no key named) preceded them: their latest
    state is unknown, and the one older records give may be stale."""
    lost_unnamed: int = 0
    """Damaged records naming (by key id) a key no intact record names, such as a new key's put: absent."""
    unidentified: tuple[int, ...] = ()
    """Offsets of the damaged regions (among ``damaged``) that no key could be named for: every key live
    before one was dropped unless a later record decided it."""


# -- dtypes -----------------------------------------------------------------------------------
def _exact_json(value: object, what: str) -> object:
    """``value`` if JSON brings it back equal and of the same types; TypeError otherwise."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if type(value) is list:
        return [_exact_json(v, what) for v in value]
    if type(value) is dict and all(type(k) is str for k in value):
        return {k: _exact_json(v, what) for k, v in value.items()}
    raise InvalidArgumentType(f"{what} holds {type(value).__name__} {value!r}, which the journal cannot record exactly "
                    f"(str, int, float, bool, None, lists and dicts with str keys can be)")


def encode_dtype(dt: np.dtype) -> object:
    """A JSON form of ``dt`` that :func:`decode_dtype` turns back into an identical dtype: field names,
    formats, offsets, item size, titles, nesting, subarrays, byte order, alignment and metadata.

    Raises ``TypeError`` for a dtype that has none (Python objects, titles or metadata that are not
    plain JSON values). ``np.lib.format.dtype_to_descr`` was the old encoding: it loses titles (and
    reloading them failed), overlapping fields and metadata."""
    if dt.hasobject:
        raise InvalidArgumentType(f"dtype {dt} holds Python objects, which have no bytes to store")
    out: dict[str, object]
    if dt.names is not None:
        fields = [dt.fields[n] for n in dt.names]  # type: ignore[index]
        titles = [f[2] if len(f) > 2 else None for f in fields]
        for t in titles:
            if t is not None and type(t) is not str:
                raise InvalidArgumentType(f"dtype {dt} has a field title {t!r} that is not a str; the journal records str titles")
        out = {"names": list(dt.names), "formats": [encode_dtype(f[0]) for f in fields],
               "offsets": [f[1] for f in fields], "itemsize": dt.itemsize}
        if any(t is not None for t in titles):
            out["titles"] = titles
        if dt.isalignedstruct:
            out["aligned"] = True
        if dt.type is not np.void:
            if dt.type is not np.record:
                raise InvalidArgumentType(f"dtype {dt} has scalar type {dt.type.__name__}, which the journal cannot record")
            out["record"] = True
    elif dt.subdtype is not None:
        base, shape = dt.subdtype
        out = {"sub": encode_dtype(base), "shape": list(shape)}
    elif dt.metadata is None:
        return dt.str  # the common case stays a short string (and is what v1 wrote for it)
    else:
        out = {"s": dt.str}
    if dt.metadata is not None:
        out["meta"] = _exact_json(dict(dt.metadata), f"the metadata of dtype {dt}")
    return out


def decode_dtype(raw: object) -> np.dtype:
    """Inverse of :func:`encode_dtype`; also reads the ``descr`` lists v1 journals hold."""
    if isinstance(raw, str):
        return np.dtype(raw)
    if isinstance(raw, list):  # v1: np.lib.format's descr, whose tuples JSON turned into lists
        return np.lib.format.descr_to_dtype(_descr(raw))
    if not isinstance(raw, dict):
        raise ValueError(f"not a dtype: {raw!r}")
    if "names" in raw:
        spec = {k: raw[k] for k in ("names", "offsets", "itemsize")}
        spec["formats"] = [decode_dtype(f) for f in raw["formats"]]
        if "titles" in raw:
            spec["titles"] = raw["titles"]
        dt = np.dtype(spec, align=bool(raw.get("aligned", False)))
        if raw.get("record"):
            dt = np.dtype((np.record, dt))
    elif "sub" in raw:
        dt = np.dtype((decode_dtype(raw["sub"]), tuple(raw["shape"])))
    else:
        dt = np.dtype(raw["s"])
    if "meta" in raw:
        dt = np.dtype(dt, metadata=raw["meta"])
    return dt


def _descr(raw: object) -> object:
    # JSON turns the tuples of a structured dtype's descr into lists; numpy wants tuples back
    if isinstance(raw, list):
        return [tuple(_descr(x) for x in field) if isinstance(field, list) else field for field in raw]
    return raw


# -- records ----------------------------------------------------------------------------------
def _encode_key(key: StoreKey) -> dict[str, str]:
    """A key as a JSON object: ``{"s": str}`` or ``{"b": base64}``, plus ``"n": namespace`` for a namespaced
    key (records without ``"n"``, every v1 and older v2 record, are the default namespace's)."""
    if isinstance(key, SpacedKey):
        return {"n": key.space, **_encode_key(key.key)}
    return {"s": key} if isinstance(key, str) else {"b": base64.b64encode(key).decode()}


def _decode_key(d: dict[str, str]) -> StoreKey:
    key = d["s"] if "s" in d else base64.b64decode(d["b"], validate=True)
    if "n" in d:
        if not isinstance(d["n"], str) or not d["n"]:
            raise ValueError(f"journal: namespace must be a non-empty str, got {d['n']!r:.80}")
        return SpacedKey(d["n"], key)
    return key


def key_id(key: StoreKey) -> int:
    """The 64-bit identity a v3 record header gives its key: a hash of the key's JSON encoding (so a namespace
    is part of it). It lets replay drop the key of a record whose payload is damaged; two keys sharing an id
    (one pair in 2**32 among 2**32 keys) would only both be dropped. It must not change for a given key:
    damaged records written earlier are matched against the ids of keys read now."""
    return _encoded_key_id(_encode_key(key))


def _encoded_key_id(encoded: object) -> int:
    raw = json.dumps(encoded, sort_keys=True, separators=(",", ":")).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def _v3_header(body: bytes, kid: int) -> bytes:
    head = _HEADER3.pack(MAGIC3, len(body), zlib.crc32(body), kid, 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(head))


def _pack(payload: dict[str, object]) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()  # ensure_ascii: no byte >= 0x80, so no magic
    return _v3_header(body, _encoded_key_id(payload["k"])) + body


def put_record(r: KeyRecord) -> bytes:
    return _pack({"op": "put", "k": _encode_key(r.key), "id": r.block_id.hex(), "n": r.nbytes,
                  "dt": encode_dtype(r.dtype), "sh": list(r.shape), "p": r.prefix})


def delete_record(key: StoreKey) -> bytes:
    return _pack({"op": "del", "k": _encode_key(key)})


def protect_record(key: StoreKey, prefix: bool) -> bytes:
    return _pack({"op": "prot", "k": _encode_key(key), "p": prefix})


@dataclass(frozen=True, slots=True)
class _Head:
    """An intact v2 or v3 record header."""

    size: int  # bytes of header
    length: int  # bytes of payload
    crc: int  # crc32 of the payload
    key: int | None  # the key id (v3); None in a v2 header


def _head(data: bytes, off: int) -> _Head | None:
    """The header at ``off`` if it is there whole and checks out, else ``None``."""
    fmt = _HEADERS.get(data[off:off + 4])
    if fmt is None or off + fmt.size > len(data):
        return None
    fields = fmt.unpack_from(data, off)
    if zlib.crc32(data[off:off + fmt.size - 4]) != fields[-1]:
        return None
    return _Head(fmt.size, fields[1], fields[2], fields[3] if fmt is _HEADER3 else None)


def _next_mark(data: bytes, start: int) -> int:
    """Offset of the next v2 or v3 magic at or after ``start``; ``len(data)`` when there is none."""
    while (i := data.find(_MARK, start)) >= 0:
        if data[i + 3:i + 4] in (MAGIC[3:], MAGIC3[3:]):
            return i
        start = i + 1
    return len(data)


def _json_object(body: bytes) -> dict[str, object] | None:
    try:
        payload = json.loads(body)
    except ValueError:  # UnicodeDecodeError too
        return None
    return payload if isinstance(payload, dict) else None


@dataclass(frozen=True, slots=True)
class _Record:
    offset: int
    end: int
    payload: dict[str, object]
    key: int | None  # the key id an intact v3 header carried
    repaired: bool  # its header was damaged; the payload checked out against what was left of it


@dataclass(frozen=True, slots=True)
class _Damage:
    offset: int
    end: int
    key: int | None  # the key id of the intact v3 header of a damaged payload; None: no key can be named


def _repair(data: bytes, start: int, stop: int) -> _Record | None:
    """``data[start:stop]`` as one record whose header was damaged, if its payload is intact: it parses and
    matches the header's payload CRC field (4 bytes), or rebuilds the whole header but for one byte (a hit on
    that CRC field). Either way it is one header and one JSON payload, so damage across records never
    passes: their second header is not JSON."""
    for magic, fmt in _HEADERS.items():
        body = data[start + fmt.size:stop]
        payload = _json_object(body) if body else None
        if payload is None:
            continue
        found = data[start:start + fmt.size]
        crc = zlib.crc32(body)
        if magic == MAGIC3:
            rebuilt = _v3_header(body, _encoded_key_id(payload.get("k")))
        else:
            head = MAGIC + struct.pack("<II", len(body), crc)
            rebuilt = head + struct.pack("<I", zlib.crc32(head))
        if found[8:12] == struct.pack("<I", crc) or sum(a != b for a, b in zip(found, rebuilt)) <= 1:
            return _Record(start, stop, payload, None, True)
    return None


def _split(data: bytes, start: int, stop: int, head: _Head | None) -> list[_Record | _Damage]:
    """What the skipped region ``[start, stop)`` holds: the damaged record an intact header at ``start``
    names (it ends where that header says, or sooner when an intact record starts sooner: a torn record
    with appends after it), then anything left, tried as one record with a damaged header."""
    out: list[_Record | _Damage] = []
    if head is not None:
        end = min(start + head.size + head.length, stop)
        out.append(_Damage(start, end, head.key))
        start = end
    if start < stop:
        out.append(_repair(data, start, stop) or _Damage(start, stop, None))
    return out


@dataclass(slots=True)
class _Scan:
    items: list[_Record | _Damage]  # in file order
    torn_at: int | None
    version: int


def _scan(data: bytes) -> _Scan:
    """Split ``data`` into records and damaged regions, in order (see the module docstring)."""
    n = len(data)
    items: list[_Record | _Damage] = []
    bad: int | None = None  # start of the region being skipped
    bad_head: _Head | None = None  # the intact header that region starts with (its payload failed), if any
    v1 = True  # v1 records are read until the first v2/v3 record or damage
    v1_failure: tuple[int, int] | None = None  # (offset, claimed end) of the v1 record that failed
    version = 0
    off = 0
    while off < n:
        head = _head(data, off)
        if head is not None:
            if bad is not None:
                items += _split(data, bad, off, bad_head)
            end = off + head.size + head.length
            body = data[off + head.size:end]
            payload = _json_object(body) if end <= n and zlib.crc32(body) == head.crc else None
            v1 = False
            if payload is not None:
                items.append(_Record(off, end, payload, head.key, False))
                version = version or (2 if head.key is None else 3)
                bad, bad_head, off = None, None, end
                continue
            # its length is trusted, but an intact record may start sooner (a torn record, appends after it)
            bad, bad_head = off, head
            off = _next_mark(data, off + head.size)
            continue
        if v1 and off + _V1_HEADER.size <= n and not data.startswith(_MARK, off):
            length, crc = _V1_HEADER.unpack_from(data, off)
            end = off + _V1_HEADER.size + length
            body = data[off + _V1_HEADER.size:end]
            payload = _json_object(body) if length and end <= n and zlib.crc32(body) == crc else None
            if payload is not None:
                items.append(_Record(off, end, payload, None, False))
                version = version or 1
                off = end
                continue
            v1 = False
            # after a v1 record, this is v1 damage; as the first record, an absurd length means it is not v1
            # at all (a v2/v3 record whose magic was hit) and is resynchronised on like any other damage
            if version == 1 or length < _V1_PLAUSIBLE:
                v1_failure = (off, end)
            if bad is None:
                bad = off
            off = _next_mark(data, off)
            continue
        if bad is None:
            bad = off
        v1 = False
        off = _next_mark(data, off + 1)
    torn_at: int | None = None
    if bad is not None:
        torn = (bad_head is not None and bad + bad_head.size + bad_head.length > n) or n - bad < _HEADER3.size \
            or not data[bad:].strip(b"\0") or (v1_failure is not None and v1_failure[0] == bad and v1_failure[1] > n)
        if torn:
            torn_at = bad  # what a crash mid-append leaves: dropped, nothing follows it
        else:
            tail = _split(data, bad, n, bad_head)
            # Unreadable bytes that end the file, with no intact record after them and no key to name, are
            # what a crash leaves where a file system shows stale blocks past an append that did not reach
            # the disk (ext4 data=writeback, some network file systems): a torn tail, not damage. Treating
            # them as damage (dropping every key before them) was rejected: one such crash would empty
            # the cache; what it can cost instead is one record whose header and payload were both hit.
            # A region that starts with an intact header (a whole record whose payload failed) or that a
            # legacy record claims is real damage, and keeps its rules.
            if (tail and isinstance(tail[-1], _Damage) and tail[-1].key is None and v1_failure is None
                    and not (bad_head is not None and tail[-1].offset == bad)):
                torn_at = tail.pop().offset
            items += tail
    if v1_failure is not None:
        start, claimed = v1_failure
        region_end = next((i.end for i in items if isinstance(i, _Damage) and i.offset == start), None)
        if region_end is not None and claimed != region_end:
            # v1 cannot resynchronise: what follows the damage might hold records we cannot find
            raise IntegrityError(f"journal: legacy (v1) record at offset {start} is damaged and records may "
                                 f"follow it ({region_end - start} B unreadable); nothing was changed. Move "
                                 f"the journal aside to open the store without its keys")
    return _Scan(items, torn_at, version)


def _parse(rec: dict[str, object]) -> tuple[StoreKey, str, KeyRecord | bool | None]:
    """(key, op, what it sets: the record of a put, the flag of a prot); raises on a meaningless record."""
    key = _decode_key(rec["k"])  # type: ignore[arg-type]
    op = rec["op"]
    if op == "put":
        shape = tuple(int(x) for x in rec["sh"])  # type: ignore[attr-defined]
        return key, op, KeyRecord(key, BlockId(bytes.fromhex(rec["id"])), int(rec["n"]),  # type: ignore[arg-type]
                                  decode_dtype(rec["dt"]), shape, bool(rec["p"]))
    if op == "del":
        return key, op, None
    if op == "prot":
        return key, op, bool(rec["p"])
    raise ValueError(f"unknown journal operation {op!r}")


class _Replayer:
    """Applies records and damage in file order. Damage never lets an older record's state through: the key
    a damaged record names (by id) is dropped, and damage naming no key drops every live key; a later intact
    put or delete of a dropped key decides it again (a protect cannot: it needs the state it changes)."""

    def __init__(self) -> None:
        self.state: dict[StoreKey, KeyRecord] = {}
        self.ids: dict[StoreKey, set[int]] = {}  # the ids each key was named by (its own, any a v3 header gave)
        self.named: dict[int, set[StoreKey]] = {}  # the keys each id names
        self.unknown: set[int] = set()  # ids of keys whose latest state damage hides

    def record(self, key: StoreKey, op: str, value: KeyRecord | bool | None, header_id: int | None) -> None:
        ids = self.ids.setdefault(key, set())
        # the header's id is what this writer puts in a damaged record's header; key_id() is what a newer one
        # would (they differ only if a key's encoding ever changed)
        for kid in {key_id(key), header_id} - {None} - ids:
            ids.add(kid)  # type: ignore[arg-type]
            self.named.setdefault(kid, set()).add(key)  # type: ignore[arg-type]
        if op == "put":
            self.state[key] = value  # type: ignore[assignment]
            self.unknown -= ids
        elif op == "del":
            self.state.pop(key, None)
            self.unknown -= ids
        elif key in self.state:  # prot of a live key (of an unknown one, it stays unknown)
            old = self.state[key]
            self.state[key] = KeyRecord(old.key, old.block_id, old.nbytes, old.dtype, old.shape, bool(value))

    def drop(self, kid: int | None) -> None:
        """Damage concerning the key ``kid`` names, or (``None``) any key."""
        keys = list(self.state) if kid is None else self.named.get(kid, ())
        for key in keys:
            self.state.pop(key, None)
            self.unknown |= self.ids[key]
        if kid is not None:
            self.unknown.add(kid)

    def lost(self) -> tuple[tuple[StoreKey, ...], int]:
        """The keys dropped for good, and the number of ids that named no key."""
        keys: dict[StoreKey, None] = {}
        unnamed = 0
        for kid in self.unknown:
            names = self.named.get(kid)
            if not names:
                unnamed += 1
            for key in names or ():
                if key not in self.state:
                    keys[key] = None
        return tuple(keys), unnamed


class Journal:
    """Append-only key journal at ``path``: :meth:`read` it, :meth:`open` it, then :meth:`append`."""

    def __init__(self, path: Path, *, file_mode: int = PRIVATE_FILE) -> None:
        self.path = path
        self._mode = file_mode
        self._fd = -1

    def read(self) -> Replay:
        """Replay the file into a key table; writes nothing. IntegrityError if it cannot be read safely."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            exists = True
        except FileNotFoundError:
            data, exists = b"", False
        except OSError as e:
            raise StorageError(e.errno, f"journal: cannot read {self.path}: {e.strerror}", str(self.path)) from e
        scan = _scan(data)
        replay = _Replayer()
        damaged: list[tuple[int, int]] = []
        repaired: list[int] = []
        unidentified: list[int] = []
        records = 0
        for item in scan.items:
            if isinstance(item, _Record):
                try:
                    replay.record(*_parse(item.payload), item.key)
                    records += 1
                    if item.repaired:
                        repaired.append(item.offset)
                    continue
                except (KeyError, ValueError, TypeError, AttributeError):  # intact but meaningless: damage
                    kid = item.key
                    if kid is None and isinstance(item.payload.get("k"), dict):
                        kid = _encoded_key_id(item.payload["k"])  # its CRC passed: the key it names is right
                    item = _Damage(item.offset, item.end, kid)
            damaged.append((item.offset, item.end - item.offset))
            if item.key is not None:
                replay.drop(item.key)
            elif item.end - item.offset >= _SMALLEST:  # shorter, it cannot hide a change: a torn fragment
                unidentified.append(item.offset)
                replay.drop(None)
        lost, unnamed = replay.lost()
        return Replay(replay.state, records, scan.version, tuple(damaged), scan.torn_at, len(data), exists,
                      tuple(repaired), lost, unnamed, tuple(unidentified))

    def open(self) -> bool:
        """Open an existing journal for appending (writing nothing: a read-only disk fails here, before
        anything changed); ``False`` when there is none yet (:meth:`compact` or :meth:`create` makes it)."""
        if self._fd >= 0:
            return True
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | NOFOLLOW | CLOEXEC)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StorageError(e.errno, f"journal: cannot open {self.path}: {e.strerror}", str(self.path)) from e
        return True

    def create(self) -> None:
        """Create an empty journal (only an inode: works on a full disk) when there is none."""
        if self.open():
            return
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | NOFOLLOW | CLOEXEC,
                               self._mode)
            os.fchmod(self._fd, self._mode)
            fsync_dir(self.path.parent)
        except OSError as e:
            raise StorageError(e.errno, f"journal: cannot create {self.path}: {e.strerror}", str(self.path)) from e

    def load(self) -> dict[StoreKey, KeyRecord]:
        """Read, open, and compact if there is room (else drop a torn tail): the whole open, for callers
        that need no report. A store does these steps itself, around its own checks."""
        replay = self.read()
        self.open()
        try:
            self.compact(replay.state.values())
        except StorageError:
            self.create()
            if replay.torn_at is not None:
                self.truncate(replay.torn_at)
        return replay.state

    def compact(self, records: Iterable[KeyRecord]) -> None:
        """Replace the journal by one put record per live key, written aside and renamed over it. On failure
        (no space) the old journal is left as it was, still open for appends, and StorageError is raised."""
        parent = self.path.parent
        try:
            dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | CLOEXEC)
        except OSError as e:
            raise StorageError(e.errno, f"journal: cannot open {parent}: {e.strerror}", str(parent)) from e
        try:
            fd, tmp = create_exclusive(dir_fd, f"{self.path.name}.", self._mode, os.O_APPEND)
        except OSError as e:
            os.close(dir_fd)
            raise StorageError(e.errno, f"journal: cannot compact {self.path}: {e.strerror}", str(self.path)) from e
        renamed = False
        try:
            data = b"".join(put_record(r) for r in records)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            os.replace(tmp, self.path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            renamed = True
            old, self._fd = self._fd, fd  # the compacted file, opened O_APPEND, is the journal now
            if old >= 0:
                os.close(old)
            os.fsync(dir_fd)  # the rename survives power loss
        except OSError as e:
            if not renamed:
                os.close(fd)
                try:
                    os.unlink(tmp, dir_fd=dir_fd)
                except OSError:
                    pass
            raise StorageError(e.errno, f"journal: cannot compact {self.path}: {e.strerror}", str(self.path)) from e
        finally:
            os.close(dir_fd)

    def truncate(self, size: int) -> None:
        """Cut a torn tail off (needs no free space), so that appends do not follow garbage."""
        try:
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        except OSError as e:
            raise StorageError(e.errno, f"journal: cannot truncate {self.path}: {e.strerror}", str(self.path)) from e

    def leftovers(self) -> Iterator[Path]:
        """Temporary files of compactions that a crash interrupted."""
        return self.path.parent.glob(f"{self.path.name}.*.tmp")

    def append(self, records: list[bytes], *, sync: bool) -> None:
        """Append encoded records as one write (so a batch tears as a unit at most), then fsync."""
        if not records:
            return
        data = b"".join(records)
        end = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, "short write")
            if sync:
                os.fsync(self._fd)
        except OSError as e:
            try:
                os.ftruncate(self._fd, end)  # a torn record mid-file would cost a damaged region at replay
            except OSError:
                pass
            raise StorageError(e.errno, f"journal: cannot append to {self.path}: {e.strerror}", str(self.path)) from e

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
