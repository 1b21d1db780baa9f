"""The second process of the ``mooncake-remote`` backend: it holds Mooncake Store's memory.

``python -m cascade_kv.bench.peers._mooncake_segment METADATA_URL MASTER SEGMENT_BYTES`` mounts a segment of
``SEGMENT_BYTES`` with the master, touches it, prints ``ready <segment name>`` and serves it (Mooncake's
transfer engine threads do the work) until its standard input closes, then unmounts and exits. A failure
prints ``failed <reason>`` and exits 1.
"""
from __future__ import annotations

import sys

from .base import Unavailable
from .mooncake import connect, touch


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: python -m {__spec__.name if __spec__ else __name__} METADATA_URL MASTER SEGMENT_BYTES",
              file=sys.stderr)
        return 2
    metadata_url, master, segment_bytes = argv[0], argv[1], int(argv[2])
    try:
        store = connect(metadata_url, master, segment_bytes)
    except Unavailable as e:
        print(f"failed {e}", flush=True)
        return 1
    try:
        touch(store, segment_bytes)
        print(f"ready {store.get_hostname()}", flush=True)
        sys.stdin.buffer.read()  # until the backend closes our stdin (or dies)
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
