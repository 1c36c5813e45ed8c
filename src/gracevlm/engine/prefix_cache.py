"""Exact prefix caching: the KV of prompt prefixes kept in fixed-size blocks, and projected image features.

A prompt is a sequence of positions; a text position is its token id, an image position is
``(image content hash, patch index)``. The prompt is cut into blocks of ``block_tokens`` positions and
block ``i`` is keyed by a chained hash ``key_i = H(key_{i-1}, contents of block i)``, so a key names the
whole prefix up to the end of its block. The image content hash (``image_key``) is taken over the
preprocessed pixels (decoded RGB after the family's processing, so it covers the preprocessing settings):
the same picture at the same place hits whatever its file encoding, and two different pictures of the
same size never share a key.

Exactness. The CPU kernels are NOT M-invariant for prefill (a row's bits depend on how many rows the GEMM
and the attention see; measured: a split prefill of the tiny model differs from a one-shot one in the last
bits of logits and KV, and torch's fp32 GEMM alone gives a row other bits for other M). So with the cache on, every prefill runs in block-aligned
chunks of exactly ``block_tokens`` positions (``prefill_chunks``): chunk ``i`` sees the same inputs, the
same cache contents and the same shapes whether blocks ``< i`` were computed now or copied from the
cache, so a hit gives bitwise the logits and tokens of a cold run WITH the cache. Chunked prefill differs
from the one-shot prefill used when the cache is off (``prefix_cache_gib=0``) in the last bits, which can
flip a near-tie: that is the documented price of turning the cache on. Image features are likewise
encoded one image per forward when the cache is on, so a cached feature equals a fresh one.

Memory: the cache lives in the model's KV pool (``models.kv_cache.KVPool``, ``--kv-cache-gib``): every
block and feature it keeps is charged to the pool, and the pool evicts cached entries (LRU) whenever live
requests need the bytes, so cached prefixes never keep a request out. ``budget_bytes``
(``--prefix-cache-gib``) is a cap on what the cache itself may hold within the pool. Eviction: one LRU
over KV blocks and image features by bytes. A lookup touches the blocks of a chain from the last to the
first, so a chain's first blocks are always the most recent and are evicted last (a block is only useful
with all its predecessors). Thread-safe: ``VLM`` calls and the scheduler's model thread share one cache.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch

DEFAULT_PREFIX_CACHE_GIB = 2.0
DEFAULT_BLOCK_TOKENS = 64


def image_key(pixels: torch.Tensor) -> bytes:
    """Content hash of one preprocessed image ``[3, H, W]`` (shape, dtype and every value)."""
    t = pixels.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.view(torch.uint8).numpy().tobytes())
    return h.digest()


def position_runs(prompt_ids: list[int], image_keys: list[bytes], patches: int) -> list[tuple]:
    """The prompt as runs: ``("t", [ids])`` for text and ``("i", key, patches)`` per image marker (< 0)."""
    runs, text, img = [], [], 0
    for t in prompt_ids:
        if t < 0:
            if text:
                runs.append(("t", text))
                text = []
            runs.append(("i", image_keys[img], patches))
            img += 1
        else:
            text.append(int(t))
    if text:
        runs.append(("t", text))
    return runs


def block_keys(prompt_ids: list[int], image_keys: list[bytes] | None, patches: int, block_tokens: int) -> list[bytes]:
    """Chained keys of every FULL block of the prompt's positions (a trailing partial block has none)."""
    image_keys = image_keys or []
    if sum(1 for t in prompt_ids if t < 0) != len(image_keys):
        raise ValueError("one image key per image marker is needed")
    keys, prev = [], b"gracevlm-prefix-v1"
    h, filled = hashlib.blake2b(prev, digest_size=16), 0

    def feed(tag: bytes, payload: bytes, n: int):
        nonlocal h, filled, prev
        h.update(tag + len(payload).to_bytes(4, "little") + payload)
        filled += n
        if filled == block_tokens:
            prev = h.digest()
            keys.append(prev)
            h, filled = hashlib.blake2b(prev, digest_size=16), 0

    for run in position_runs(prompt_ids, image_keys, patches):
        if run[0] == "t":
            for t in run[1]:
                feed(b"t", int(t).to_bytes(8, "little", signed=True), 1)
        else:
            key, n, p = run[1], run[2], 0
            while p < n:
                take = min(n - p, block_tokens - filled)
                feed(b"i", key + p.to_bytes(4, "little") + take.to_bytes(4, "little"), take)
                p += take
    return keys


class PrefixCache:
    """LRU store of KV blocks (``[layers, 2, kv_heads, block, head_dim]`` each) and image features, charged
    to ``pool`` when given (see the module docstring)."""

    def __init__(self, budget_bytes: int, block_tokens: int = DEFAULT_BLOCK_TOKENS, pool=None):
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        self.budget_bytes = int(budget_bytes)
        self.block_tokens = block_tokens
        self.pool = pool
        self._lru: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()  # re-entered when the pool asks this cache to evict during _put
        self.hits = self.misses = self.evictions = 0  # KV blocks
        self.feature_hits = self.feature_misses = 0
        if pool is not None:
            pool.add_reclaimer(self.evict_for)

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> dict:
        with self._lock:
            kv = sum(1 for k in self._lru if k[0] == "kv")
            return {"prefix_cache_bytes": self._bytes, "prefix_cache_budget_bytes": self.budget_bytes,
                    "prefix_cache_blocks": kv, "prefix_cache_images": len(self._lru) - kv,
                    "prefix_cache_block_hits": self.hits, "prefix_cache_block_misses": self.misses,
                    "prefix_cache_evictions": self.evictions, "image_feature_hits": self.feature_hits,
                    "image_feature_misses": self.feature_misses}

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            if self.pool is not None:
                self.pool.release(self._bytes)
            self._bytes = 0

    def close(self) -> None:
        """Empty the cache and leave the pool (a replaced cache)."""
        self.clear()
        if self.pool is not None:
            self.pool.remove_reclaimer(self.evict_for)

    def _evict_oldest(self) -> int:
        _, old = self._lru.popitem(last=False)
        size = old.numel() * old.element_size()
        self._bytes -= size
        self.evictions += 1
        if self.pool is not None:
            self.pool.release(size)
        return size

    def evict_for(self, nbytes: int) -> int:
        """The pool's reclaimer: evict LRU entries until ``nbytes`` are freed (or the cache is empty)."""
        freed = 0
        with self._lock:
            while freed < nbytes and self._lru:
                freed += self._evict_oldest()
        return freed

    def _put(self, key: tuple, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.budget_bytes or key in self._lru:
            return
        while self._bytes + size > self.budget_bytes and self._lru:
            self._evict_oldest()
        if self.pool is not None and not self.pool.reserve(size):
            return  # live requests hold the pool: keep nothing rather than exceed it
        self._lru[key] = value
        self._bytes += size

    # -- image features ------------------------------------------------------------------------
    def get_features(self, key: bytes) -> torch.Tensor | None:
        with self._lock:
            value = self._lru.get(("img", key))
            if value is None:
                self.feature_misses += 1
                return None
            self._lru.move_to_end(("img", key))
            self.feature_hits += 1
            return value

    def put_features(self, key: bytes, features: torch.Tensor) -> None:
        """``features [tokens, hidden]`` of one image (kept as given; the caller must not modify it)."""
        with self._lock:
            self._put(("img", key), features)

    # -- KV blocks -----------------------------------------------------------------------------
    def usable_blocks(self, keys: list[bytes], length: int) -> list[torch.Tensor]:
        """The cached blocks of the longest cached prefix, at most ``(length - 1) // block`` of them (the
        last prompt position is always computed, its logits start the answer); touches them."""
        limit = min(len(keys), (length - 1) // self.block_tokens)
        found = []
        with self._lock:
            for key in keys[:limit]:
                value = self._lru.get(("kv", key))
                if value is None:
                    break
                found.append(value)
            for key in reversed(keys[:len(found)]):
                self._lru.move_to_end(("kv", key))
            self.hits += len(found)
            self.misses += limit - len(found)
        return found

    def load(self, blocks: list[torch.Tensor], cache, slot: int) -> int:
        """Copy ``blocks`` into positions ``0 ..`` of ``cache``'s ``slot``; returns the positions filled."""
        b = self.block_tokens
        for i, block in enumerate(blocks):
            cache.write_block(slot, i * b, block)
        return len(blocks) * b

    def store(self, keys: list[bytes], cache, slot: int, upto: int) -> None:
        """Keep the blocks of ``cache``'s ``slot`` that lie wholly below position ``upto`` (and have keys)."""
        b = self.block_tokens
        n = min(len(keys), upto // b)
        with self._lock:  # reserve, then copy: the pool never holds more than its ledger says
            for i in range(n):  # parents first, then touch in reverse below
                if ("kv", keys[i]) not in self._lru:
                    self._put_block(("kv", keys[i]), cache, slot, i * b, (i + 1) * b)
            for key in reversed(keys[:n]):
                if ("kv", key) in self._lru:
                    self._lru.move_to_end(("kv", key))

    def _put_block(self, key: tuple, cache, slot: int, start: int, end: int) -> None:
        size = (end - start) * cache.bytes_per_position
        if size > self.budget_bytes:
            return
        while self._bytes + size > self.budget_bytes and self._lru:
            self._evict_oldest()
        if self.pool is not None and not self.pool.reserve(size):
            return
        self._lru[key] = cache.read_block(slot, start, end)
        self._bytes += size


class PrefixPlan:
    """One request's view of the cache: its block keys, the blocks it can reuse, positions cached."""

    def __init__(self, cache: PrefixCache, keys: list[bytes], length: int):
        self.cache, self.keys, self.length = cache, keys, length
        self.blocks = cache.usable_blocks(keys, length)
        self.cached = len(self.blocks) * cache.block_tokens

    @property
    def chunk(self) -> int:
        return self.cache.block_tokens


def plan_for(cache: PrefixCache | None, model, prompt_ids: list[int], image_keys: list[bytes] | None,
             image_features: torch.Tensor | None, length: int) -> PrefixPlan | None:
    """A ``PrefixPlan`` when ``cache`` is on and the request can use it (the model supports prefix caching
    and every image has a content key), else None (plain one-shot prefill)."""
    if cache is None or not cache.enabled or not getattr(model, "supports_prefix_cache", False):
        return None
    n_images = sum(1 for t in prompt_ids if t < 0)
    if n_images and (image_keys is None or len(image_keys) != n_images or image_features is None):
        return None
    patches = image_features.shape[1] if image_features is not None else 0
    return PrefixPlan(cache, block_keys(prompt_ids, image_keys, patches, cache.block_tokens), length)


def prefill_chunks(model, prompt, cache, slot: int, plan: PrefixPlan) -> torch.Tensor:
    """Copy the plan's cached blocks into ``slot``, prefill the rest of ``prompt`` (the model's ``prompt_for``
    result) in block-aligned chunks (``model.forward_prompt``), store the new full blocks; returns the last
    position's logits ``[1, V]`` (the other chunks skip the final norm and ``lm_head``)."""
    length, chunk = prompt.length, plan.chunk
    start = plan.cache.load(plan.blocks, cache, slot)
    logits = None
    while start < length:
        end = min(length, start + chunk)
        logits = model.forward_prompt(prompt, cache, slot, start, end, logits_for="last" if end == length else "none")
        start = end
    plan.cache.store(plan.keys, cache, slot, length)
    return logits
