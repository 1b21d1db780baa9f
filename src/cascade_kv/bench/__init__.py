"""``cascade bench``: the single-node benchmark, each figure beside a ceiling measured in the same run.

``single`` runs the measurements, ``mixed`` the mixed workload, ``ceilings`` the raw passes
(np.copyto, readinto, hashing, cold page cache) and the checked block contents, ``report``
the table and the JSON.
"""
