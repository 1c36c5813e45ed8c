"""``formats.publish``: replacing an export never leaves neither version - an interrupted swap restores the
old folder, a run killed mid-swap is repaired by the next run, temporary folders of killed runs are
cleaned while those of live writers are kept."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from gracevlm.formats import publish
from gracevlm.formats.publish import clean_stale, discard_temp_folder, new_temp_folder, replace_folder


def _folder(path, text):
    path.mkdir()
    (path / "f.txt").write_text(text)
    return path


def test_swap_replaces_and_leaves_nothing_behind(tmp_path):
    out = _folder(tmp_path / "out", "old")
    tmp = new_temp_folder(out)
    (tmp / "f.txt").write_text("new")
    replace_folder(tmp, out)
    assert (out / "f.txt").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["out"]


def test_interrupted_swap_restores_the_old_folder(tmp_path, monkeypatch):
    out = _folder(tmp_path / "out", "old")
    tmp = new_temp_folder(out)
    (tmp / "f.txt").write_text("new")
    real = os.replace

    def interrupted(src, dst):
        if os.fspath(src) == os.fspath(tmp):
            raise KeyboardInterrupt  # Ctrl-C between setting the old folder aside and the swap
        return real(src, dst)

    monkeypatch.setattr(publish.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(tmp, out)
    monkeypatch.undo()
    assert (out / "f.txt").read_text() == "old"
    discard_temp_folder(tmp)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_killed_runs_are_cleaned_up_or_repaired_next_time(tmp_path):
    out = _folder(tmp_path / "out", "old")
    # a writer killed while writing its temporary folder
    r = _run(f"""
        import os, signal
        from gracevlm.formats.publish import new_temp_folder
        tmp = new_temp_folder({str(out)!r})
        (tmp / "part.bin").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert r.returncode == -signal.SIGKILL
    stale = [p for p in os.listdir(tmp_path) if p != "out"]
    assert len(stale) == 1 and stale[0].startswith(".out.")
    # a live writer's temporary folder is not touched
    live = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from gracevlm.formats.publish import new_temp_folder
        print(new_temp_folder({str(out)!r}), flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        live_tmp = live.stdout.readline().strip()
        assert not os.path.exists(tmp_path / stale[0])  # cleaned by the live writer's new_temp_folder
        assert clean_stale(out) == [] and os.path.isdir(live_tmp)
    finally:
        live.stdin.close()
        live.wait(60)
    # a run killed between setting the old folder aside and the swap: the next run restores it
    r = _run(f"""
        import os, signal
        from gracevlm.formats import publish
        tmp = publish.new_temp_folder({str(out)!r})
        real = os.replace
        def replace(src, dst):
            if os.fspath(src) == os.fspath(tmp):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)
        publish.os.replace = replace
        publish.replace_folder(tmp, {str(out)!r})
    """)
    assert r.returncode == -signal.SIGKILL and not out.exists()
    tmp = new_temp_folder(out)
    assert (out / "f.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == sorted(["out", tmp.name])
    discard_temp_folder(tmp)


def test_export_force_over_an_export_keeps_one_version(tmp_path, monkeypatch):
    from gracevlm.export import export_model
    from gracevlm.synth.checkpoint import synthesize

    ckpt = synthesize(tmp_path / "ckpt", "tiny", "awq", seed=0, progress=False)
    out = tmp_path / "hf"
    export_model(ckpt, "llava-hf", out, progress=False)
    before = sorted(os.listdir(out))
    real = os.replace

    def interrupted(src, dst):  # Ctrl-C at the moment the new export would replace the old one
        name = os.path.basename(os.fspath(src))
        if name.startswith(".hf.") and not name.startswith(".hf.old-"):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(publish.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model(ckpt, "llava-hf", out, force=True, progress=False)
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]
