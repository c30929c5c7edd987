"""Atomic output folders: write into a temporary sibling, rename on success, leave nothing on error."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator


def output_problems(out: str | os.PathLike, overwrite: bool, sources: tuple = (), flag: str = "--out",
                    folder: bool = True, remedy: str | None = None) -> list[str]:
    """What is wrong with an output path, found before any work (one line each).

    ``folder``: ``out`` is a folder written by :func:`atomic_dir` (replaced whole with
    ``overwrite``); else it is a file stem (``<out>.json`` and siblings). ``sources``: input
    paths that the output folder must not be or hold (replacing it would delete them).
    ``remedy``: what to do about an occupied output folder (default: --overwrite or another ``flag``).
    """
    path = Path(out).expanduser()
    resolved = path.resolve()
    if not str(out).strip() or not resolved.name:
        return [f"{flag} {str(out)!r} names no {'folder' if folder else 'file'}; give a path such as runs/x"]
    if not folder and str(out).endswith(("/", os.sep)):
        return [f"{flag} {out} ends with a slash, as a folder does; give a file path such as runs/x"]
    if problem := _place_problem(resolved.parent, f"{flag} {out}"):
        return [problem]
    if not folder:
        return []
    problems = []
    if path.exists() and not path.is_dir():
        problems.append(f"{flag} {out} is a file; give a folder (new, empty, or with --overwrite)")
    elif path.exists() and any(path.iterdir()) and not overwrite:
        problems.append(f"output folder {out} exists and is not empty; "
                        f"{remedy or f'pass --overwrite or another {flag}'}")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        problems.append(f"{flag} {out} holds the current directory; give a folder of its own")
    for src in sources:
        src = Path(src).expanduser().resolve()
        if resolved == src or resolved in src.parents:
            problems.append(f"{flag} {out} is or holds the input {src}, which writing it would delete; give another folder")
    for entry in _cache_entries():  # the converted default model and corpus: inputs whenever defaulted
        if resolved == entry or resolved in entry.parents:
            problems.append(f"{flag} {out} is or holds mptool's cache {entry} (the embedded model and corpus), "
                            "which writing it would delete; give another folder")
            break
    return problems


def _cache_entries() -> list[Path]:
    from mptool.models import CACHE_DIR

    try:
        return sorted(p.resolve() for p in CACHE_DIR.iterdir())
    except OSError:
        return []


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` only if the block succeeds.

    An existing ``out`` is replaced only after the new content is complete; on any exception
    the temporary folder is removed and ``out`` is left as it was.
    """
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # A SIGTERM or Ctrl-C that lands after the folder exists but before the ``try`` below would
    # leave it behind (seen in CI): hold both until the cleanup is armed; they act right after.
    held = _hold_signals()
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except BaseException:
        _release_signals(held)
        raise
    try:
        _release_signals(held)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        yield tmp
        _ordinary_permissions(tmp, umask)
    except BaseException as e:
        _remove(tmp)
        _raise_if_disk_refused(e, out)
        raise
    old = None
    try:
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)  # put the previous content back
        _remove(tmp)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _cannot_create_in(folder: Path) -> str | None:
    """Why nothing can be created in ``folder`` (a read-only mount, /sys as root: places that
    ``os.access`` calls writable), or None. Probes with an empty folder, removed at once."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mptool-probe-", dir=folder))
    except OSError as e:
        return e.strerror or str(e)
    return None


# The disk refusing a write, not a bug of mptool: full, read-only, over quota. (Permissions are
# left out: a read of an input can fail with them too, and the output folder was probed before.)
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}
_DISK_MESSAGES = ("No space left on device", "Read-only file system", "Disk quota exceeded")


def disk_error(exc: BaseException) -> str | None:
    """The one-line reason when ``exc`` is the disk refusing a write (also when safetensors wraps
    the OS error in its own exception), else None."""
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return exc.strerror or str(exc)
    text = str(exc)
    return next((m for m in _DISK_MESSAGES if m in text), None) if type(exc).__name__ == "SafetensorError" else None


def _raise_if_disk_refused(exc: BaseException, out: Path) -> None:
    """Turn the disk refusing the write of ``out`` (full, read-only, quota) into a user error."""
    if why := disk_error(exc):
        from mptool.errors import MptoolError

        raise MptoolError(f"cannot write {out}: {why}; nothing was written (free space or give another --out)") from exc


@contextlib.contextmanager
def atomic_files(paths: list[Path]) -> Iterator[list[Path]]:
    """Yield temporary siblings of ``paths``; all of them replace ``paths`` only if the block
    succeeds, and on any failure none is left (a refusing disk becomes a one-line error)."""
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    tmps = [p.with_name(f".{p.name}.tmp-{os.getpid()}") for p in paths]
    try:
        yield tmps
        for t, p in zip(tmps, paths):
            t.replace(p)
    except BaseException as e:
        for t in tmps:
            t.unlink(missing_ok=True)
        _raise_if_disk_refused(e, paths[0])
        raise


def write_json(path: Path, doc: dict, indent: int = 2) -> None:
    """``doc`` as ``path``, whole or not at all (a result a benchmark writes alone)."""
    import json

    with atomic_files([path]) as (tmp,):
        tmp.write_text(json.dumps(doc, indent=indent) + "\n")


def write_results(stem: Path, doc: dict, markdown: str) -> None:
    """A benchmark's ``<stem>.json`` and ``<stem>.md``, both or neither (a ``stem`` given as
    ``x.json`` or ``x.md`` means ``x``)."""
    import json

    if stem.suffix in (".json", ".md"):
        stem = stem.with_suffix("")
    paths = [stem.with_name(stem.name + ext) for ext in (".json", ".md")]
    with atomic_files(paths) as (tmp_json, tmp_md):
        tmp_json.write_text(json.dumps(doc, indent=2) + "\n")
        tmp_md.write_text(markdown)


def writable_folder_problems(folder: str | os.PathLike, flag: str) -> list[str]:
    """Whether ``folder`` is, or can be made as, a folder this process writes in (one line)."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        return [f"{flag} {folder} is a file; give a folder"]
    problem = _place_problem(path, f"{flag} {folder}")
    return [problem] if problem else []


def _place_problem(folder: Path, what: str) -> str | None:
    """Why nothing can be written at ``folder`` (made with its parents if absent), named after
    ``what`` (the flag and its value), or None: its nearest existing ancestor must be a folder
    this process can create entries in."""
    ancestor = folder
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{what}: {ancestor} is a file, not a folder"
    why = "no write permission" if not os.access(ancestor, os.W_OK | os.X_OK) else _cannot_create_in(ancestor)
    return f"{what}: cannot write in {ancestor} ({why}); give a folder you can write in" if why else None


def result_file_problems(files: list[Path], is_ours: Callable[[Path], bool], command: str,
                         flag: str = "--out", inputs: tuple = ()) -> list[str]:
    """What is wrong with overwriting result files (``files[0]`` a JSON, the rest its siblings).

    A result file is replaced only when it is absent or an earlier result of the same command
    (``is_ours`` on the JSON): never a corpus, a model's ``config.json`` or anything else.
    ``inputs``: model folders the files must not be written into.
    """
    first = Path(files[0])
    for src in inputs:
        src = Path(src).expanduser().resolve()
        if src.is_dir() and src in first.resolve().parents:
            return [f"{flag} {first.with_suffix('')} is inside the input model folder {src}; "
                    "give a path outside it"]
    ours = first.is_file() and is_ours(first)
    for path in files:
        path = Path(path)
        if path.is_dir():
            return [f"{flag} {path} is a folder; give a file path"]
        if path.exists() and not ours:
            return [f"{flag} would overwrite {path}, which is not an earlier `{command}` result; "
                    "give a new path (only its own results are replaced)"]
        # a sibling written with the result is renamed within seconds of it; one changed later is the user's
        if path.exists() and path != first and path.stat().st_mtime - first.stat().st_mtime > _SIBLING_SECONDS:
            return [f"{flag} would overwrite {path}, changed after the `{command}` result beside it was written; "
                    "give a new path (only its own results are replaced)"]
    return []


_SIBLING_SECONDS = 120


def json_object(path: Path) -> dict | None:
    """The JSON object in ``path``, or None (large or non-JSON files are not read through)."""
    import json

    try:
        if path.stat().st_size > 64 << 20:
            return None
        with open(path, encoding="utf-8") as handle:
            if handle.read(1) != "{":
                return None
            handle.seek(0)
            doc = json.load(handle)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def json_with(path: Path, key: str, value: object = None) -> bool:
    """Whether ``path`` holds a JSON object with ``key`` (equal to ``value`` when given): how a
    command knows its own earlier result."""
    doc = json_object(path)
    return doc is not None and key in doc and (value is None or doc[key] == value)


_HELD = (signal.SIGINT, signal.SIGTERM)


def _hold_signals() -> tuple[dict, list] | None:
    """Hold Ctrl-C and SIGTERM: until :func:`_release_signals`, they are noted, not acted on.

    Done with Python handlers rather than a thread signal mask: the kernel may deliver a signal
    to any thread (torch's workers), and Python then runs the handler in the main thread at once.
    Only the main thread sets handlers; elsewhere nothing is held (None)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in _HELD}
    return previous, pending


def _release_signals(held: tuple[dict, list] | None) -> None:
    """Restore the handlers and deliver what was held: its handler runs in the caller's frame."""
    if held is None:
        return
    previous, pending = held
    for s, handler in previous.items():
        signal.signal(s, handler)
    for s in dict.fromkeys(pending):
        signal.raise_signal(s)


def _remove(folder: Path) -> None:
    """Remove a temporary folder; a second pass catches files a finishing writer added meanwhile."""
    for _ in range(3):
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            return


@contextlib.contextmanager
def cache_lock(entry: Path) -> Iterator[None]:
    """Hold an exclusive lock for building the cache entry ``entry`` (one process builds it; the
    others wait, then find it built). Leftover ``.<name>.tmp-*`` folders of a killed build are
    removed once the lock is held: nobody else can be writing them."""
    import fcntl

    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            for stale in entry.parent.glob(f".{entry.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ordinary_permissions(folder: Path, umask: int) -> None:
    """Give everything under ``folder`` the permissions a plain ``open``/``mkdir`` would.

    ``tempfile.mkdtemp`` and safetensors create private (0700/0600) entries; an output folder or
    a shared cache must be readable by the other users of the machine, as any file they write is.
    Files with an execute bit (a written ``serve.sh``) stay executable.
    """
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        path.chmod((0o777 if executable else 0o666) & ~umask)


def kill_session(proc: subprocess.Popen) -> None:
    """End a child started with ``start_new_session=True`` and every process of its session (an
    engine's tensor-parallel workers too), then reap it. Safe when it has already exited."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def remove_vllm_shared_memory(tmpdir: Path) -> None:
    """Remove the /dev/shm segments of the vLLM processes that ran with ``TMPDIR=tmpdir``, should
    their exit have left them.

    vLLM names its rendezvous file ``$TMPDIR/vllm_dist_<id>`` and, on CPU, shares tensors through
    ``/dev/shm/vllm_dist_<id>-...``; with TMPDIR a private folder, the ids found there are exactly
    that run's (seen: two 4 MiB segments left after some tensor-parallel 2 exits).
    """
    shm = Path("/dev/shm")
    for store in Path(tmpdir).glob("vllm_dist_*"):
        for segment in shm.glob(f"{store.name}-*") if shm.is_dir() else []:
            segment.unlink(missing_ok=True)
