"""The key journal: what a persistent store needs to find its keys again.

Block bytes live in content-addressed files (the disk tier); what maps a key to
a block, with its dtype, shape and prefix flag, is appended here as one record
per change, with a JSON payload (small, rare next to the block write it
accompanies, and readable in a pinch). Appending a batch is one ``write`` (it
tears as a unit at most) and ``fsync`` makes it durable.

Format v2 (written since 0.x; v1 files are still read)::

    b"CKV\\xa7" <u32 length> <u32 crc32(payload)> <u32 crc32(the 12 bytes before)> <payload>

Each record delimits itself: the header checks itself, so a length is only
trusted when its header is intact, and the magic (whose last byte cannot occur
in a JSON payload, which is ASCII) lets replay *resynchronise* after damage: a
record that fails its check is skipped, and reading resumes at the next magic
whose header checks out. So one flipped byte costs one record, not every later
one. A damaged region is told apart from the torn tail a crash leaves (a
header whose record runs past the end of the file, fewer bytes than a header,
or zeros): only the latter is normal; the former is reported, and the store then
keeps the block files it cannot account for instead of deleting them.

v1 (``<u32 length><u32 crc32><payload>``) has no marker to resynchronise on: a
v1 record that fails its check is skipped when it is the last one (or the last
before v2 records), and anything else refuses with :class:`IntegrityError`
naming the offset, leaving the file as it is.

Reading (:meth:`Journal.read`) never writes; rewriting the journal compactly
(:meth:`Journal.compact`) is a separate, optional step: it needs free space,
and when there is none the old journal stays and appends go on after it.

An append-only file was chosen over SQLite because SQLite's locking is unsafe on
Lustre mounts without ``flock``, and a journal needs none: one store owns one
journal (the distributed store does not persist keys yet).
"""
from __future__ import annotations

import base64
import errno
import json
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import IntegrityError, StorageError
from .ids import BlockId, SpacedKey, StoreKey
from .tiers.disk import PRIVATE_FILE, create_exclusive, fsync_dir

MAGIC = b"CKV\xa7"  # as a v1 length it would be 2.8 GB: a v1 file never starts a record with it
_HEADER = struct.Struct("<4sIII")  # magic, payload length, crc32(payload), crc32(magic + length + payload crc)
_V1_HEADER = struct.Struct("<II")  # payload length, crc32(payload)
_V1_PLAUSIBLE = 1 << 24  # no v1 record was this long (one key's JSON)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


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
    """The live keys after every intact record."""
    records: int
    """Intact records replayed."""
    version: int
    """Format of the first record: 1 (legacy), 2, or 0 for an empty or missing journal."""
    damaged: tuple[tuple[int, int], ...]
    """(offset, length) of each region that failed its checks and was skipped (not a torn tail)."""
    torn_at: int | None
    """Offset of the incomplete last record a crash left mid-append (dropped), if any."""
    size: int
    """Bytes in the file when it was read."""
    exists: bool


# -- dtypes -----------------------------------------------------------------------------------
def _exact_json(value: object, what: str) -> object:
    """``value`` if JSON brings it back equal and of the same types; TypeError otherwise."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if type(value) is list:
        return [_exact_json(v, what) for v in value]
    if type(value) is dict and all(type(k) is str for k in value):
        return {k: _exact_json(v, what) for k, v in value.items()}
    raise TypeError(f"{what} holds {type(value).__name__} {value!r}, which the journal cannot record exactly "
                    f"(str, int, float, bool, None, lists and dicts with str keys can be)")


def encode_dtype(dt: np.dtype) -> object:
    """A JSON form of ``dt`` that :func:`decode_dtype` turns back into an identical dtype: field names,
    formats, offsets, item size, titles, nesting, subarrays, byte order, alignment and metadata.

    Raises ``TypeError`` for a dtype that has none (Python objects, titles or metadata that are not
    plain JSON values). ``np.lib.format.dtype_to_descr`` was the old encoding: it loses titles (and
    reloading them failed), overlapping fields and metadata."""
    if dt.hasobject:
        raise TypeError(f"dtype {dt} holds Python objects, which have no bytes to store")
    out: dict[str, object]
    if dt.names is not None:
        fields = [dt.fields[n] for n in dt.names]  # type: ignore[index]
        titles = [f[2] if len(f) > 2 else None for f in fields]
        for t in titles:
            if t is not None and type(t) is not str:
                raise TypeError(f"dtype {dt} has a field title {t!r} that is not a str; the journal records str titles")
        out = {"names": list(dt.names), "formats": [encode_dtype(f[0]) for f in fields],
               "offsets": [f[1] for f in fields], "itemsize": dt.itemsize}
        if any(t is not None for t in titles):
            out["titles"] = titles
        if dt.isalignedstruct:
            out["aligned"] = True
        if dt.type is not np.void:
            if dt.type is not np.record:
                raise TypeError(f"dtype {dt} has scalar type {dt.type.__name__}, which the journal cannot record")
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


def _pack(payload: dict[str, object]) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()  # ensure_ascii: no byte >= 0x80, so no MAGIC
    head = MAGIC + struct.pack("<II", len(body), zlib.crc32(body))
    return head + struct.pack("<I", zlib.crc32(head)) + body


def put_record(r: KeyRecord) -> bytes:
    return _pack({"op": "put", "k": _encode_key(r.key), "id": r.block_id.hex(), "n": r.nbytes,
                  "dt": encode_dtype(r.dtype), "sh": list(r.shape), "p": r.prefix})


def delete_record(key: StoreKey) -> bytes:
    return _pack({"op": "del", "k": _encode_key(key)})


def protect_record(key: StoreKey, prefix: bool) -> bytes:
    return _pack({"op": "prot", "k": _encode_key(key), "p": prefix})


def _v2_length(data: bytes, off: int) -> int | None:
    """Payload length of the v2 record at ``off`` if its header is intact, else ``None``."""
    if off + _HEADER.size > len(data) or not data.startswith(MAGIC, off):
        return None
    _, length, _, head_crc = _HEADER.unpack_from(data, off)
    return length if zlib.crc32(data[off:off + 12]) == head_crc else None


def _json_object(body: bytes) -> dict[str, object] | None:
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


@dataclass(slots=True)
class _Scan:
    records: list[tuple[int, int, dict[str, object]]]  # (offset, end, payload) of each intact record
    damaged: list[tuple[int, int]]  # (start, end)
    torn_at: int | None
    version: int


def _scan(data: bytes) -> _Scan:
    """Split ``data`` into intact records and the regions between them (see the module docstring)."""
    n = len(data)
    records: list[tuple[int, int, dict[str, object]]] = []
    damaged: list[tuple[int, int]] = []
    bad: int | None = None  # start of the region being skipped
    v1 = True  # v1 records are read until the first v2 record or damage
    v1_failure: tuple[int, int] | None = None  # (offset, claimed end) of the v1 record that failed
    torn_v2 = False  # the region being skipped starts with an intact v2 header whose record runs past the end
    version = 0
    off = 0
    while off < n:
        length = _v2_length(data, off)
        if length is not None:
            end = off + _HEADER.size + length
            body = data[off + _HEADER.size:end]
            payload = None
            if end <= n and zlib.crc32(body) == _HEADER.unpack_from(data, off)[2]:
                payload = _json_object(body)
            if payload is not None:
                if bad is not None:
                    damaged.append((bad, off))
                    bad = None
                records.append((off, end, payload))
                version = version or 2
                v1 = False
                off = end
                continue
            if bad is None:
                bad, torn_v2 = off, end > n
        elif v1 and off + _V1_HEADER.size <= n and not data.startswith(MAGIC, off):
            length, crc = _V1_HEADER.unpack_from(data, off)
            end = off + _V1_HEADER.size + length
            body = data[off + _V1_HEADER.size:end]
            payload = _json_object(body) if length and end <= n and zlib.crc32(body) == crc else None
            if payload is not None:
                records.append((off, end, payload))
                version = version or 1
                off = end
                continue
            v1 = False
            # after a v1 record, this is v1 damage; as the first record, an absurd length means it is not v1
            # at all (a v2 record whose magic was hit) and is resynchronised on like any v2 damage
            if version == 1 or length < _V1_PLAUSIBLE:
                v1_failure = (off, end)
            if bad is None:
                bad = off
            nxt = data.find(MAGIC, off)
            off = n if nxt < 0 else nxt
            continue
        elif bad is None:
            bad = off
        v1 = False
        nxt = data.find(MAGIC, off + 1)
        off = n if nxt < 0 else nxt
    if bad is not None:
        region = data[bad:]
        if torn_v2 or n - bad < _HEADER.size or not region.strip(b"\0") or (
                v1_failure is not None and v1_failure[0] == bad and v1_failure[1] > n):
            torn_at: int | None = bad  # what a crash mid-append leaves: dropped, nothing follows it
        else:
            damaged.append((bad, n))
            torn_at = None
    else:
        torn_at = None
    if v1_failure is not None:
        start, claimed = v1_failure
        region_end = next((e for s, e in damaged if s == start), None)
        if region_end is not None and claimed != region_end:
            # v1 cannot resynchronise: what follows the damage might hold records we cannot find
            raise IntegrityError(f"journal: legacy (v1) record at offset {start} is damaged and records may "
                                 f"follow it ({region_end - start} B unreadable); nothing was changed. Move "
                                 f"the journal aside to open the store without its keys")
    return _Scan(records, damaged, torn_at, version)


def _apply(state: dict[StoreKey, KeyRecord], rec: dict[str, object]) -> None:
    key = _decode_key(rec["k"])  # type: ignore[arg-type]
    op = rec["op"]
    if op == "put":
        shape = tuple(int(x) for x in rec["sh"])  # type: ignore[attr-defined]
        state[key] = KeyRecord(key, BlockId(bytes.fromhex(rec["id"])), int(rec["n"]),  # type: ignore[arg-type]
                               decode_dtype(rec["dt"]), shape, bool(rec["p"]))
    elif op == "del":
        state.pop(key, None)
    elif op == "prot":
        if key in state:
            old = state[key]
            state[key] = KeyRecord(old.key, old.block_id, old.nbytes, old.dtype, old.shape, bool(rec["p"]))
    else:
        raise ValueError(f"unknown journal operation {op!r}")


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
        state: dict[StoreKey, KeyRecord] = {}
        damaged = list(scan.damaged)
        records = 0
        for off, end, rec in scan.records:
            try:
                _apply(state, rec)
                records += 1
            except (KeyError, ValueError, TypeError):  # intact but meaningless: skipped like damage
                damaged.append((off, end))
        return Replay(state, records, scan.version, tuple((s, e - s) for s, e in sorted(damaged)),
                      scan.torn_at, len(data), exists)

    def open(self) -> bool:
        """Open an existing journal for appending (writing nothing: a read-only disk fails here, before
        anything changed); ``False`` when there is none yet (:meth:`compact` or :meth:`create` makes it)."""
        if self._fd >= 0:
            return True
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | _NOFOLLOW | _CLOEXEC)
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
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC,
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
            dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
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
