"""The systems the evaluation suite measures side by side (issue 4), each behind one small interface.

``base.Backend`` is the interface; one module per system: ``cascade`` (cascade-kv itself, with its features
on or one turned off), ``posix`` (one file per block: the raw-disk ceiling), ``hdf5`` (h5py), ``redis`` (a
real ``redis-server``), ``mooncake`` (Mooncake Store) and ``lmcache`` (LMCache's storage backends). A user
adds a system in one file: subclass ``Backend`` and register it in :data:`registry.BACKENDS`.
"""
