"""The key journal: what a persistent store needs to find its keys again.

Block bytes live in content-addressed files (the disk tier); what maps a key to
a block, with its dtype, shape and prefix flag, is appended here as one record
per change. A record is ``<u32 length><u32 crc32><payload>`` with a JSON payload
(small, rare next to the block write it accompanies, and readable in a pinch).
A crash can only tear the last record; replay stops at the first record whose
length or CRC does not check out, and the journal is rewritten without the
garbage on open. Appending a record is atomic for readers of this process and
``fsync`` makes a batch durable.

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

from .errors import StorageError
from .ids import BlockId, Key

_HEADER = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """The journalled state of one key."""

    key: Key
    block_id: BlockId
    nbytes: int
    dtype: np.dtype
    shape: tuple[int, ...]
    prefix: bool


def _encode_key(key: Key) -> dict[str, str]:
    return {"s": key} if isinstance(key, str) else {"b": base64.b64encode(key).decode()}


def _decode_key(d: dict[str, str]) -> Key:
    return d["s"] if "s" in d else base64.b64decode(d["b"])


def _pack(payload: dict[str, object]) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return _HEADER.pack(len(body), zlib.crc32(body)) + body


def put_record(r: KeyRecord) -> bytes:
    return _pack({"op": "put", "k": _encode_key(r.key), "id": r.block_id.hex(), "n": r.nbytes,
                  "dt": np.lib.format.dtype_to_descr(r.dtype), "sh": list(r.shape), "p": r.prefix})


def delete_record(key: Key) -> bytes:
    return _pack({"op": "del", "k": _encode_key(key)})


def protect_record(key: Key, prefix: bool) -> bytes:
    return _pack({"op": "prot", "k": _encode_key(key), "p": prefix})


def _descr(raw: object) -> object:
    # JSON turns the tuples of a structured dtype's descr into lists; numpy wants tuples back
    if isinstance(raw, list):
        return [tuple(_descr(x) for x in field) if isinstance(field, list) else field for field in raw]
    return raw


def _records(data: bytes) -> Iterator[dict[str, object]]:
    """Yield the payload of each intact record, stopping at the first torn one."""
    off = 0
    while off + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, off)
        body = data[off + _HEADER.size: off + _HEADER.size + length]
        if length == 0 or len(body) != length or zlib.crc32(body) != crc:
            return  # torn; a zero-filled tail (size reached disk, data did not) reads as length 0, crc 0
        off += _HEADER.size + length
        try:
            yield json.loads(body)
        except ValueError:
            return


class Journal:
    """Append-only key journal at ``path``; replayed by :meth:`load`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def load(self) -> dict[Key, KeyRecord]:
        """Replay the journal into the live key table, then rewrite it compactly and open it for appends."""
        state: dict[Key, KeyRecord] = {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        for rec in _records(data):
            key = _decode_key(rec["k"])  # type: ignore[arg-type]
            op = rec["op"]
            if op == "put":
                state[key] = KeyRecord(key, BlockId(bytes.fromhex(rec["id"])), int(rec["n"]),  # type: ignore[arg-type]
                                       np.lib.format.descr_to_dtype(_descr(rec["dt"])),
                                       tuple(rec["sh"]), bool(rec["p"]))  # type: ignore[arg-type]
            elif op == "del":
                state.pop(key, None)
            elif op == "prot" and key in state:
                old = state[key]
                state[key] = KeyRecord(old.key, old.block_id, old.nbytes, old.dtype, old.shape, bool(rec["p"]))
        self.compact(state.values())
        return state

    def compact(self, records: Iterable[KeyRecord]) -> None:
        """Replace the journal by one put record per live key (written aside, then renamed over it)."""
        self.close()
        tmp = self.path.with_suffix(".compact")
        try:
            with open(tmp, "wb") as f:
                for r in records:
                    f.write(put_record(r))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as e:
            raise StorageError(e.errno, f"journal: cannot write {self.path}: {e.strerror}", str(self.path)) from e

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
                os.ftruncate(self._fd, end)  # a torn record mid-file would hide every later one
            except OSError:
                pass
            raise StorageError(e.errno, f"journal: cannot append to {self.path}: {e.strerror}", str(self.path)) from e

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
