"""One writer per answers file: ``answers_lock(path)`` holds an exclusive, non-blocking ``flock``.

Two ``eval run`` processes on the same answers file would each see the same questions unanswered and
both append them (400 lines for 200 questions, both reporting complete). The lock is taken on the
answers file itself (it is only ever appended to or truncated in place, so its inode is stable) for the
whole run, which also covers the manifest beside it: the manifest is only written by the lock holder.
A second run fails at once with ``InputError``; the lock goes away with the process, even on SIGKILL.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from ..errors import InputError


@contextlib.contextmanager
def answers_lock(path: str | os.PathLike) -> Iterator[None]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another `eval run` is writing {path} (and its manifest) right now; wait for it "
                             "to finish, or give this run another --answers-file") from None
        try:
            yield
        finally:
            if created and os.fstat(fd).st_size == 0:  # nothing written: leave no empty answers file behind
                with contextlib.suppress(OSError):
                    os.unlink(path)
    finally:
        os.close(fd)
