"""KV memory: a byte-budgeted pool and the per-slot KV storage the decoders read and write.

``KVPool(budget_bytes)`` is one ledger of bytes shared by everything that keeps KV (and prefix-cache
image features) of one loaded model: the storage of live requests (``KVCache.allocate``) and the prefix
cache's blocks (``engine.prefix_cache``). ``reserve(n)`` succeeds only while ``in_use + n <= budget``;
when it would not, the pool first asks its reclaimers (the prefix cache: evict LRU blocks) to free
bytes, and otherwise refuses. So ``in_use`` never exceeds ``budget`` (``peak_bytes`` records the most it
ever reached); the caller decides what a refusal means (the scheduler queues the request, a lone
``generate`` call raises ``KVPoolFull``). The pool lock is a leaf: reclaimers run without it held.

``KVCache(spec, slots, max_len, dtype, device, pool=None)``: ``slots`` slot ids, each at most ``max_len``
positions. Without a pool every slot is allocated at ``max_len`` at once (direct users: tests, bench,
export checks). With a pool, slots start empty and ``allocate(slot, positions)`` takes the storage of
one request: ``positions`` rounded up to ``pool.block_tokens`` (a whole number of blocks, charged to the
pool), ``free(slot)`` gives it back. A slot's storage is ONE tensor ``[layers, 2, kv_heads, capacity,
head_dim]`` allocated when the request is admitted and never regrown (the scheduler reserves prompt +
max_tokens at admission, see ``engine.kv_slots``): attention reads contiguous views
``[1, kv_heads, span, head_dim]`` of it, with the same shapes, values and operators as the old
``[slots, kv_heads, max_len, head_dim]`` cache, so outputs are bitwise unchanged and no decode step ever
gathers a request's context.

Attention goes through ``rows(slots, positions)`` (once per forward: each row's slot, attention span and
where its new K/V go) and ``layer_kv(layer, slot)`` (the slot's K and V of one layer, ``[kv_heads,
capacity, head_dim]`` each).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import GraceVLMError

DEFAULT_BLOCK_TOKENS = 16


class KVPoolFull(GraceVLMError):
    """The KV pool cannot hold this request now (other requests hold it); retry later."""


class KVPool:
    """A byte budget for KV memory (see the module docstring). ``block_tokens``: allocation granularity."""

    def __init__(self, budget_bytes: int, block_tokens: int = DEFAULT_BLOCK_TOKENS):
        if budget_bytes < 0 or block_tokens < 1:
            raise ValueError("the KV pool needs a budget >= 0 bytes and block_tokens >= 1")
        self.budget_bytes = int(budget_bytes)
        self.block_tokens = block_tokens
        self.in_use = 0
        self.peak_bytes = 0
        self._lock = threading.Lock()
        self._reclaimers: list[Callable[[int], int]] = []

    def add_reclaimer(self, reclaim: Callable[[int], int]) -> None:
        """``reclaim(nbytes)`` frees up to about ``nbytes`` (calling ``release``) and returns what it freed."""
        self._reclaimers.append(reclaim)

    def remove_reclaimer(self, reclaim: Callable[[int], int]) -> None:
        if reclaim in self._reclaimers:
            self._reclaimers.remove(reclaim)

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.in_use

    def reserve(self, nbytes: int, reclaim: bool = True) -> bool:
        """Take ``nbytes`` if they fit (after reclaiming, unless ``reclaim`` is False); True when taken."""
        if nbytes > self.budget_bytes:
            return False
        while True:
            with self._lock:
                if self.in_use + nbytes <= self.budget_bytes:
                    self.in_use += nbytes
                    self.peak_bytes = max(self.peak_bytes, self.in_use)
                    return True
                short = self.in_use + nbytes - self.budget_bytes
            if not reclaim or not any(r(short) > 0 for r in list(self._reclaimers)):
                return False

    def release(self, nbytes: int) -> None:
        with self._lock:
            if nbytes > self.in_use:
                raise RuntimeError(f"KV pool: releasing {nbytes} bytes but only {self.in_use} are in use")
            self.in_use -= nbytes


@dataclass
class RowKV:
    """One batch row of a forward: its cache ``slot``, the ``span`` of positions it attends over
    (``0 .. span-1``), ``where`` its new K/V go (a slice for consecutive positions, else an index tensor)
    and its attention ``mask [1, 1, T, span]`` (set by ``KVCache.rows`` from the forward's mask)."""

    slot: int
    span: int
    where: slice | torch.Tensor
    mask: torch.Tensor | None = None


class KVCache:
    """Per-slot K/V storage (see the module docstring)."""

    def __init__(self, spec, slots: int, max_len: int, dtype: torch.dtype, device="cpu",
                 pool: KVPool | None = None):
        self.layers, self.kv_heads, self.head_dim = spec.num_layers, spec.num_kv_heads, spec.head_dim
        self.slots, self.max_len = slots, max_len
        self.dtype, self.device = dtype, torch.device(device)
        self.pool = pool
        self._store: list[torch.Tensor | None] = [None] * slots
        self._charged = [0] * slots
        if pool is None:
            for slot in range(slots):
                self._store[slot] = self._zeros(max_len)

    # -- sizes ------------------------------------------------------------------------------------------
    @property
    def bytes_per_position(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def capacity_for(self, positions: int) -> int:
        """Positions a slot asked for ``positions`` gets: rounded up to whole pool blocks, at most ``max_len``."""
        block = self.pool.block_tokens if self.pool is not None else 1
        return min(self.max_len, -(-positions // block) * block)

    def bytes_for(self, positions: int) -> int:
        return self.capacity_for(positions) * self.bytes_per_position

    def nbytes(self) -> int:
        """Bytes of storage allocated now (all slots)."""
        return sum(t.numel() * t.element_size() for t in self._store if t is not None)

    def capacity(self, slot: int) -> int:
        t = self._store[slot]
        return 0 if t is None else t.shape[3]

    # -- allocation -------------------------------------------------------------------------------------
    def _zeros(self, capacity: int) -> torch.Tensor:
        # zeros, not empty: the batched ragged path reads (masked) positions a row has not written
        return torch.zeros(self.layers, 2, self.kv_heads, capacity, self.head_dim, dtype=self.dtype,
                           device=self.device)

    def allocate(self, slot: int, positions: int) -> bool:
        """Give ``slot`` storage for ``positions`` positions from the pool; False when the pool cannot now."""
        if positions > self.max_len:
            raise ValueError(f"{positions} positions exceed this cache's {self.max_len} per slot")
        if self._store[slot] is not None:
            if self.capacity(slot) >= positions:
                return True
            raise RuntimeError(f"KV slot {slot} is in use")
        cap = self.capacity_for(positions)
        nbytes = cap * self.bytes_per_position
        if self.pool is not None and not self.pool.reserve(nbytes):
            return False
        try:
            self._store[slot] = self._zeros(cap)
        except BaseException:
            if self.pool is not None:
                self.pool.release(nbytes)
            raise
        self._charged[slot] = nbytes if self.pool is not None else 0
        return True

    def free(self, slot: int) -> None:
        """Give ``slot``'s storage back to the pool (a pool-less cache keeps its storage)."""
        if self.pool is None or self._store[slot] is None:
            return
        self._store[slot] = None
        self.pool.release(self._charged[slot])
        self._charged[slot] = 0

    def free_all(self) -> None:
        for slot in range(self.slots):
            self.free(slot)

    # -- what attention uses ----------------------------------------------------------------------------
    def rows(self, slots: list[int], positions: torch.Tensor, mask: torch.Tensor) -> list[RowKV]:
        """Each row's ``RowKV`` for a forward writing ``positions [B, T]`` into ``slots`` with the boolean
        ``mask [B, T, S]`` (query may see position)."""
        out = []
        for r, (slot, pos) in enumerate(zip(slots, positions.tolist())):
            span = max(pos) + 1
            if span > self.capacity(slot):
                raise RuntimeError(f"KV slot {slot} holds {self.capacity(slot)} positions; position {span - 1} "
                                   "does not fit")
            consecutive = pos == list(range(pos[0], pos[0] + len(pos)))
            where = slice(pos[0], pos[-1] + 1) if consecutive else torch.tensor(pos, device=self.device)
            out.append(RowKV(slot, span, where, mask[r:r + 1, :, :span].unsqueeze(1)))
        return out

    def slot_store(self, slot: int) -> torch.Tensor | None:
        """The slot's whole KV storage ``[layers, 2, kv_heads, capacity, head_dim]`` (None: not allocated)."""
        return self._store[slot]

    def layer_kv(self, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's K and V of ``layer``: ``[kv_heads, capacity, head_dim]`` views."""
        t = self._store[slot]
        return t[layer, 0], t[layer, 1]

    # -- block copies (prefix cache, choices of one prompt) ---------------------------------------------
    def read_block(self, slot: int, start: int, end: int) -> torch.Tensor:
        """A copy of positions ``start:end`` of ``slot``: ``[layers, 2, kv_heads, end - start, head_dim]``."""
        return self._store[slot][:, :, :, start:end].clone()

    def write_block(self, slot: int, start: int, block: torch.Tensor) -> None:
        self._store[slot][:, :, :, start:start + block.shape[3]] = block

    def copy_positions(self, src: int, dst: int, n: int) -> None:
        """Positions ``0:n`` of slot ``src`` into slot ``dst``."""
        self._store[dst][:, :, :, :n] = self._store[src][:, :, :, :n]


def slot_list(slots: torch.Tensor | None, b: int) -> list[int]:
    """Cache slots of the ``b`` rows of a forward (default ``0 .. b-1``)."""
    return list(range(b)) if slots is None else [int(s) for s in slots.tolist()]
