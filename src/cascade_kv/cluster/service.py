"""A service thread per rank and a small request/response layer over MPI.

Every rank runs one :class:`Service`: a daemon thread that blocks in a matched
probe for requests on a private duplicate of the communicator, runs the handler
registered for the request's op, and sends the reply back. Any thread of any
rank can :meth:`~Service.call` a rank, or :meth:`~Service.call_many` several
(all requests are sent first, then the replies collected: one round trip's
latency for the whole batch). The global directory is built on this.

Wire format. A message is a fixed 24-byte header (:data:`HEADER`) followed by
the payload, sent as *one* message, so a small lookup costs one send each way
and no pickling. The receiver sizes its buffer from a matched probe
(``Mprobe``/``Improbe`` then ``Message.Recv``): a probe costs a microsecond or
two and puts no limit on the payload. The alternative, a fixed maximum inline
size with a follow-up message for larger payloads, was rejected: it saves that
microsecond but needs a second protocol path, and a second matching problem,
for the rare large reply. A matched probe (unlike ``Probe`` + ``Recv``) removes
the message from the queue atomically, so concurrent receivers cannot steal
each other's messages.

Reply matching. Each ``call``/``call_many`` takes a fresh *reply tag* from a
per-process counter and writes it into the header of every request it sends;
the service thread replies with that tag. The caller then probes only its own
tag, so MPI's matching engine routes each reply straight to the thread that is
waiting for it, however many application threads call at once. Within a batch
the header's request id (unique per process) says which request a reply
answers. A reply dispatcher thread was rejected: every reply would pay a second
thread hand-off (a GIL switch and a condition-variable wake-up, tens of
microseconds on a busy rank). A reply that arrives after its caller timed out
carries a tag nobody else uses (tags wrap only after 2**31 calls), so it can
never be taken for another reply; it is received and dropped by a later call.

Bounded waits. A caller polls for its replies (``Improbe``) until a deadline:
it spins for :data:`SPIN_S` (a round trip between idle ranks takes ~20 us), then
sleeps a quarter of the time waited so far, within :data:`FIRST_SLEEP_S` ..
:data:`MAX_SLEEP_S`, so a slow peer does not cost a core on a machine where
ranks share cores. Sleeping in proportion to the wait bounds the latency added
to a late reply at about 25% of it; plain doubling was rejected because it adds
up to 100%. Past the deadline it raises :class:`~cascade_kv.errors.PeerTimeout` naming the rank, the
op and the time waited. ``close()`` bounds its barrier and its join the same way.

Idle ranks cost nothing. Open MPI has no receive that blocks in the kernel: its
blocking calls poll, so a service thread waiting in ``Mprobe`` takes most of a core
however idle its rank is (0.85-1.0 core-seconds per second measured here). The
service thread therefore waits in ``Mprobe`` only while requests come: after
:data:`HOT_S` without one, an *idle timer* (a second thread, asleep on a condition
variable) sends it :data:`_OP_SLEEP`, and it sleeps in ``select`` on its
:mod:`doorbell <.doorbell>`, a UDP socket, until a caller rings. A caller rings
just before sending its request (the wake-up overlaps the send), unless that rank
answered it within ``HOT_S / 2`` (then it is still polling), and rings again every
:data:`RING_AGAIN_S` (doubling) while it waits, so a lost datagram or a wrong
belief costs milliseconds, never a hang.
Before sleeping the thread drains the doorbell (rings that came while it polled are
stale) and probes once more: a request that came meanwhile keeps it hot. A request
still in flight whose ring was drained waits for its caller's next ring (2 ms). One-sided reads do not need the owner: osc/sm reads
the window directly, and Open MPI's TCP transport progresses ``Get`` on its own
(checked: 192 MiB read over ``--mca btl tcp,self --mca osc rdma`` from a rank whose
threads all slept). Replies still being sent keep the thread in MPI until they
leave. Tried and rejected, with figures, in docs/distributed-design.md ("Idle
ranks"): polling with sleeps (latency grows with the gap), requests over sockets
(every round trip pays a kernel wake-up), MPI's own blocking calls (they poll).

The service thread needs the GIL to answer. A main thread that blocks in C code
*holding* the GIL stops its rank from answering, and a peer waiting on that rank
then gets ``PeerTimeout``. One such call is easy to make by accident: mpi4py's
first pickle-based ``reduce``/``allreduce`` over a communicator creates a private
duplicate of it (a collective ``MPI_Comm_dup``) with the GIL held, so a rank that
enters one while a peer still waits on its service deadlocks both until the
timeout (measured: it failed the 4-rank test every run). The constructor does
that first reduction on ``comm`` itself, where every rank is in a collective
anyway; other communicators need the same care (or buffer-based ``Allreduce``).

Handlers run on the service thread, one at a time, and **must never block on
another rank** (no ``call``, no collective, no blocking receive): two service
threads each waiting in a handler for the other's answer would deadlock, and
every request queued behind them would time out. A handler that needs another
rank's data must return what it has and let the caller ask that rank. A call
to one's own rank runs the handler directly on the calling thread (no MPI), so
handlers must also be thread-safe.
"""
from __future__ import annotations

import itertools
import logging
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mpi4py import MPI

from ..errors import ConfigError, InternalError, PeerTimeout, RemoteError, ServiceClosed
from .doorbell import Doorbells

log = logging.getLogger(__name__)

Handler = Callable[[int, memoryview], "bytes | bytearray | memoryview"]
"""``handler(source_rank, payload) -> reply``. ``payload`` is valid only during the call: copy what you keep."""

HEADER = struct.Struct("<HHIQII")
"""op (u16), flags (u16, reserved, 0), payload length (u32), request id (u64), status (u32), reply tag (u32)."""

MAX_OP = 0xFFEF
"""Largest op a caller may register; ops above are the service's own."""

MAX_PAYLOAD = (1 << 31) - 1 - HEADER.size
"""Largest request or reply payload: one message of at most 2**31 - 1 bytes (an MPI ``int`` count)."""

_OP_STOP = 0xFFFF  # sent by a rank to itself in close(): the service thread exits
_OP_ARRIVALS = 0xFFFE  # how many bounded collective waits this rank has entered (to name the missing ranks)
_OP_SLEEP = 0xFFFD  # sent by a rank's idle timer to its own service thread: leave MPI and sleep in the kernel
_U64 = struct.Struct("<Q")
ARRIVALS_WAIT_S = 1.0
"""How long a rank whose barrier timed out waits for the others to say whether they arrived."""
_TEST_SENDS_AT = 16
"""Replies' sends are tested for completion once this many are outstanding (and before sleeping), not after
each reply: every MPI call gives up the GIL, which a rank busy in Python hands back only after a switch
interval. Small replies complete at once (eager), so the list stays short."""
_REQUEST_TAG = 1
_FIRST_REPLY_TAG = 2

# Reply status. A handler's exception travels as "<type name>\0<message>" in the payload.
_OK = 0
_HANDLER_ERROR = 1
_UNKNOWN_OP = 2
_BAD_REQUEST = 3

HOT_S = 0.01
"""How long a service thread keeps polling MPI after its last request before it sleeps in the kernel.

Inside the window a request is answered at MPI's own latency (the thread waits in ``Mprobe``); after it,
a request pays a kernel wake-up (a ring, see :mod:`.doorbell`). The window costs up to a core for its
length after each burst of requests, so it is short: engines send requests in bursts (one ``get_many``
asks several homes at once), and 10 ms covers a burst and the next request of a busy engine. Measured
choices are in docs/distributed-design.md ("Idle ranks")."""
RING_AGAIN_S = 2e-3
"""A caller whose request is unanswered this long rings the owner again (then at doubling intervals):
a lost datagram or a ring skipped on a stale belief that the owner was hot costs this much, never a hang."""

SPIN_S = 100e-6
"""Poll without sleeping this long before backing off (several idle round trips)."""
RUNG_SPIN_S = 1e-3
"""A caller that rang a sleeping owner spins this long instead: the owner's wake-up takes 150-250 us here, and a
caller that went to sleep meanwhile adds its own wake-up from a halted CPU (measured: a call to a rank asleep
for 30 ms took ~1,000 us with SPIN_S, of which the owner spent 137 us from its wake to the handler)."""
FIRST_SLEEP_S = 20e-6
MAX_SLEEP_S = 2e-3
"""Backoff bounds: the cap keeps a stalled wait to ~500 polls/s and a late reply's extra latency to ~2 ms."""

TIMER_CHECK_S = 5.0
"""How often the idle timer looks again while the service thread is not hot by its account. Two states escape
its notifications: a wake-up that brought no request (a stray datagram, or a ring that arrived after its
request was served: the thread goes back to MPI and tells the timer only after a reply, so that the request
that rang is not delayed), and an ``_OP_SLEEP`` the thread has not taken (seen once here under heavy load: the
thread polled in ``Mprobe`` for the rest of the run, which its rank's benchmark read as a service that never
slept). Either way the thread would poll until the next request; the timer finds it within this long and
asks again. Its cost: a wake-up every 5 s on a sleeping rank. Measured here (`cascade bench --ranks 2 --quick`,
idle ranks' CPU): 0.15 % with no checks, 0.33-0.43 % checking every second (a wake-up of a sleeping process
costs this VM 2-3 ms of CPU)."""

SERVICE_SWITCH_INTERVAL = 0.0005
"""GIL switch interval set while a service is open, if the interpreter's is still CPython's default (5 ms).

A request that arrives while the rank's main thread runs pure Python may have to
wait for the GIL, which the holder gives up only every switch interval. Measured
with ``python -m cascade_kv.bench.directory_rtt`` (2 ranks on 2 shared cores), the
median round trip to a busy peer stays ~15 us either way, but p99 falls from
13-20 ms at 5 ms to 6-8 ms at 0.5 ms (the rest is the OS scheduler: four threads
poll on two cores). The price is more frequent switches between the
application's own threads. An interval the application set itself is left alone."""
_DEFAULT_SWITCH_INTERVAL = 0.005


HANDLING_SWITCH_INTERVAL = 50e-6
"""GIL switch interval while a service thread handles a request (from the moment it has the GIL back until it
blocks again), if the interpreter's is longer.

Every MPI or socket call on the service's path gives up the GIL; on a rank whose main thread runs pure Python,
each one then waits up to a switch interval to get it back: about six such waits to answer a request after a
sleep, 2.4 ms median at 0.5 ms. Lowering the interval for the few hundred microseconds of handling bounds each
wait after the first to ~50 us. Lowering it for good was rejected: every CPU-bound thread of the application
would then switch every 50 us, not only while a request is being answered."""


# --------------------------------------------------------------- GIL switch interval
# The interval "outside handling" is the base that _lower/_restore manage; while any service thread handles a
# request (_handling > 0) the live interval is HANDLING_SWITCH_INTERVAL and the base waits in _base_interval.
_switch_lock = threading.Lock()
_switch_users = 0
_switch_lowered = False
_handling = 0
_base_interval = 0.0


def _get_base() -> float:
    return _base_interval if _handling else sys.getswitchinterval()


def _set_base(value: float) -> None:
    global _base_interval
    if _handling:
        _base_interval = value
    else:
        sys.setswitchinterval(value)


def _lower_switch_interval() -> None:
    global _switch_users, _switch_lowered
    with _switch_lock:
        if _switch_users == 0 and _get_base() == _DEFAULT_SWITCH_INTERVAL:
            _set_base(SERVICE_SWITCH_INTERVAL)
            _switch_lowered = True
        _switch_users += 1


def _restore_switch_interval() -> None:
    global _switch_users, _switch_lowered
    with _switch_lock:
        _switch_users -= 1
        if _switch_users == 0 and _switch_lowered:
            if _get_base() == SERVICE_SWITCH_INTERVAL:  # unless someone changed it since
                _set_base(_DEFAULT_SWITCH_INTERVAL)
            _switch_lowered = False


def _start_handling() -> None:
    global _handling, _base_interval
    with _switch_lock:
        if _handling == 0:
            _base_interval = sys.getswitchinterval()
            if _base_interval > HANDLING_SWITCH_INTERVAL:
                sys.setswitchinterval(HANDLING_SWITCH_INTERVAL)
        _handling += 1


def _end_handling() -> None:
    global _handling
    with _switch_lock:
        _handling -= 1
        if _handling == 0:
            sys.setswitchinterval(_base_interval)


def _wait(test: Callable[[], bool], deadline: float, spin: float = SPIN_S) -> bool:
    """Poll ``test`` until it returns True (-> True) or ``deadline`` passes (-> False); spin for ``spin``
    seconds, then back off."""
    started = time.perf_counter()
    while not test():
        now = time.perf_counter()
        if now >= deadline:
            return False
        waited = now - started
        if waited >= spin:
            time.sleep(min(max(waited / 4, FIRST_SLEEP_S), MAX_SLEEP_S, deadline - now))
    return True


def _error_payload(exc: BaseException) -> bytes:
    return f"{type(exc).__qualname__}\0{exc}".encode("utf-8", "replace")


class Service:
    """The request/response service of one rank. Collective: every rank of ``comm`` builds one.

    ``timeout`` bounds every wait on a peer (seconds); ``hot_s`` is how long the service thread polls MPI
    after its last request before it sleeps in the kernel (:data:`HOT_S`). ``handlers`` are registered
    before the service thread starts, so no request, even one from a rank that is
    already calling, can find its op unregistered; :meth:`register` adds more later.
    """

    def __init__(self, comm: MPI.Comm, *, timeout: float = 30.0,
                 handlers: Mapping[int, Handler] | None = None, hot_s: float = HOT_S) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if isinstance(hot_s, bool) or not isinstance(hot_s, (int, float)) or not hot_s >= 0:
            raise ConfigError(f"hot_s must be a number of seconds >= 0, got {hot_s!r}")
        self.hot_s = float(hot_s)
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise ConfigError("the service thread needs MPI_THREAD_MULTIPLE; MPI was initialised with "
                              f"level {MPI.Query_thread()} (leave mpi4py.rc.thread_level at 'multiple')")
        self.timeout = float(timeout)
        self._handlers: dict[int, Handler] = {}
        for op, handler in (handlers or {}).items():
            self.register(op, handler)
        # Warm mpi4py's lazily built context for object reductions on comm (see the module docstring).
        comm.allreduce(0)
        self._comm = comm.Dup()  # collective; our traffic can never match the application's receives
        self.rank: int = self._comm.Get_rank()
        self.size: int = self._comm.Get_size()
        # MPI promises TAG_UB on COMM_WORLD only (Open MPI 5 answers None on COMM_SELF and its duplicates);
        # every communicator shares the same upper bound
        tag_ub = self._comm.Get_attr(MPI.TAG_UB) or MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)
        self._tag_span = int(tag_ub) - _FIRST_REPLY_TAG + 1
        # next() on itertools.count is atomic under the GIL: no lock on the call path.
        self._tags = itertools.count()
        self._ids = itertools.count(1)
        # Reply tag -> [replies still to come, (send request, buffer) pairs still in flight] of
        # timed-out calls; drained by later calls so late replies do not pile up unreceived.
        self._abandoned: dict[int, list[Any]] = {}
        self._abandoned_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._closed = False
        self._arrivals = 0  # bounded collective waits entered (see _missing())
        self._close_barrier: tuple[MPI.Request, int] | None = None  # kept: a close() that timed out can be retried
        self._doorbells = Doorbells()
        try:
            self._doorbells.connect(self._comm.allgather(self._doorbells.card()), self.rank)
        except BaseException:
            self._doorbells.close()
            self._comm.Free()
            raise
        # When each rank last answered this one (perf_counter, _wait's clock): a rank that answered within HOT_S / 2 is still
        # polling MPI, so a request to it needs no ring. Plain dict: one float per rank, written under the GIL.
        self._answered: dict[int, float] = {}
        self._last_served = time.monotonic()
        self._hot = True
        self._tell_timer = False  # the thread woke from the kernel; the timer learns after the first reply
        self._stopping = False
        self._hot_changed = threading.Condition()
        self.sleeps = 0
        """How many times the service thread has gone to sleep in the kernel (for tests and the benchmark)."""
        self.asleep = threading.Event()
        """Set while the service thread sleeps in the kernel (tests wait on it instead of on the clock)."""
        _lower_switch_interval()
        self._thread = threading.Thread(target=self._serve, name=f"cascade-service-{self.rank}", daemon=True)
        self._thread.start()
        self._timer = threading.Thread(target=self._idle_timer, name=f"cascade-idle-{self.rank}", daemon=True)
        self._timer.start()

    # ------------------------------------------------------------------ handlers
    def register(self, op: int, handler: Handler) -> None:
        """Serve ``op`` with ``handler`` (see the module docstring: it must not block on other ranks).

        A request for an op not yet registered fails with :class:`RemoteError`; register
        on every rank before any rank calls (or pass ``handlers=`` to the constructor).
        """
        if isinstance(op, bool) or not isinstance(op, int) or not 0 <= op <= MAX_OP:
            raise ValueError(f"op must be an int in 0..{MAX_OP}, got {op!r}")
        if not callable(handler):
            raise TypeError(f"handler for op {op} must be callable, got {type(handler).__name__}")
        if op in self._handlers:
            raise ValueError(f"op {op} already has a handler ({self._handlers[op]!r})")
        self._handlers[op] = handler

    def _dispatch(self, source: int, op: int, payload: memoryview) -> tuple[int, bytes | bytearray | memoryview,
                                                                           BaseException | None]:
        """Run the handler: (status, reply payload, the exception it raised if any)."""
        if op == _OP_ARRIVALS:
            return _OK, _U64.pack(self._arrivals), None
        handler = self._handlers.get(op)
        if handler is None:
            return _UNKNOWN_OP, f"LookupError\0no handler registered for op {op}".encode(), None
        try:
            reply = handler(source, payload)
        except Exception as exc:  # travels to the caller as RemoteError
            log.debug("rank %d: handler for op %d (from rank %d) raised", self.rank, op, source, exc_info=True)
            return _HANDLER_ERROR, _error_payload(exc), exc
        if not isinstance(reply, (bytes, bytearray, memoryview)):
            exc = TypeError(f"handler returned {type(reply).__name__}, not bytes")
            return _HANDLER_ERROR, _error_payload(exc), exc
        if len(reply) > MAX_PAYLOAD:
            exc = ValueError(f"handler returned {len(reply)} B, more than a message holds ({MAX_PAYLOAD} B)")
            return _HANDLER_ERROR, _error_payload(exc), exc
        return _OK, reply, None

    # ------------------------------------------------------------- service thread
    def _serve(self) -> None:
        comm, status = self._comm, MPI.Status()
        buf = bytearray(4096)
        sending: list[tuple[MPI.Request, bytes]] = []  # replies whose Isend has not completed
        msg: MPI.Message | None = None
        handling = False  # the GIL switch interval is lowered (_start_handling) while a request is answered
        woke = False
        try:
            while True:
                if msg is None:
                    if handling and not woke:
                        _end_handling()
                        handling = False
                    woke = False  # just woke: the request that rang is taken at the lowered interval
                    msg = comm.Mprobe(MPI.ANY_SOURCE, _REQUEST_TAG, status)
                if not handling:
                    _start_handling()
                    handling = True
                n, source = status.Get_count(MPI.BYTE), status.Get_source()
                if n > len(buf):
                    buf = bytearray(max(n, 2 * len(buf)))  # a handler may still hold a view of the old one
                msg.Recv([buf, n, MPI.BYTE])
                msg = None
                if n < HEADER.size:
                    log.warning("rank %d: dropped a %d-byte request from rank %d (shorter than a header)",
                                self.rank, n, source)
                    continue
                op, _flags, length, request_id, _status, reply_tag = HEADER.unpack_from(buf)
                if source == self.rank and op == _OP_STOP:
                    break
                if source == self.rank and op == _OP_SLEEP:
                    sending = [(r, b) for r, b in sending if not r.Test()]
                    if handling:  # never asleep with the interval lowered: the application's threads would pay
                        _end_handling()
                        handling = False
                    sleeps = self.sleeps
                    msg = self._sleep(bool(sending), status)
                    if self.sleeps != sleeps:  # back from the kernel: the request that rang is near
                        _start_handling()  # its first GIL hand-offs (Mprobe, Recv) are short too
                        handling = woke = True
                    continue
                if length != n - HEADER.size:
                    code, reply = _BAD_REQUEST, _error_payload(
                        ValueError(f"header says {length} B of payload, message has {n - HEADER.size} B"))
                else:
                    code, reply, _exc = self._dispatch(source, op, memoryview(buf)[HEADER.size:n])
                out = HEADER.pack(op, 0, len(reply), request_id, code, reply_tag) + reply
                # Isend, not Send: a large reply to a rank that stopped receiving must not
                # block this thread (and every request queued behind it) forever.
                sending.append((comm.Isend([out, MPI.BYTE], source, reply_tag), out))
                if len(sending) >= _TEST_SENDS_AT:
                    sending = [(r, b) for r, b in sending if not r.Test()]
                self._last_served = time.monotonic()
                if self._tell_timer:
                    self._tell_timer = False
                    self._stay_hot()
        except Exception:  # an MPI failure: peers get PeerTimeout from now on, close() still works
            log.exception("rank %d: service thread stopped", self.rank)
        finally:
            if handling:
                _end_handling()

    def _sleep(self, sends_pending: bool, status: MPI.Status) -> MPI.Message | None:
        """The idle timer asked this thread to leave MPI: block in the kernel until a ring, unless there is a
        reason to stay hot. Returns a request found on the way (to be served), else None."""
        if (sends_pending  # a reply still needs this rank's progress to leave
                or time.monotonic() - self._last_served < self.hot_s):  # a request came after the timer looked
            self._stay_hot()
            return None
        # Rings that came while the thread polled are stale: their requests were served. Staying hot for them
        # was rejected: a caller every 20 ms kept a 10 ms window hot for ever (a ring always waiting; measured
        # 100 % of a core). A request still in flight whose ring this drops is rung again by its caller after
        # RING_AGAIN_S; one already here is found by the probe below.
        self._doorbells.drain()
        msg = self._comm.Improbe(MPI.ANY_SOURCE, _REQUEST_TAG, status)
        if msg is not None:
            self._stay_hot()
            return msg
        self.sleeps += 1
        self.asleep.set()
        if not self._stopping:
            self._doorbells.wait()
        self.asleep.clear()
        # Back in MPI at once; the idle timer is told after the first reply (_serve), so waking it
        # (another thread wanting the GIL) does not delay the request that rang.
        self._last_served = time.monotonic()
        self._hot = True
        self._tell_timer = True
        return None

    def _stay_hot(self) -> None:
        """Start a new hot window (and let the idle timer know the thread is back in MPI)."""
        with self._hot_changed:
            self._last_served = time.monotonic()
            self._hot = True
            self._hot_changed.notify()

    def _idle_timer(self) -> None:
        """Sends the service thread :data:`_OP_SLEEP` once no request has come for :data:`HOT_S`. Blocks in the
        kernel throughout: on a timed wait while the service is hot, on a condition while it sleeps, which it
        leaves every :data:`TIMER_CHECK_S` to look again (see there)."""
        sleep_request = HEADER.pack(_OP_SLEEP, 0, 0, 0, 0, 0)
        asked = 0.0  # when the last _OP_SLEEP went
        try:
            while True:
                with self._hot_changed:
                    self._hot_changed.wait_for(lambda: self._hot or self._stopping, TIMER_CHECK_S)
                    if self._stopping:
                        return
                    now = time.monotonic()
                    if not self._hot and (self.asleep.is_set() or now - asked < TIMER_CHECK_S):
                        continue  # asleep, or on its way there
                    left = self._last_served + self.hot_s - now
                    if self._hot and left > 0:
                        self._hot_changed.wait(left)  # woken early only by close()
                        continue
                    self._hot = False  # the service thread sets it back if it stays in MPI
                    asked = now
                self._comm.Send([sleep_request, MPI.BYTE], self.rank, _REQUEST_TAG)
        except Exception:  # an MPI failure: the service thread stays hot (as it always did before)
            log.exception("rank %d: idle timer stopped", self.rank)

    # ------------------------------------------------------------------- calling
    def call(self, rank: int, op: int, payload: bytes) -> bytes:
        """Send ``payload`` to ``op`` on ``rank`` and return the reply."""
        return self.call_many([(rank, op, payload)])[0]

    def call_many(self, requests: Sequence[tuple[int, int, bytes]]) -> list[bytes]:
        """Send every ``(rank, op, payload)`` request, then collect the replies, in request order.

        Requests to this rank run here, while the others are in flight. If any request
        fails, the first failure is raised (:class:`RemoteError`) after all replies are in;
        if any rank does not answer within ``timeout``, :class:`PeerTimeout` is raised.
        """
        if self._closed:
            raise ServiceClosed(f"rank {self.rank}: service used after close()")
        if self._abandoned:
            self._drain_abandoned()
        for rank, op, payload in requests:
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.size:
                raise ValueError(f"rank must be an int in 0..{self.size - 1}, got {rank!r}")
            if isinstance(op, bool) or not isinstance(op, int) or not 0 <= op <= MAX_OP:
                raise ValueError(f"op must be an int in 0..{MAX_OP}, got {op!r}")
            if not isinstance(payload, (bytes, bytearray, memoryview)):
                raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
            if len(payload) > MAX_PAYLOAD:
                raise ValueError(f"payload of {len(payload)} B is over the {MAX_PAYLOAD} B a request holds")
        replies, errors, late, waited = self._exchange(requests, self.timeout)
        if late:
            raise self._timeout_error(requests, late, waited)
        if errors:
            raise errors[min(errors)]
        return replies  # type: ignore[return-value]  # every slot is filled: nothing is late

    def _exchange(self, requests: Sequence[tuple[int, int, bytes]], timeout: float
                  ) -> tuple[list[bytes | None], dict[int, RemoteError], list[int], float]:
        """Send the requests and collect replies for up to ``timeout`` seconds: the replies (None where
        none came), the errors by index, the indices of the requests left unanswered, and the time waited."""
        started = time.perf_counter()  # _wait's clock
        tag = _FIRST_REPLY_TAG + next(self._tags) % self._tag_span
        replies: list[bytes | None] = [None] * len(requests)
        errors: dict[int, RemoteError] = {}
        waiting: dict[int, int] = {}  # request id -> index into requests
        sends: list[MPI.Request] = []
        buffers: list[bytes] = []  # kept alive until their sends complete
        local: list[int] = []
        # Ring first, then send: the owner's wake-up (~165 us here) overlaps the sends (the first after a pause
        # took ~170 us); an owner that wakes before its request arrives stays hot, in Mprobe, until it does.
        spin = SPIN_S
        fresh = started - self.hot_s / 2
        for rank in {r for r, _, _ in requests if r != self.rank}:
            if self._answered.get(rank, -1.0) < fresh:
                self._doorbells.ring(rank)
                spin = RUNG_SPIN_S
        for i, (rank, op, payload) in enumerate(requests):
            if rank == self.rank:
                local.append(i)
                continue
            request_id = next(self._ids)
            out = HEADER.pack(op, 0, len(payload), request_id, 0, tag) + payload
            sends.append(self._comm.Isend([out, MPI.BYTE], rank, _REQUEST_TAG))
            buffers.append(out)
            waiting[request_id] = i
        for i in local:
            op, payload = requests[i][1], requests[i][2]
            code, reply, exc = self._dispatch(self.rank, op, memoryview(payload))
            self._settle(i, op, self.rank, code, reply, replies, errors)
            if exc is not None:
                errors[i].__cause__ = exc  # here the traceback is at hand: keep it

        status = MPI.Status()
        ring_at = [started + RING_AGAIN_S]

        def progress() -> bool:
            while waiting:
                msg = self._comm.Improbe(MPI.ANY_SOURCE, tag, status)
                if msg is None:
                    now = time.perf_counter()
                    if now >= ring_at[0]:
                        for rank in {requests[i][0] for i in waiting.values()}:
                            self._doorbells.ring(rank)
                        ring_at[0] = now + 2 * (now - started)
                    return False
                buf = bytearray(status.Get_count(MPI.BYTE))
                msg.Recv([buf, MPI.BYTE])
                op, _flags, length, request_id, code, _tag = HEADER.unpack_from(buf)
                i = waiting.pop(request_id, -1)
                source = status.Get_source()
                if i < 0 or requests[i][1] != op or length != len(buf) - HEADER.size:  # settling it would misfile bytes
                    raise InternalError(f"rank {self.rank}: a reply from rank {source} (op {op}, request {request_id}, "
                                        f"{length} B announced, {len(buf) - HEADER.size} B came) matches no request "
                                        f"of this call")
                self._answered[source] = time.perf_counter()
                self._settle(i, op, source, code, memoryview(buf)[HEADER.size:], replies, errors)
            # Every reply is in, so every request was received; the sends finish at once.
            return MPI.Request.Testall(sends)

        if not _wait(progress, started + timeout, spin):
            self._abandon(tag, len(waiting), sends, buffers)
            return replies, errors, sorted(waiting.values()), time.perf_counter() - started
        return replies, errors, [], time.perf_counter() - started

    def _settle(self, i: int, op: int, rank: int, code: int, reply: bytes | bytearray | memoryview,
                replies: list[bytes | None], errors: dict[int, RemoteError]) -> None:
        if code == _OK:
            replies[i] = bytes(reply)
        else:
            remote_type, _, message = bytes(reply).decode("utf-8", "replace").partition("\0")
            errors[i] = RemoteError(rank, op, remote_type, message)

    def barrier(self, what: str, comm: MPI.Comm | None = None) -> None:
        """A barrier over ``comm`` (default: the service's own communicator, which has the same ranks) bounded
        by the timeout; past it, :class:`PeerTimeout` naming the ranks that did not arrive. Every rank must
        enter the same bounded waits in the same order (they are counted)."""
        self._arrivals += 1
        self._await(what, (self._comm if comm is None else comm).Ibarrier(), self._arrivals)

    def _await(self, what: str, request: MPI.Request, arrival: int) -> None:
        started = time.perf_counter()
        if not _wait(request.Test, started + self.timeout):
            raise PeerTimeout(f"rank {self.rank}: {what} waited {time.perf_counter() - started:.3f} s "
                              f"(timeout {self.timeout:g} s); {self._missing(arrival)}")

    def _missing(self, arrival: int) -> str:
        """Which ranks have not entered the ``arrival``-th bounded wait: asked through their service threads,
        which answer even while their application threads are elsewhere; one that does not answer within
        :data:`ARRIVALS_WAIT_S` is named as silent."""
        requests = [(r, _OP_ARRIVALS, b"") for r in range(self.size) if r != self.rank]
        replies, _, silent, _ = self._exchange(requests, min(self.timeout, ARRIVALS_WAIT_S))
        behind = [requests[i][0] for i, reply in enumerate(replies)
                  if reply is not None and _U64.unpack(reply)[0] < arrival]
        said = f"rank(s) {behind} did not arrive" if behind else "every rank that answered arrived"
        if silent:
            said += f"; rank(s) {[requests[i][0] for i in silent]} did not answer"
        return said

    def _timeout_error(self, requests: Sequence[tuple[int, int, bytes]], pending: Any, waited: float) -> PeerTimeout:
        late = sorted(pending)
        rank, op, _ = requests[late[0]]
        more = ""
        if len(late) > 1:
            more = f" (and {len(late) - 1} more request(s) to rank(s) {sorted({requests[i][0] for i in late[1:]})})"
        return PeerTimeout(f"rank {self.rank}: no reply from rank {rank} to op {op} after {waited:.3f} s "
                           f"(timeout {self.timeout:g} s){more}")

    def _abandon(self, tag: int, replies_due: int, sends: list[MPI.Request], buffers: list[bytes]) -> None:
        with self._abandoned_lock:
            self._abandoned[tag] = [replies_due, list(zip(sends, buffers, strict=True))]

    def _drain_abandoned(self) -> None:
        """Receive and drop late replies to timed-out calls; never waits."""
        if not self._abandoned_lock.acquire(blocking=False):
            return  # another thread is draining
        try:
            status = MPI.Status()
            for tag, entry in list(self._abandoned.items()):
                while entry[0] and (msg := self._comm.Improbe(MPI.ANY_SOURCE, tag, status)) is not None:
                    msg.Recv([bytearray(status.Get_count(MPI.BYTE)), MPI.BYTE])
                    entry[0] -= 1
                entry[1] = [(r, b) for r, b in entry[1] if not r.Test()]
                if not entry[0] and not entry[1]:
                    del self._abandoned[tag]
        finally:
            self._abandoned_lock.release()

    # ------------------------------------------------------------------- closing
    def close(self) -> None:
        """Stop the service thread and free the communicator. Collective; a second call does nothing.

        Call it when this rank makes no more calls. The barrier first makes sure every
        rank has stopped calling (calls are synchronous, so every request has been
        answered), so stopping the thread then loses no request. Past the timeout it raises
        :class:`PeerTimeout` naming the ranks that have not reached ``close()``; calling it again
        waits on the same barrier.
        """
        with self._close_lock:
            if self._closed:
                return
            if self._close_barrier is None:
                self._arrivals += 1
                self._close_barrier = (self._comm.Ibarrier(), self._arrivals)
            self._await("close()", *self._close_barrier)
            with self._hot_changed:
                self._stopping = True
                self._hot_changed.notify()
            self._timer.join(self.timeout)  # it may be sending a sleep request: one message, never blocks long
            self._comm.Send([HEADER.pack(_OP_STOP, 0, 0, 0, 0, 0), MPI.BYTE], self.rank, _REQUEST_TAG)
            self._doorbells.wake_self()
            self._thread.join(self.timeout)
            if self._thread.is_alive():
                raise PeerTimeout(f"rank {self.rank}: the service thread did not stop within {self.timeout:g} s "
                                  "(a handler is still running); its communicator stays allocated")
            self._closed = True
            self._drain_abandoned()
            self._doorbells.close()
            self._comm.Free()
            _restore_switch_interval()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["HEADER", "MAX_OP", "MAX_PAYLOAD", "Handler", "PeerTimeout", "RemoteError", "Service", "ServiceClosed"]
