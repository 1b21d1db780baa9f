"""A doorbell per rank: a UDP socket that wakes a service thread asleep in the kernel.

Open MPI has no receive that blocks in the kernel: every blocking call polls, so a
service thread waiting in ``MPI_Mprobe`` takes most of a core however idle its rank
is (measured 0.85-1.0 CPU-s per second). A rank's service therefore polls MPI only
while requests come (its *hot* window, see :mod:`.service`) and otherwise sleeps in
``select`` on this socket. A caller sends its request over MPI as before and then
*rings*: a one-byte datagram to the owner's doorbell. The datagram carries nothing
(its bytes are never read for meaning), so a stray or forged one costs a wake-up and
no more, and a lost one (UDP between hosts) is covered by the caller ringing again
while it waits.

Why UDP: it needs no connection per pair of ranks (a job of 1,000 ranks would need a
million TCP connections), reaches other hosts as well as this one, and a send never
blocks (``MSG_DONTWAIT``; a full socket buffer already holds rings enough). A Unix
datagram socket would serve one host only; an eventfd, one process.

Addresses. Every rank binds an ephemeral port on all interfaces and publishes
``(host name, address, port)``; a caller on the same host rings ``127.0.0.1``,
one on another host rings the address the owner published: ``CASCADE_DOORBELL_ADDR``
if set there, else the owner's host name resolved by the owner (a cluster's node
names resolve to its network). Where that gives only a loopback address and ranks
span hosts, :class:`Doorbells` refuses to start (naming the variable to set) rather
than ring the wrong host and time out later.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
from collections.abc import Sequence

from ..errors import ConfigError

ADDRESS_VARIABLE = "CASCADE_DOORBELL_ADDR"
"""The IPv4 address other hosts ring this rank's doorbell at (default: this host's name, resolved)."""

_RING = b"\x01"
_DRAIN = 4096


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def own_address(environ: dict[str, str] | None = None) -> str | None:
    """The address other hosts should ring: the variable, else this host's name resolved; None if loopback only."""
    env = os.environ if environ is None else environ
    given = env.get(ADDRESS_VARIABLE, "").strip()
    if given:
        try:
            ipaddress.IPv4Address(given)
        except ValueError:
            raise ConfigError(f"{ADDRESS_VARIABLE}={given!r} is not an IPv4 address") from None
        return given
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return None
    for info in infos:
        address = str(info[4][0])
        if not _is_loopback(address):
            return address
    return None


class Doorbells:
    """This rank's doorbell and the addresses of every rank's. Built from :meth:`card`s exchanged by the caller.

    ``wait()`` blocks in the kernel until a ring (or :meth:`wake_self`); ``drain()`` empties the socket;
    ``ring(rank)`` never blocks. Thread-safe: ``ring`` from any thread, ``wait``/``drain`` from the one
    service thread.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._sock.bind(("0.0.0.0", 0))
            self._sock.setblocking(False)
            # A separate socket to send from: rings leave even while the service thread is in select() on ours.
            self._out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._out.setblocking(False)
        except BaseException:
            self._sock.close()
            raise
        self.port: int = self._sock.getsockname()[1]
        self._peers: list[tuple[str, int] | None] = []

    def card(self) -> tuple[str, str | None, int]:
        """What the other ranks need to ring this one: (host name, address for other hosts, port)."""
        return socket.gethostname(), own_address(), self.port

    def connect(self, cards: Sequence[tuple[str, str | None, int]], rank: int) -> None:
        """Learn every rank's address from the cards of all ranks (this one is ``cards[rank]``)."""
        host = cards[rank][0]
        peers: list[tuple[str, int] | None] = []
        for r, (name, address, port) in enumerate(cards):
            if name == host:
                peers.append(("127.0.0.1", port))
            elif address is not None:
                peers.append((address, port))
            else:
                raise ConfigError(f"rank {r} runs on host {name!r}, whose name resolves only to a loopback address "
                                  f"there, so rank {rank} on {host!r} cannot wake it; set {ADDRESS_VARIABLE} to that "
                                  "host's address on the cluster network")
        self._peers = peers

    def ring(self, rank: int) -> None:
        """Wake ``rank``'s service thread if it sleeps. Never blocks; a ring that cannot be sent is dropped
        (a full buffer already holds a ring; the caller rings again while it waits)."""
        try:
            self._out.sendto(_RING, self._peers[rank])  # type: ignore[arg-type]
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.ECONNREFUSED):
                raise

    def wake_self(self) -> None:
        self._out.sendto(_RING, ("127.0.0.1", self.port))

    def drain(self) -> bool:
        """Empty the socket; True if any ring was waiting."""
        rung = False
        while True:
            try:
                self._sock.recv(_DRAIN)
            except (BlockingIOError, InterruptedError):
                return rung
            except ConnectionRefusedError:  # an ICMP error from an earlier send on Linux: not a ring
                continue
            rung = True

    def wait(self) -> None:
        """Block in the kernel until a ring is waiting; it stays there for :meth:`drain` (the service drains
        before it sleeps again). No ``recv`` here: every system call gives up the GIL, and on a rank whose main
        thread is busy in Python each one costs up to a switch interval to get it back."""
        select.select([self._sock], [], [])

    def close(self) -> None:
        self._sock.close()
        self._out.close()


__all__ = ["ADDRESS_VARIABLE", "Doorbells", "own_address"]
