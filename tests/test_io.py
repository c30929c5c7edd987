"""Atomic output folders: all or nothing, with the permissions of an ordinary folder; child
engines ended with their whole session."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest
from safetensors.torch import save_file
import torch

from mptool.io import atomic_dir, kill_session


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_result_has_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "a.txt").write_text("x")
            os.chmod(tmp / "sub" / "a.txt", 0o600)
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "run.sh", 0o700)
    finally:
        os.umask(umask)
    out = tmp_path / "out"
    assert mode(out) == 0o755 and mode(out / "sub") == 0o755
    assert mode(out / "model.safetensors") == 0o644 and mode(out / "sub" / "a.txt") == 0o644
    assert mode(out / "run.sh") == 0o755


def test_failure_leaves_the_old_folder_and_no_temporary(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]


@pytest.mark.parametrize("delivered_to", ["main thread", "another thread"])
def test_sigterm_just_after_the_folder_is_made_leaves_nothing(tmp_path, monkeypatch, delivered_to):
    """The CI failure: SIGTERM landed between mkdtemp and the cleanup's ``try``. A signal sent at
    exactly that point now acts once the cleanup is armed: exit 143, no temporary folder. The
    kernel may hand a process signal to any thread (torch's workers); Python still runs the
    handler in the main thread, so both deliveries are tried."""
    import signal
    import tempfile
    import threading

    from mptool.cli import _terminated

    real_mkdtemp = tempfile.mkdtemp
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()  # created before the main thread blocks SIGTERM: it can receive it

    def mkdtemp_then_sigterm(*args, **kwargs):
        made = real_mkdtemp(*args, **kwargs)
        if delivered_to == "another thread":
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the other thread takes it; Python flags it for the main thread
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        else:
            os.kill(os.getpid(), signal.SIGTERM)
        return made

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp_then_sigterm)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        with pytest.raises(SystemExit) as stopped:
            with atomic_dir(tmp_path / "out") as tmp:
                (tmp / "never.txt").write_text("the body must not run")
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop.set()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """ENOSPC mid-write (or safetensors' wrapped form of it): a user error naming the cause, the
    temporary folder gone, an earlier output kept."""
    import errno

    from safetensors import SafetensorError

    from mptool.errors import MptoolError

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    for failure in (OSError(errno.ENOSPC, "No space left on device"),
                    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                    'message: "No space left on device" })')):
        with pytest.raises(MptoolError, match=f"cannot write {out}: No space left on device; nothing was written"):
            with atomic_dir(out) as tmp:
                (tmp / "part.bin").write_bytes(b"x")
                raise failure
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").read_text() == "old"
    with pytest.raises(OSError):  # anything else keeps its traceback: it may be a bug
        with atomic_dir(out):
            raise OSError(errno.EIO, "Input/output error")


def test_an_output_place_that_refuses_creation_is_found_up_front(tmp_path, monkeypatch):
    """os.access says yes to root on /sys or a read-only mount; a probe folder says no."""
    import errno
    import tempfile

    from mptool.io import output_problems

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    assert output_problems(tmp_path / "x", overwrite=False) == [
        f"--out {tmp_path / 'x'}: cannot write in {tmp_path} (Read-only file system); give a folder you can write in"]


def test_an_output_place_without_write_permission_is_named(tmp_path, monkeypatch):
    """A folder os.access calls unwritable (a user's missing permission; root never sees it)."""
    from pathlib import Path

    from mptool.io import output_problems

    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    assert output_problems(tmp_path / "a" / "b", overwrite=False) == [
        f"--out {tmp_path / 'a' / 'b'}: cannot write in {tmp_path} (no write permission); give a folder you can write in"]


def test_kill_session_ends_the_child_and_its_workers(tmp_path):
    """An engine child that started a worker of its own (vLLM's tensor-parallel workers): both
    are gone after kill_session, not only the process we hold."""
    pid_file = tmp_path / "worker.pid"
    spawn = ("import subprocess, sys, time; "
             "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
             f"open({str(pid_file)!r}, 'w').write(str(w.pid)); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", spawn], start_new_session=True)
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    kill_session(proc)
    assert proc.returncode == -9
    for _ in range(200):  # the worker is reparented to init: gone, or a zombie nobody reaps yet
        try:
            state = open(f"/proc/{worker}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"worker {worker} survived kill_session")
    kill_session(proc)  # already ended: no error


def test_write_results_writes_both_or_neither(tmp_path):
    import json

    from mptool.io import write_results

    # a stem with a dot keeps it; a stem given as x.json means x
    write_results(tmp_path / "sub" / "bench_v1.2", {"a": 1}, "| a |\n")
    assert json.loads((tmp_path / "sub" / "bench_v1.2.json").read_text()) == {"a": 1}
    assert (tmp_path / "sub" / "bench_v1.2.md").read_text() == "| a |\n"
    write_results(tmp_path / "t.json", {"b": 2}, "b\n")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["t.json", "t.md"]
    # a document that cannot be serialised leaves neither file and no temporary
    with pytest.raises(TypeError):
        write_results(tmp_path / "bad", {"x": object()}, "never")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["t.json", "t.md"]


def test_write_json_is_whole_or_absent(tmp_path):
    import json

    from mptool.io import write_json

    write_json(tmp_path / "new" / "cost.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "new" / "cost.json").read_text()) == {"a": [1, 2]}
    with pytest.raises(TypeError):  # the earlier result stays as it was, and no temporary is left
        write_json(tmp_path / "new" / "cost.json", {"x": object()})
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["cost.json"]
    assert json.loads((tmp_path / "new" / "cost.json").read_text()) == {"a": [1, 2]}
