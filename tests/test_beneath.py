"""``server.beneath``: files opened relative to a folder never leave it - ``..``, absolute and escaping
symlinks, FIFOs, folders, and a symlink swapped in while another thread opens - with ``openat2`` and with
the component-wise ``O_NOFOLLOW`` fallback."""
import os
import threading

import pytest

from gracevlm.server import beneath
from gracevlm.server.beneath import BeneathError, read_file_beneath

MODES = [pytest.param(True, id="openat2"), pytest.param(False, id="nofollow")]


@pytest.fixture
def tree(tmp_path):
    root, out = tmp_path / "root", tmp_path / "out"
    (root / "real").mkdir(parents=True)
    out.mkdir()
    (root / "real" / "a").write_bytes(b"inside")
    (out / "a").write_bytes(b"SECRET")
    os.symlink("../out", root / "esc")
    os.symlink(str(out / "a"), root / "abs")
    os.mkfifo(root / "fifo")
    return root


@pytest.mark.parametrize("use_openat2", MODES)
def test_escapes_are_refused(tree, use_openat2):
    assert read_file_beneath(tree, "real/a", 100, use_openat2) == b"inside"
    assert read_file_beneath(tree, "./real//a", 100, use_openat2) == b"inside"
    for rel, reason in (("esc/a", "outside"), ("abs", "outside"), ("../out/a", "outside"), ("real", "not_a_file"),
                        ("fifo", "not_a_file"), ("nope", "missing"), ("real/a\0x", "missing")):
        with pytest.raises(BeneathError) as exc:
            read_file_beneath(tree, rel, 100, use_openat2)
        assert exc.value.reason == reason, rel
    with pytest.raises(BeneathError) as exc:
        read_file_beneath(tree, "real/a", 3, use_openat2)
    assert (exc.value.reason, exc.value.size) == ("too_large", 6)


def test_openat2_is_used_where_the_kernel_has_it(tree):
    read_file_beneath(tree, "real/a", 100)
    release = tuple(int(x) for x in os.uname().release.split(".")[:2] if x.isdigit())
    if beneath._openat2_works is False:
        pytest.skip(f"openat2 unavailable here (kernel {os.uname().release}, or a sandbox refuses it)")
    assert beneath._openat2_works is True and release >= (5, 6)


@pytest.mark.parametrize("use_openat2", MODES)
def test_racing_symlink_swap_never_escapes(tree, use_openat2):
    os.symlink("real", tree / "sub")
    stop = threading.Event()

    def swap():
        for i in range(1_000_000):
            if stop.is_set():
                return
            tmp = tree / f".s{i % 2}"
            os.symlink("real" if i % 2 else "../out", tmp)
            os.replace(tmp, tree / "sub")

    t = threading.Thread(target=swap, daemon=True)
    t.start()
    seen = set()
    try:
        for _ in range(3000):
            try:
                seen.add(read_file_beneath(tree, "sub/a", 100, use_openat2))
            except BeneathError as exc:
                seen.add(exc.reason)
    finally:
        stop.set()
        t.join(30)
    assert b"SECRET" not in seen and seen <= {b"inside", "outside", "missing"}, seen


def _drop_root_file_powers():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: then root obeys file modes
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.mark.parametrize("use_openat2", MODES)
def test_unreadable_is_not_reported_as_missing(tree, use_openat2):
    import subprocess
    import sys

    (tree / "locked").write_bytes(b"x")
    os.chmod(tree / "locked", 0)
    code = ("import sys; from gracevlm.server.beneath import BeneathError, read_file_beneath\n"
            f"try: read_file_beneath({str(tree)!r}, 'locked', 10, {use_openat2})\n"
            "except BeneathError as e: print(e.reason)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       preexec_fn=_drop_root_file_powers if os.geteuid() == 0 else None)
    assert r.stdout.strip() == "unreadable", r
