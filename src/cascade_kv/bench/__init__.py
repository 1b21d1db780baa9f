"""``cascade bench``: the single-node benchmark, each figure beside a ceiling measured in the same run.

``single`` runs the measurements, ``mixed`` the mixed workload, ``ceilings`` the raw passes
(np.copyto, readinto, hashing, cold page cache) and the checked block contents, ``report``
the table and the JSON.
"""
# Before any module here imports mpi4py.MPI (which starts MPI): a run that no launcher started gets the
# environment in which MPI leaves nothing in /dev/shm at exit (see cascade_kv.cluster).
from .. import cluster as _cluster  # noqa: F401
