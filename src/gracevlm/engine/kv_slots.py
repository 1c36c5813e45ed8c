"""KV memory of the engine: the pool's default budget, the "can never fit" check, and the scheduler's slots.

Policy (one byte budget, ``--kv-cache-gib`` / ``load(kv_cache_gib=...)``): every request reserves, when it
is ADMITTED (its prefill starts), storage for ``prompt + max_tokens`` positions, rounded up to whole pool
blocks (``models.kv_cache``), and keeps it until it ends. Reserving at admission (rather than growing on
demand and preempting) means a running request can never run out of KV, nothing is ever recomputed, and
outputs stay bitwise those of a lone run; the price is that a request's reservation covers its whole
``max_tokens`` even when it stops early. Cached prefix blocks are evicted (LRU) before a request waits.

* A request that could not fit even in an empty pool is refused at submission with ``KVBudgetExceeded``
  (an ``InputError``: HTTP 400 naming the numbers).
* One that fits the budget but not the pool's free bytes now waits in the queue (FIFO: the oldest request
  is admitted first; the queue is bounded by ``max_queue``, beyond which ``QueueFull`` / HTTP 429).
* ``VLM.generate`` takes its storage from the same pool and raises ``KVPoolFull`` when other requests
  hold it (it has no queue to wait in).

Default budget (``default_kv_cache_bytes``): half the memory available when the model has loaded
(``MemAvailable`` on Linux; free GPU memory on CUDA), at least 256 MiB.
"""
from __future__ import annotations

import os

import torch

from ..errors import InputError
from ..models.kv_cache import KVCache, KVPoolFull

MIN_DEFAULT_BYTES = 256 << 20


class KVBudgetExceeded(InputError):
    """The request's prompt + max_tokens need more KV memory than the whole pool holds."""


def available_memory_bytes(device: torch.device) -> int | None:
    """Bytes still available for allocation on ``device`` (None when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def default_kv_cache_bytes(device: torch.device) -> int:
    avail = available_memory_bytes(device)
    return max(MIN_DEFAULT_BYTES, (avail or 0) // 2)


def parse_gib(value, name: str) -> int:
    """``value`` GiB as bytes (a clear ``InputError`` for anything but a number >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1 << 20:
        raise InputError(f"{name} must be a number of GiB >= 0, got {value!r}")
    return int(value * (1 << 30))


def check_fits(cache: KVCache, positions: int, copies: int = 1) -> int:
    """Bytes ``copies`` requests of ``positions`` positions reserve; ``KVBudgetExceeded`` when that is
    more than the whole pool."""
    need = copies * cache.bytes_for(positions)
    budget = cache.pool.budget_bytes
    if need > budget:
        per = cache.bytes_per_position
        what = f"{copies} choices x " if copies > 1 else ""
        raise KVBudgetExceeded(
            f"this request needs {need / 2**20:.1f} MiB of KV cache ({what}{positions} positions (prompt + "
            f"max_tokens) x {per / 2**10:.1f} KiB) but the KV pool holds {budget / 2**20:.1f} MiB in all "
            f"(--kv-cache-gib); lower max_tokens, shorten the prompt, or raise --kv-cache-gib")
    return need


def reserve_lone(cache: KVCache, slots: int, positions: int) -> None:
    """Allocate slots ``0 .. slots-1`` of ``cache`` for one ``VLM.generate`` call (all or none)."""
    check_fits(cache, positions, slots)
    for slot in range(slots):
        if not cache.allocate(slot, positions):
            cache.free_all()
            pool = cache.pool
            raise KVPoolFull(f"the KV pool is in use: {pool.in_use / 2**20:.1f} of {pool.budget_bytes / 2**20:.1f} "
                             f"MiB are held by other requests and {slots * cache.bytes_for(positions) / 2**20:.1f} "
                             "MiB are needed; retry when they finish")


class SlotTable:
    """The scheduler's slots: ids ``0 .. n-1`` handed out oldest-first, each with pool storage while held."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self._free = list(range(cache.slots - 1, -1, -1))  # pop() hands out slot 0 first

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return self.cache.slots - len(self._free)

    def take(self, members: int, positions: int) -> list[int] | None:
        """``members`` slots, each with storage for ``positions``; None (nothing taken) when there are not
        enough free slots or the pool cannot hold them now."""
        if len(self._free) < members:
            return None
        taken = []
        for _ in range(members):
            slot = self._free.pop()
            taken.append(slot)
            if not self.cache.allocate(slot, positions):
                for s in reversed(taken):
                    self.give_back(s)
                return None
        return taken

    def give_back(self, slot: int) -> None:
        self.cache.free(slot)
        self._free.append(slot)

    def stats(self) -> dict:
        pool = self.cache.pool
        return {"kv_cache_bytes": self.cache.nbytes(), "kv_pool_bytes": pool.in_use,
                "kv_pool_budget_bytes": pool.budget_bytes, "kv_pool_peak_bytes": pool.peak_bytes,
                "kv_block_tokens": pool.block_tokens}
