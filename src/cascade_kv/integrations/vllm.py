"""vLLM on cascade-kv: a KV connector that stops vLLM recomputing prompt prefixes it has seen.

Register it without touching vLLM::

    KVTransferConfig(kv_connector="CascadeConnector", kv_connector_module_path="cascade_kv.integrations.vllm",
                     kv_role="kv_both", kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"socket": "/run/user/1000/cascade-kv/cascade.sock"})

vLLM runs the connector twice: in the scheduler (which asks how much of a prompt is cached) and in each worker
(which loads and saves KV). Both reach one cache, the node daemon (``cascade serve``), through
:func:`cascade_kv.connect`. Keys are :func:`cascade_kv.tokens.prefix_keys` of the request's tokens, one per
vLLM block, with the model, the KV layout and dtype mixed in (a block of another model or layout can never
match) and the request's ``cache_salt`` as the tenant salt (and namespace). A stored value is one whole block
of ``block_tokens`` tokens (one or more vLLM blocks): every layer's KV for its tokens, so a block is cached
whole or not at all.

* **Scheduler.** :meth:`get_num_new_matched_tokens` answers from one ``lookup`` of the prompt's keys.
  :meth:`build_connector_meta` tells the workers which blocks to load (those it promised) and which newly
  computed full blocks to save (prompt and generated tokens alike, once each).
* **Worker.** :meth:`start_load_kv` reads every promised block (one ``get_many``) and scatters it into the
  paged cache before the first layer runs, so ``wait_for_layer_load`` has nothing left to wait for.
  :meth:`save_kv_layer` gathers each layer's blocks into a staging tensor as the layer finishes;
  :meth:`wait_for_save` hands the tensor to a background thread that puts it (hashing included): saving
  never stalls the forward pass. Copies go through torch (``index_select``/``index_copy_``), so the same
  code moves CPU tensors here and CUDA tensors on a GPU machine.
* **Faults.** A daemon that cannot be reached (at start or later) makes every lookup a miss and every save
  a no-op, with a warning and a counter; the connector tries again every ``retry_s``. A load that fails (the
  daemon died, a block failed its digest) reports its blocks through :meth:`get_block_ids_with_load_errors`
  and vLLM recomputes them (``kv_load_failure_policy="recompute"``; with vLLM's default ``"fail"`` the
  request fails instead: never wrong tokens either way).

Options (``kv_connector_extra_config``):

``socket``
    The daemon's socket. Absent: the connector starts a private daemon for this engine (in the first of its
    processes to need it) and stops it with the engine.
``host_capacity`` / ``disk_path``
    The private daemon's tiers (default ``"2GiB"``, no disk).
``block_tokens``
    Tokens per stored block (default: vLLM's block size, 128 on CPU, 16 on most GPU backends): a multiple of
    vLLM's block size; larger stored blocks mean fewer, larger keys and copies, and reuse in coarser steps.
``timeout_s``
    Seconds any call to the daemon may take (default 5): no request waits longer on the cache.
``retry_s``
    Seconds between attempts to reach a daemon that was unreachable (default 5).
``prefix_min_requests`` / ``prefix_max_blocks``
    The rule for semantic eviction: a block among the first ``prefix_max_blocks`` (default 64) of a prompt
    that has begun at least ``prefix_min_requests`` (default 2) requests seen by this scheduler — a system
    prompt, a shared document — is stored with ``is_prefix=True`` (kept in memory). 0 turns the rule off.
``stats_path``
    Write the connector's counters there as JSON when the engine shuts down (one file per process role).
"""
from __future__ import annotations

import atexit
import collections
import concurrent.futures
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                               KVConnectorRole)

from ..errors import CascadeError, ConfigError
from ..tokens import namespace_for, prefix_keys

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- metadata
@dataclass
class _Move:
    """Stored blocks of one request to load or save: their keys, the vLLM block ids they span (``group`` per
    key, in order; -1 where a load skips a block vLLM computed itself) and prefix flags (saves only)."""

    namespace: str | None
    keys: list[bytes]
    block_ids: list[int]
    prefix: list[bool] = field(default_factory=list)


@dataclass
class CascadeConnectorMetadata(KVConnectorMetadata):
    loads: list[_Move] = field(default_factory=list)
    saves: list[_Move] = field(default_factory=list)


@dataclass
class _Request:
    """What the scheduler side keeps of a running request."""

    request: Any  # vLLM's Request: its all_token_ids grow as it decodes
    namespace: str | None
    salt: bytes
    keys: list[bytes]  # prefix keys of the blocks known so far
    block_ids: list[int] = field(default_factory=list)
    saved: int = 0  # blocks [0, saved) are in the cache or already sent to be saved
    load: tuple[int, int, int] | None = None  # (first stored block, count, vLLM blocks of the first to skip)


# ---------------------------------------------------------------------------------------------- the daemon link
class _Link:
    """The connection to the daemon, kept by one process: connects lazily, counts and logs failures, and
    stays down for ``retry_s`` after one (every call in between is a miss, never a wait)."""

    def __init__(self, path: Path, timeout: float, retry: float, role: str, first_wait: float) -> None:
        self.path = path
        self._first_wait = first_wait  # seconds the first connect may wait for a daemon that is starting
        self.timeout = timeout
        self.retry = retry
        self.role = role
        self._client: Any = None
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.failures = 0

    def get(self) -> Any:
        """The client, or None while the daemon is down (a miss for the caller, never a wait)."""
        with self._lock:
            if self._client is not None:
                return self._client
            if time.monotonic() < self._down_until:
                return None
            from ..service.client import connect

            deadline, self._first_wait = time.monotonic() + self._first_wait, 0.0
            while True:
                try:
                    self._client = connect(self.path, timeout=self.timeout)
                    return self._client
                except CascadeError as e:
                    if time.monotonic() >= deadline:
                        self._fail(e)
                        return None
                time.sleep(0.05)  # only on a process's first call: a private daemon may still be starting

    def failed(self, e: BaseException) -> None:
        with self._lock:
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        self.failures += 1
        log.warning("cascade-kv (%s): the cache at %s is unreachable (%s); recomputing instead, retrying in %g s",
                    self.role, self.path, e, self.retry)
        if self._client is not None:
            try:
                self._client.close()
            except CascadeError:
                pass
            self._client = None
        self._down_until = time.monotonic() + self.retry

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def _private_daemon(engine_id: str, extra: dict[str, Any]) -> Path:
    """The socket of this engine's private daemon, started by the first of the engine's processes to get
    here (an O_EXCL lock file decides) and stopped when that process exits (SIGTERM at exit; the kernel
    sends it too if the process is killed: PR_SET_PDEATHSIG)."""
    from ..service.server import private_dir, runtime_dir

    base = runtime_dir()
    private_dir(base)
    sock = base / f"vllm-{engine_id[:16]}.sock"
    lock = base / f"vllm-{engine_id[:16]}.lock"
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return sock  # another process of this engine starts it; connects retry until it listens
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    cmd = [sys.executable, "-m", "cascade_kv.cli", "serve", "--socket", str(sock),
           "--host-capacity", str(extra.get("host_capacity", "2GiB"))]
    if extra.get("disk_path"):
        cmd += ["--disk-path", str(extra["disk_path"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            preexec_fn=_die_with_parent)
    line = proc.stdout.readline() if proc.stdout is not None else ""
    if "listening" not in line:
        log.warning("cascade-kv: the private daemon did not start (%r); the engine runs without a cache", line)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        lock.unlink(missing_ok=True)

    atexit.register(stop)
    return sock


def _die_with_parent() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# ---------------------------------------------------------------------------------------------- the connector
class CascadeConnector(KVConnectorBase_V1):
    """vLLM's KV connector on the cascade-kv node daemon (see the module docstring for what it does)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        extra = dict(ktc.kv_connector_extra_config or {})
        vblock = vllm_config.cache_config.block_size
        self._block = int(extra.get("block_tokens", vblock))  # tokens per stored value
        if self._block < 1 or self._block % vblock:
            raise ConfigError(f"CascadeConnector: block_tokens {self._block} must be a positive multiple of vLLM's "
                              f"block size {vblock}")
        self._vblock = vblock
        self._group = self._block // vblock  # vLLM blocks per stored value
        self._model = f"{vllm_config.model_config.model}@{vllm_config.model_config.revision or ''}"
        self._kv_spec = _kv_spec(kv_cache_config)
        self._timeout = float(extra.get("timeout_s", 5.0))
        socket_path = extra.get("socket")
        path = Path(socket_path) if socket_path else _private_daemon(ktc.engine_id, extra)
        # a private daemon may still be starting when this process first needs it: wait for it once
        first_wait = 0.0 if socket_path else float(extra.get("start_wait_s", 30.0))
        self._link = _Link(path, self._timeout, float(extra.get("retry_s", 5.0)), role.name.lower(), first_wait)
        self._stats_path = extra.get("stats_path")
        self._namespaces: dict[str | None, Any] = {}
        self.counters: dict[str, float] = collections.Counter()
        """lookups, lookup_tokens, hit_tokens, protected, loads, load_blocks, load_errors, load_seconds,
        load_waited_for_saves_seconds, saves, save_blocks, save_dropped, save_seconds, daemon_failures."""
        # scheduler side
        self._requests: dict[str, _Request] = {}
        self._prefix_min = int(extra.get("prefix_min_requests", 2))
        self._prefix_max = int(extra.get("prefix_max_blocks", 64))
        self._starts: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # first blocks' key -> requests
        # keys this scheduler asked the workers to save, not yet seen stored: a prompt that follows its
        # predecessor at once (the next turn, the same document) must not miss blocks whose save is still in
        # the worker's queue; the worker finishes its queued saves before a load (start_load_kv)
        self._saving: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._saving_for = float(extra.get("inflight_s", 30.0))
        self._protector: concurrent.futures.ThreadPoolExecutor | None = None
        self._protect_link: _Link | None = None
        # worker side
        self._caches: dict[str, torch.Tensor] = {}
        self._block_dim: dict[str, int] = {}
        self._load_errors: set[int] = set()
        self._staging: torch.Tensor | None = None
        self._staging_layers: set[str] = set()
        self._saves: queue.Queue[tuple[list[_Move], torch.Tensor, torch.Tensor] | None] = queue.Queue(
            maxsize=int(extra.get("save_queue", 8)))  # (saves, staging view, the buffer it is carved from)
        self._load_flat: torch.Tensor | None = None  # the loads' staging buffer (loads run one at a time)
        self._direct = False  # loads copy straight into the paged cache (register_kv_caches decides)
        self._scratch: torch.Tensor | None = None
        self._staging_flat: torch.Tensor | None = None  # the buffer of the step's save staging
        self._free_flats: list[torch.Tensor] = []  # save buffers the saver has finished with
        self._saver: threading.Thread | None = None
        self._queued = 0  # save jobs queued or being saved
        self._queued_cond = threading.Condition()

    # ------------------------------------------------------------------ shared
    def _view(self, client: Any, namespace: str | None) -> Any:
        if namespace is None:
            return client
        view = self._namespaces.get(namespace)
        if view is None or view._client is not client:
            view = self._namespaces[namespace] = client.namespace(namespace)
        return view

    # ------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        tokens = list(request.prompt_token_ids or [])
        salt = (request.cache_salt or "").encode()
        keys = prefix_keys(tokens[:len(tokens) // self._block * self._block], self._block, salt=salt,
                           model=self._model, kv_spec=self._kv_spec)
        state = _Request(request, namespace_for(salt), salt, keys)
        self._requests[request.request_id] = state
        self._count_start(keys)
        self.counters["lookups"] += 1
        self.counters["lookup_tokens"] += len(tokens)
        # at least one prompt token must be computed (its logits start the output)
        usable = (len(tokens) - 1) // self._block
        client = self._link.get()
        if client is None or not usable:
            return 0, False
        try:
            hit = self._view(client, state.namespace).lookup(keys[:usable])
        except CascadeError as e:
            self._link.failed(e)
            return 0, False
        for k in keys[:hit]:
            self._saving.pop(k, None)  # seen stored
        now = time.monotonic()
        while self._saving and next(iter(self._saving.values())) < now - self._saving_for:
            self._saving.popitem(last=False)  # a save that never landed (dropped, or the daemon lost it)
        stored = hit
        while hit < usable and keys[hit] in self._saving:
            hit += 1  # in the worker's save queue: the worker saves it before it loads it
        state.saved = hit
        self._protect_new_prefixes(client, state, stored)
        matched = hit * self._block - num_computed_tokens  # vLLM's own prefix cache may hold the first blocks
        if matched <= 0:
            return 0, False
        local = num_computed_tokens // self._vblock  # vLLM blocks computed already: a stored value may hold some
        first = local // self._group
        state.load = (first, hit - first, local - first * self._group)
        self.counters["hit_tokens"] += matched
        return matched, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        state = self._requests.get(request.request_id)
        if state is None:
            return
        if num_external_tokens <= 0:
            state.load = None
        state.block_ids = list(blocks.get_block_ids()[0])

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = CascadeConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            if state.load is not None:
                first, n, skip = state.load
                g = self._group
                ids = [state.block_ids[b] if b - first * g >= skip else -1  # -1: computed by vLLM already
                       for b in range(first * g, (first + n) * g)]
                meta.loads.append(_Move(state.namespace, state.keys[first:first + n], ids))
                state.load = None
            self._plan_save(meta, state, new.num_computed_tokens + scheduler_output.num_scheduled_tokens[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in cached.resumed_req_ids:
                    state.block_ids = list(new_ids[0])  # a resumed request's list is its whole list
                else:
                    state.block_ids += list(new_ids[0])
            self._plan_save(meta, state, cached.num_computed_tokens[i] + scheduler_output.num_scheduled_tokens[req_id])
        for req_id in scheduler_output.finished_req_ids:
            self._requests.pop(req_id, None)
        return meta

    def _plan_save(self, meta: CascadeConnectorMetadata, state: _Request, computed: int) -> None:
        """Full blocks whose KV exists after this step and that the cache does not hold yet."""
        tokens = state.request.all_token_ids
        full = min(computed, len(tokens)) // self._block
        full = min(full, len(state.block_ids) // self._group)
        if full <= state.saved:
            return
        if len(state.keys) < full:  # generated tokens filled more blocks: extend the chain
            state.keys = prefix_keys(list(tokens[:full * self._block]), self._block, salt=state.salt,
                                     model=self._model, kv_spec=self._kv_spec)
        first = state.saved
        keys = state.keys[first:full]
        prefix = [self._is_prefix(i, k) for i, k in enumerate(keys, first)]
        g = self._group
        meta.saves.append(_Move(state.namespace, keys, state.block_ids[first * g:full * g], prefix))
        state.saved = full
        now = time.monotonic()
        for k in keys:
            self._saving[k] = now
            self._saving.move_to_end(k)
        while len(self._saving) > 100_000:
            self._saving.popitem(last=False)

    def _count_start(self, keys: list[bytes]) -> None:
        if not self._prefix_min:
            return
        for k in keys[:self._prefix_max]:
            self._starts[k] = self._starts.get(k, 0) + 1
            self._starts.move_to_end(k)
        while len(self._starts) > 100_000:  # bounded: the oldest starts are forgotten first
            self._starts.popitem(last=False)

    def _protect_new_prefixes(self, client: Any, state: _Request, stored: int) -> None:
        """Blocks stored before they qualified as prefixes (see ``_is_prefix``) are protected once, when the
        request that makes them qualify finds them stored. On a thread and a connection of its own: one round
        trip per block must not delay the scheduling of the request that made them qualify."""
        if not self._prefix_min:
            return
        keys = [k for k in state.keys[:min(stored, self._prefix_max)] if self._starts.get(k, 0) == self._prefix_min]
        if not keys:
            return
        if self._protector is None:
            self._protector = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cascade-kv-protect")
            self._protect_link = _Link(self._link.path, self._timeout, self._link.retry, "protect", 0.0)
        self._protector.submit(self._protect, state.namespace, keys)

    def _protect(self, namespace: str | None, keys: list[bytes]) -> None:
        client = self._protect_link.get()
        if client is None:
            return
        view = client if namespace is None else client.namespace(namespace)
        for key in keys:
            try:
                view.protect(key)
                self.counters["protected"] += 1
            except CascadeError as e:  # a block evicted meanwhile (nothing to protect), or the daemon gone
                if not isinstance(e, KeyError):
                    self._protect_link.failed(e)
                    return

    def _is_prefix(self, index: int, key: bytes) -> bool:
        return bool(self._prefix_min) and index < self._prefix_max and self._starts.get(key, 0) >= self._prefix_min

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        return False, None  # saves copy the blocks out in the step that computed them: nothing to hold

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        num_blocks = getattr(self._kv_cache_config, "num_blocks", None)
        for name, t in kv_caches.items():
            # the dimension that indexes blocks: the first of size num_blocks (0 on CPU, 1 for [2, blocks, ...])
            dims = [d for d in range(t.dim()) if t.shape[d] == num_blocks] if num_blocks else [0]
            self._block_dim[name] = dims[0] if dims else 0
            self._caches[name] = t
        # loads go straight into the cache when every layer's block is one contiguous run of CPU memory (the
        # CPU backend's [blocks, heads, block_size, 2*head_dim]); otherwise (CUDA, blocks not outermost)
        # through a staging tensor and index_copy_
        self._direct = all(t.device.type == "cpu" and t.is_contiguous() and self._block_dim[n] == 0
                           for n, t in self._caches.items())

    def _block_shape(self) -> tuple[list[str], tuple[int, ...], torch.dtype]:
        names = list(self._caches)
        t = self._caches[names[0]]
        d = self._block_dim[names[0]]
        return names, tuple(s for i, s in enumerate(t.shape) if i != d), t.dtype

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, CascadeConnectorMetadata) or not meta.loads or not self._caches:
            return
        t0 = time.perf_counter()
        self._finish_saves()  # a promised block may still be in the save queue (see the scheduler's _saving)
        names, shape, dtype = self._block_shape()
        for move in meta.loads:
            g = self._group
            if self._direct:
                # each layer's block is one contiguous run of the paged cache: the daemon's arena is copied
                # straight into them (a scatter list per stored block, in its [group, layers, ...] order)
                if self._scratch is None:
                    self._scratch = torch.empty(shape, dtype=dtype)  # for blocks vLLM computed itself
                outs = [[self._caches[name][b] if b >= 0 else self._scratch
                         for b in move.block_ids[i * g:(i + 1) * g] for name in names] for i in range(len(move.keys))]
            else:
                self._load_flat, staging = self._carve(self._load_flat, len(move.keys) * g, names, shape, dtype)
                values = staging.view(len(move.keys), g, len(names), *shape)  # a stored block: [group, layers, ...]
                outs = [values[i] for i in range(len(move.keys))]
            client = self._link.get()
            try:
                if client is None:
                    raise CascadeError(f"the cache at {self._link.path} is unreachable")
                self._view(client, move.namespace).get_many(move.keys, outs)
            except CascadeError as e:  # daemon gone, block lost or damaged: vLLM recomputes these blocks
                if client is not None:
                    self._link.failed(e)
                failed = [b for b in move.block_ids if b >= 0]
                self._load_errors.update(failed)
                self.counters["load_errors"] += len(failed)
                continue
            self.counters["loads"] += 1
            self.counters["load_blocks"] += len(move.keys)
            if self._direct:
                continue
            rows = [r for r, b in enumerate(move.block_ids) if b >= 0]
            ids = torch.tensor([move.block_ids[r] for r in rows], dtype=torch.long)
            picked = staging if len(rows) == len(move.block_ids) else staging[torch.tensor(rows, dtype=torch.long)]
            for layer, name in enumerate(names):
                cache, d = self._caches[name], self._block_dim[name]
                src = picked[:, layer].to(cache.device).movedim(0, d)
                cache.index_copy_(d, ids.to(cache.device), src)
        self.counters["load_seconds"] += time.perf_counter() - t0

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv finished every load before the first layer

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, CascadeConnectorMetadata) or not meta.saves or layer_name not in self._caches:
            return
        names, shape, dtype = self._block_shape()
        ids = [b for m in meta.saves for b in m.block_ids]
        if self._staging is None:
            with self._queued_cond:  # a buffer the saver has finished with, else a new one
                flat = self._free_flats.pop() if self._free_flats else None
            self._staging_flat, self._staging = self._carve(flat, len(ids), names, shape, dtype)
            self._staging_layers = set()
        d = self._block_dim[layer_name]
        index = torch.tensor(ids, dtype=torch.long, device=kv_layer.device)
        self._staging[:, names.index(layer_name)].copy_(kv_layer.index_select(d, index).movedim(d, 0))
        self._staging_layers.add(layer_name)

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        staging, self._staging = self._staging, None
        if staging is None or not isinstance(meta, CascadeConnectorMetadata):
            return
        if len(self._staging_layers) != len(self._caches):
            return  # a layer did not run its save hook: never store a block with layers missing
        if self._saver is None:
            self._saver = threading.Thread(target=self._save_loop, name="cascade-kv-saver", daemon=True)
            self._saver.start()
        with self._queued_cond:
            try:
                self._saves.put_nowait((meta.saves, staging, self._staging_flat))
                self._queued += 1
            except queue.Full:  # the cache is slower than the engine right now: skip, never stall the forward pass
                self.counters["save_dropped"] += sum(len(m.keys) for m in meta.saves)

    @staticmethod
    def _carve(flat: torch.Tensor | None, n: int, names: list[str], shape: tuple[int, ...],
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flat, staging)``: an ``[n, layers, *block]`` view of ``flat``, a kept 1-D buffer that only grows
        (replaced when too small): new memory costs its first touch on every use (a 16 MiB load took 8.7 ms
        into fresh memory, 3.3 ms into reused memory)."""
        need = n * len(names) * int(torch.Size(shape).numel())
        if flat is None or flat.dtype != dtype or flat.numel() < need:
            flat = torch.empty(need, dtype=dtype)
        return flat, flat[:need].view(n, len(names), *shape)

    def _finish_saves(self) -> None:
        """Wait (at most ``timeout_s``) for the queued saves: a load of a block still queued would miss it."""
        with self._queued_cond:
            if self._queued:
                t0 = time.perf_counter()
                self._queued_cond.wait_for(lambda: not self._queued, self._timeout)
                self.counters["load_waited_for_saves_seconds"] += time.perf_counter() - t0

    def _save_loop(self) -> None:
        while True:
            job = self._saves.get()
            if job is None:
                return
            try:
                self._save(job[0], job[1])
            except Exception:  # a bug must not stop every later save, nor leave loads waiting on this one
                log.exception("cascade-kv: a save failed")
            finally:
                with self._queued_cond:
                    self._queued -= 1
                    if len(self._free_flats) < 2:  # kept for the next steps' saves (at most two)
                        self._free_flats.append(job[2])
                    self._queued_cond.notify_all()

    def _save(self, saves: list[_Move], staging: torch.Tensor) -> None:
        t0 = time.perf_counter()
        client = self._link.get()
        g = self._group
        row = 0
        for move in saves:
            n = len(move.keys)
            if client is not None:
                try:
                    self._view(client, move.namespace).put_many(  # one stored block: [group, layers, ...]
                        move.keys, [staging[(row + i) * g:(row + i + 1) * g] for i in range(n)], is_prefix=move.prefix)
                    self.counters["saves"] += 1
                    self.counters["save_blocks"] += n
                except CascadeError as e:
                    self._link.failed(e)
                    client = None
            if client is None:
                self.counters["save_dropped"] += n
            row += n
        self.counters["save_seconds"] += time.perf_counter() - t0

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None  # loads are synchronous and saves copy out within the step

    def shutdown(self) -> None:
        if self._protector is not None:
            self._protector.shutdown(wait=True)
            self._protect_link.close()  # type: ignore[union-attr]
        if self._saver is not None:
            self._saves.put(None)
            self._saver.join(self._timeout * 4)
        self.counters["daemon_failures"] = self._link.failures
        if self._stats_path:
            path = Path(self._stats_path)
            path = path.with_name(f"{path.stem}-{self.role.name.lower()}-{os.getpid()}{path.suffix}")
            path.write_text(json.dumps(dict(self.counters)))
        self._link.close()


def _kv_spec(kv_cache_config: Any) -> str:
    """What a stored block's bytes depend on beyond the tokens and the model: the KV layout, dtype and layers
    (and the platform, whose attention backend lays blocks out its own way)."""
    try:
        from vllm.platforms import current_platform

        device = current_platform.device_type
    except Exception:  # noqa: BLE001 -- a platform vLLM cannot name still gets a stable spec
        device = "unknown"
    parts = [device]
    for group in getattr(kv_cache_config, "kv_cache_groups", []) or []:
        s = group.kv_cache_spec
        parts.append(f"{type(s).__name__}:bs={getattr(s, 'block_size', '?')}:h={getattr(s, 'num_kv_heads', '?')}:"
                     f"d={getattr(s, 'head_size', '?')}:{getattr(s, 'dtype', '?')}:layers={len(group.layer_names)}")
    return "|".join(parts)


__all__ = ["CascadeConnector", "CascadeConnectorMetadata"]
