"""``no_space_message``: one line for a disk-full failure, however deep and however wrapped it surfaced.

A full disk shows up as ``OSError(ENOSPC)``, or wrapped by a library (safetensors: ``SafetensorError:
... No space left on device (os error 28)``), often chained under other exceptions. The command line
prints ``no space left on <folder>`` once instead of the chained tracebacks.
"""
from __future__ import annotations

import errno
import os

_MARKERS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def _is_no_space(exc: BaseException) -> tuple[bool, str | None]:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True, exc.filename
    return any(m in str(exc) for m in _MARKERS), None


def no_space_message(exc: BaseException, *candidates: str | os.PathLike | None) -> str | None:
    """``"no space left on DIR"`` when ``exc`` or an exception in its chain is a disk-full error, else None.
    DIR is the folder of the file that failed when known, else the first of ``candidates`` (the
    command's output path: its folder is where the temporary files were written)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        full, filename = _is_no_space(e)
        if full:
            where = filename or next((c for c in candidates if c), None)
            if where is None:
                return "no space left on the output device"
            folder = os.path.dirname(os.path.abspath(os.fspath(where))) or "/"
            return f"no space left on {folder} (free some space, or write elsewhere)"
        e = e.__cause__ or e.__context__
    return None
