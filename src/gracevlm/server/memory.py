"""Keeping the server's resident size where it was after a big request (glibc; no-ops elsewhere).

glibc serves an allocation above its mmap threshold with its own mapping (returned to the OS on free), but
it RAISES that threshold after such a block is freed (up to 32 MiB), so the next big image buffers and
embeddings land in the heap and stay resident after the request: 383 MB -> 1.4 GB was measured after a few
large requests. ``pin_mmap_threshold`` fixes the threshold (big buffers always come back), and
``release_free_memory`` (``malloc_trim``) returns what freed heap memory remains, after big requests.
"""
from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL("libc.so.6")
                lib.mallopt, lib.malloc_trim  # noqa: B018 - both exist in glibc only
                _libc = lib
            except (OSError, AttributeError):
                pass
    return _libc


def pin_mmap_threshold(nbytes: int = 4 * 2**20) -> bool:
    """Allocations of ``nbytes`` or more always get their own mapping; True when glibc took it."""
    lib = _glibc()
    return bool(lib and lib.mallopt(M_MMAP_THRESHOLD, int(nbytes)))


def release_free_memory() -> None:
    lib = _glibc()
    if lib:
        lib.malloc_trim(0)


def peak_rss_bytes(pid: int | str = "self") -> int:
    """VmHWM (peak resident size) of a process, from /proc (0 where unavailable)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
