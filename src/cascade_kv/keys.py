"""The key table: which block each key refers to, deletes, and protection (``is_prefix``).

A key refers to one block and a block to every key whose value has its bytes (with dedup on). A
block with a protected key (put with ``is_prefix=True``, or ``protect()``-ed) stays in memory under
semantic eviction, and its bytes count against its namespace's ``protected_quota``. What a key's
arrival or departure changes in the counted contents (keys, logical and unique bytes, blocks) is
counted here, where it changes; a put's batch counts its own in :mod:`.puts`.
"""
from __future__ import annotations

from collections.abc import Iterable

from . import catalog
from .arrays import check_key, key_list
from .blocks import Block, Entry
from .context import StoreContext
from .dryrun import DryRun
from .errors import BlockNotFound, CapacityError
from .ids import Key, StoreKey
from .namespace import Space
from .persistence import Persistence
from .placement import Placement
from .promoter import Promoter


class KeyTable:
    """Keys in, keys out, keys protected; the entries themselves are ``ctx.keys``."""

    def __init__(self, ctx: StoreContext, placement: Placement, promoter: Promoter, persistence: Persistence) -> None:
        self._ctx = ctx
        self._placement = placement
        self._promoter = promoter
        self._persistence = persistence

    def entries(self, keys: list[StoreKey], count_misses: Space | None = None) -> list[Entry]:
        """The keys' entries, or BlockNotFound (lock held); ``count_misses``: the namespace a miss counts in."""
        table = self._ctx.keys
        try:
            return [table[k] for k in keys]  # every key there: the common case, at C speed
        except KeyError:
            pass
        out = []
        for k in keys:
            e = table.get(k)
            if e is None:
                if count_misses is not None:
                    self._ctx.counters.misses += 1
                    count_misses.counters.misses += 1
                raise BlockNotFound(f"key {k!r} is not in the store")
            out.append(e)
        return out

    def attach(self, key: StoreKey, e: Entry, b: Block) -> None:
        """``key`` (just set to ``e`` in the key table) now refers to ``b``."""
        first = not b.keys
        b.keys.add(key)
        for c in self._ctx.counts(b):  # a key's namespace is its block's: block ids carry the namespace's tag
            cc = c.contents
            cc.keys += 1
            cc.logical_bytes += b.nbytes
            if first:
                cc.blocks += 1
                cc.unique_bytes += b.nbytes
        if e.prefix:
            self.protect_block(b, +1)

    def detach(self, key: StoreKey, e: Entry) -> None:
        """``key`` (removed from the key table, or set to another entry) no longer refers to ``e``."""
        ctx = self._ctx
        b = ctx.blocks[e.block_id]
        if e.prefix:
            self.protect_block(b, -1)
        last = False
        if ctx.keys.get(key) is None or ctx.keys[key].block_id != b.id:
            last = key in b.keys and len(b.keys) == 1
            b.keys.discard(key)
        for c in ctx.counts(b):
            cc = c.contents
            cc.keys -= 1
            cc.logical_bytes -= b.nbytes
            if last:
                cc.blocks -= 1
                cc.unique_bytes -= b.nbytes
        self._placement.maybe_release(b)

    def protect_block(self, b: Block, delta: int) -> None:
        """One more (+1) or one fewer (-1) protected key of ``b``."""
        b.protected += delta
        if b.protected == (1 if delta > 0 else 0):
            self._placement.protection_changed(b, 1 if delta > 0 else -1)
            self._ctx.policy.set_protected(b.id, delta > 0, b.reads)

    def delete(self, space: Space, keys: Iterable[Key]) -> None:
        """Remove every key of ``space`` (all must exist: otherwise nothing is removed)."""
        ctx = self._ctx
        keys = list(dict.fromkeys(space.internal(k) for k in key_list(keys, "delete_many")))
        with ctx.write_order:
            with ctx.lock:
                ctx.check_open()
                self.entries(keys)
            self._persistence.append([catalog.delete_record(k) for k in keys])
            with ctx.lock:
                for k in keys:
                    if k in ctx.keys:  # a drop may have taken it meanwhile
                        self.detach(k, ctx.keys.pop(k))
                ctx.counters.deletes += len(keys)
                space.counters.deletes += len(keys)

    def set_prefix(self, key: Key, prefix: bool, space: Space) -> None:
        """Protect (``prefix``: bring the block into memory first) or unprotect ``key`` of ``space``."""
        check_key(key)
        ctx, placement = self._ctx, self._placement
        key = space.internal(key)
        with ctx.write_order:
            with ctx.lock:
                ctx.check_open()
                e = self.entries([key])[0]
                if e.prefix == prefix:
                    return
                b = ctx.blocks[e.block_id]
                if prefix and not b.protected and space.protected_quota is not None and (
                        space.protected_bytes + b.nbytes > space.protected_quota):
                    raise CapacityError(f"protect({key!r}): namespace {space.name!r} has protected_quota "
                                        f"{space.protected_quota} B, {space.protected_bytes} B are protected and "
                                        f"this call needs {b.nbytes} B more; nothing was changed")
                if prefix and ctx.must_be_in_memory(True) and not b.where & ctx.memory_mask:
                    b.pins += 1  # cannot be dropped while we make room for it
                    try:
                        with self._promoter.placing():
                            t = DryRun(ctx, [b.id]).allocate(b, ctx.memory)  # refuse before demoting anything
                            if t is None:
                                raise placement.no_room(f"protect({key!r})", b, ctx.memory, 0, 1)
                            placement.bring_to_memory(b, tiers=[t])
                    finally:
                        placement.unpin(b)
                    if ctx.keys.get(key) is not e:
                        raise BlockNotFound(f"key {key!r} was removed while being protected")
                # applied before the journal (and undone if that fails) so that the block cannot be
                # evicted between reaching memory and becoming protected
                new = ctx.keys[key] = Entry(e.block_id, e.dtype, e.shape, prefix)
                self.protect_block(b, +1 if prefix else -1)
            try:
                self._persistence.append([catalog.protect_record(key, prefix)])
            except BaseException:
                with ctx.lock:
                    if ctx.keys.get(key) is new:
                        ctx.keys[key] = e
                        self.protect_block(b, -1 if prefix else +1)
                raise


__all__ = ["KeyTable"]
