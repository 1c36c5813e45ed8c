"""Publishing a folder atomically: a hidden temporary folder, written completely, then swapped in.

``new_temp_folder(out)`` makes ``.<name>.<random>`` next to ``out`` and holds an ``flock`` on that
folder while this process writes it (nothing is added inside it); first it removes the temporary folders that earlier runs
left behind (killed: their lock is gone) - never one whose writer is still alive.

``replace_folder(tmp, out)`` publishes ``tmp`` as ``out`` without a moment where neither exists for
good: the old ``out`` is renamed aside (``.<name>.old-<random>``), ``tmp`` renamed to ``out``, then the old
one deleted. If the swap fails or is interrupted (Ctrl-C), the old folder is put back. If the process is
killed between the two renames, the next ``new_temp_folder(out)`` finds ``out`` missing and the aside
folder present, and restores it. Swaps and clean-ups of one parent folder are serialized by an
``flock`` on that folder.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

_writer_fds: dict[str, int] = {}  # temporary folder -> descriptor holding its writer lock


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _parent_locked(parent: Path) -> Iterator[None]:
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _temp_name(out: Path) -> re.Pattern:
    return re.compile(r"\." + re.escape(out.name) + r"\.(old-)?[A-Za-z0-9_]{6,16}$")


def _writer_alive(folder: Path) -> bool:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def clean_stale(out: str | os.PathLike) -> list[Path]:
    """Remove temporary folders of ``out`` left by killed runs (restoring an old ``out`` set aside by a run
    killed mid-swap when ``out`` is missing); returns what was removed or restored."""
    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return []
    pattern, done = _temp_name(out), []
    with _parent_locked(parent):
        for entry in sorted(parent.iterdir()):
            m = pattern.fullmatch(entry.name)
            if m is None or not entry.is_dir() or entry.is_symlink():
                continue
            if m.group(1):  # an old version set aside
                if not out.exists():
                    os.replace(entry, out)
                else:
                    shutil.rmtree(entry, ignore_errors=True)
                done.append(entry)
            elif not _writer_alive(entry):
                shutil.rmtree(entry, ignore_errors=True)
                done.append(entry)
    return done


def new_temp_folder(out: str | os.PathLike) -> Path:
    """A fresh private temporary folder beside ``out`` for this process to write (see the module)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _writer_fds[str(tmp)] = fd
    return tmp


def _release_writer(tmp: Path) -> None:
    fd = _writer_fds.pop(str(tmp), None)
    if fd is not None:
        os.close(fd)


def discard_temp_folder(tmp: str | os.PathLike) -> None:
    """Delete an unpublished temporary folder (after a failure)."""
    tmp = Path(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    _release_writer(tmp)


def replace_folder(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Publish the completely written folder ``tmp`` as ``out``, replacing what was there (see the module)."""
    tmp, out = Path(tmp), Path(out)
    os.chmod(tmp, 0o777 & ~_umask())
    with _parent_locked(out.parent):
        aside = None
        if out.exists() or out.is_symlink():
            aside = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
            os.replace(out, aside)
        try:
            os.replace(tmp, out)
        except BaseException:
            if aside is not None:
                os.replace(aside, out)
            raise
        _release_writer(tmp)
        if aside is not None:
            shutil.rmtree(aside) if aside.is_dir() and not aside.is_symlink() else aside.unlink()
