"""Open a file strictly inside a folder, with no check-then-open race.

``read_file_beneath(root, relative, cap)`` opens ``relative`` relative to a descriptor of ``root`` so that
nothing - ``..``, an absolute or escaping symlink, a directory swapped for a symlink while the request
runs - can make it open a file outside ``root``:

* Linux >= 5.6: ``openat2(root_fd, relative, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`` (through ctypes);
  symlinks that stay inside ``root`` are followed, any step outside fails with ``EXDEV``.
* elsewhere (or where a sandbox refuses the syscall): one ``openat(..., O_NOFOLLOW)`` per path component
  from the root's descriptor, so no symlink is followed at all and ``..`` is refused.

The opened descriptor is then checked (``fstat``: a regular file) before any byte is read; ``O_NONBLOCK``
keeps a FIFO from blocking the open. Errors are ``BeneathError`` with a ``reason``: "outside", "missing",
"unreadable", "not_a_file" or "too_large".
"""
from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = 437  # the same number on every Linux architecture (asm-generic)


class BeneathError(Exception):
    def __init__(self, reason: str, size: int = 0):
        super().__init__(reason)
        self.reason, self.size = reason, size


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = None
_openat2_works: bool | None = None if sys.platform.startswith("linux") else False


def _openat2(dir_fd: int, relative: str, flags: int) -> int | None:
    """The descriptor, or None when ``openat2`` is unavailable here (then the caller falls back)."""
    global _libc, _openat2_works
    if _openat2_works is False:
        return None
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _openat2_works = False
            return None
    how = _OpenHow(flags, 0, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd), os.fsencode(relative),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd >= 0:
        _openat2_works = True
        return fd
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM) and _openat2_works is None:  # old kernel, or a seccomp filter
        _openat2_works = False
        return None
    raise OSError(err, os.strerror(err), relative)


def _open_nofollow(dir_fd: int, relative: str, flags: int) -> int:
    """Component-wise ``openat`` with ``O_NOFOLLOW``: no symlink is followed, ``..`` is refused."""
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise OSError(errno.EXDEV, "path leaves the folder", relative)
    fd = os.dup(dir_fd)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW, dir_fd=fd)
    finally:
        os.close(fd)


def open_beneath(root: str | os.PathLike, relative: str, use_openat2: bool = True) -> int:
    """A read-only descriptor of ``root/relative`` that is guaranteed to lie inside ``root``."""
    if "\0" in relative:
        raise BeneathError("missing")
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _openat2(root_fd, relative, flags) if use_openat2 else None
        return fd if fd is not None else _open_nofollow(root_fd, relative, flags)
    except OSError as exc:
        raise BeneathError(_reason(exc.errno)) from None
    finally:
        os.close(root_fd)


def _reason(err: int | None) -> str:
    if err in (errno.EXDEV, errno.ELOOP, errno.ENOTDIR):
        return "outside"  # escaped, or a symlink where no symlink is followed
    if err in (errno.EACCES, errno.EPERM):
        return "unreadable"
    if err == errno.EISDIR:
        return "not_a_file"
    return "missing"


def read_file_beneath(root: str | os.PathLike, relative: str, cap: int, use_openat2: bool = True) -> bytes:
    """At most ``cap`` bytes of the regular file ``root/relative`` (``BeneathError("too_large")`` above)."""
    fd = open_beneath(root, relative, use_openat2)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BeneathError("not_a_file")
        if st.st_size > cap:
            raise BeneathError("too_large", st.st_size)
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while total <= cap:
            try:
                chunk = os.read(fd, min(1 << 20, cap + 1 - total))
            except OSError as exc:
                raise BeneathError(_reason(exc.errno)) from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > cap:
            raise BeneathError("too_large", total)
        return b"".join(chunks)
    finally:
        os.close(fd)
