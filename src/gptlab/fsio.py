"""File helpers shared by shard, manifest, checkpoint and weight readers/writers (no torch import at module level).

What lives here, so every writer behaves the same:

- :func:`create_file` / :class:`HashingWriter`: new files honour the umask (0644 under the usual 022;
  ``tempfile.mkstemp`` would make them 0600), hash while writing, and turn a full disk or any other
  write error into one :class:`DiskError` line naming the file and the free space needed.
- :class:`DirLock`: one writer per run / dataset / export directory. An ``flock`` on a lock file beside
  the directory: the kernel drops it when the process dies, so a ``kill -9`` never leaves a stale lock.
- :func:`swap_dirs`: replace a directory with a complete new one in one step (``renameat2`` with
  ``RENAME_EXCHANGE`` on Linux, ``renamex_np`` with ``RENAME_SWAP`` on macOS).
- :func:`guard_out_dir`: ``--out`` may not be ``/``, the home directory, or a directory of someone else's files.
- :func:`read_safetensors`: a damaged weights file is one error naming it.

Tests inject faults (a kill, a full disk) through :mod:`gptlab.hooks` points fired here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from gptlab import hooks
from gptlab.errors import GptlabError

class DiskError(GptlabError, OSError):
    """A write failed (disk full, permissions, I/O error); the message names the file and what is needed."""


class LockError(GptlabError):
    """Another process holds the directory's lock; the message names its pid and host."""


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space (for this user) on the filesystem holding ``path`` or its nearest existing parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_error(e: OSError, path: str | os.PathLike, need: int | None = None) -> DiskError:
    """One line for a failed write: the file, the OS's reason and, on a full disk, the space needed."""
    reason = os.strerror(e.errno) if e.errno else str(e)
    msg = f"{path}: write failed: {reason}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(path)
        need_s = f"about {_human(need)} more is needed" if need else "more space is needed"
        msg += (f" ({need_s}; {_human(free) if free is not None else 'unknown'} free there); free some space "
                f"or write somewhere else")
    err = DiskError(msg)
    err.errno = e.errno
    return err


# --------------------------------------------------------------------------- files


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk before it is renamed into place."""
    with Path(path).open("rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (a rename inside it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - filesystems that refuse directory fsync
        pass
    finally:
        os.close(fd)


def temp_name(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A hidden unique sibling of ``path`` (``.NAME.TAG-PID-RANDOM``); leftovers match ``.NAME.TAG-*``."""
    p = Path(path)
    return p.parent / f".{p.name}.{tag}-{os.getpid()}-{secrets.token_hex(3)}"


def remove_leftovers(path: str | os.PathLike, tags: Iterable[str] = ("tmp", "old", "del")) -> list[Path]:
    """Delete hidden siblings of ``path`` that an interrupted write of it left (call with its lock held)."""
    p = Path(path)
    removed = []
    if not p.parent.is_dir():
        return removed
    for tag in tags:
        for q in p.parent.glob(f".{p.name}.{tag}-*"):
            if q.is_dir() and not q.is_symlink():
                shutil.rmtree(q, ignore_errors=True)
            else:
                q.unlink(missing_ok=True)
            removed.append(q)
    return removed


class HashingWriter:
    """A new file opened for writing (mode 0666 minus the umask), hashing every byte it writes.

    Write errors become :class:`DiskError`; ``expected_size`` (when known) lets the message say how much
    space was needed. ``close()`` fsyncs. On an exception inside ``with`` the partial file is removed.
    """

    def __init__(self, path: str | os.PathLike, expected_size: int | None = None,
                 display: str | os.PathLike | None = None) -> None:
        self.path = Path(path)
        self.display = display or self.path  # the name errors give (a temporary's final name)
        self.expected_size = expected_size
        self.sha = hashlib.sha256()
        self.size = 0
        self.error: DiskError | None = None
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except OSError as e:
            raise disk_error(e, self.display, expected_size) from None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        self.sha.update(view)
        try:
            hooks.fire("file_write", path=self.path)
            done = 0
            while done < n:
                done += os.write(self.fd, view[done:done + (1 << 26)])
        except OSError as e:
            need = (self.expected_size - self.size) if self.expected_size else n
            self.error = disk_error(e, self.display, need)
            raise self.error from None
        self.size += n
        return n

    def flush(self) -> None:  # file-like protocol (torch.save calls it)
        pass

    def hexdigest(self) -> str:
        return self.sha.hexdigest()

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            os.fsync(self.fd)
        except OSError as e:
            self.error = disk_error(e, self.display, None)
            raise self.error from None
        finally:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "HashingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
            if self.error is not None and exc is not self.error:
                raise self.error from None  # e.g. torch.save's RuntimeError hiding our ENOSPC


def write_file(path: str | os.PathLike, data: bytes | Iterable[Any], display: str | os.PathLike | None = None) -> str:
    """Write ``data`` (bytes, or an iterable of buffers) to a new file at ``path``; return its SHA-256."""
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    size = sum(memoryview(p).nbytes for p in parts)
    with HashingWriter(path, size, display) as w:
        for p in parts:
            w.write(p)
    return w.hexdigest()


def write_atomic(path: str | os.PathLike, data: bytes | Iterable[Any]) -> str:
    """Write to a hidden temporary sibling, fsync, rename over ``path``; return the SHA-256.

    A kill leaves either the old file or the new one; the temporary is removed on any error.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        digest = write_file(tmp, data, display=path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return digest


def write_json_atomic(path: str | os.PathLike, obj: Any) -> str:
    """:func:`write_atomic` of ``obj`` as indented UTF-8 JSON."""
    return write_atomic(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


# --------------------------------------------------------------------------- locks


def lock_path(directory: str | os.PathLike) -> Path:
    """The lock file of ``directory``: beside it, so it survives the directory being swapped or removed."""
    d = Path(directory).expanduser().resolve()  # one lock whatever path (., .., a symlink) names the directory
    return d.parent / f".{d.name}.gptlab-lock"


class DirLock:
    """An exclusive, non-blocking OS lock on a directory (``fcntl.flock`` on :func:`lock_path`).

    ``acquire`` raises :class:`LockError` naming the holder (pid, host, command, since) when another
    process has it. The kernel releases it when this process dies, however it dies.
    """

    def __init__(self, directory: str | os.PathLike, what: str = "directory") -> None:
        self.directory = Path(directory).expanduser()
        self.what = what
        self.path = lock_path(self.directory)
        self.fd = -1

    def acquire(self) -> "DirLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no flock; one writer is then the user's job
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise disk_error(e, self.path) from None
                self._refuse(fd)
            try:  # the holder before us may have removed the file on release: lock the one that is there
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "command": " ".join(["gptlab", *sys.argv[1:3]]) if sys.argv else "gptlab",
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        self.fd = fd
        return self

    def _refuse(self, fd: int) -> None:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
        except (OSError, ValueError):
            holder = {}
        os.close(fd)
        who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
               + (f" ({holder['command']}, since {holder.get('since', '?')})" if holder.get("command") else ""))
        raise LockError(f"{self.directory}: this {self.what} is in use by another gptlab process, {who}; wait "
                        f"for it to finish (or stop it), or use another directory")

    def release(self) -> None:
        if self.fd >= 0:
            # Removed while still locked (a process that opened it meanwhile sees another inode and retries);
            # closing the last descriptor drops the flock. After a kill -9 the file stays, unlocked.
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --------------------------------------------------------------------------- directory swaps

_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS sys/stdio.h
_AT_FDCWD = -100


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:  # pragma: no cover
        return None


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap two existing paths. False where the OS or filesystem cannot (then nothing moved)."""
    libc = _libc()
    fa, fb = os.fsencode(os.fspath(a)), os.fsencode(os.fspath(b))
    if libc is not None and hasattr(libc, "renameat2"):
        rc = libc.renameat2(_AT_FDCWD, fa, _AT_FDCWD, fb, ctypes.c_uint(_RENAME_EXCHANGE))
    elif libc is not None and hasattr(libc, "renamex_np"):  # macOS
        rc = libc.renamex_np(fa, fb, ctypes.c_uint(_RENAME_SWAP))
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a))


def swap_dirs(new: str | os.PathLike, out: str | os.PathLike) -> Path | None:
    """Put the complete directory ``new`` at ``out``; return where the previous ``out`` now is (None if none).

    With an exchange rename ``out`` is at every instant either the old or the new complete directory.
    Without one (a filesystem that refuses it), ``out`` is moved aside to ``.NAME.old-*`` and ``new``
    renamed in; :func:`recover_swap` puts the old one back if a kill lands between the two renames.
    The caller deletes the returned directory (it holds only files it knows).
    """
    new, out = Path(new), Path(out)
    hooks.fire("swap_before", path=out)
    if not out.exists():
        os.rename(new, out)
        fsync_dir(out.parent)
        hooks.fire("swap_after", path=out)
        return None
    if exchange(new, out):
        fsync_dir(out.parent)
        hooks.fire("swap_after", path=out)
        return new
    old = temp_name(out, "old")
    os.rename(out, old)
    hooks.fire("swap_between", path=out)
    os.rename(new, out)
    fsync_dir(out.parent)
    hooks.fire("swap_after", path=out)
    return old


def replace_dir(new: str | os.PathLike, out: str | os.PathLike, own: Callable[[str], bool]) -> None:
    """Publish the complete directory ``new`` as ``out`` (see :func:`swap_dirs`), keeping foreign files.

    Entries of the old ``out`` that ``own(name)`` does not claim (a user's notes, files of other tools)
    and that ``new`` does not hold are hard-linked (else copied) into ``new`` before the swap, so the
    old directory, deleted afterwards, holds nothing that exists only there.
    """
    new, out = Path(new), Path(out)
    if out.is_dir():
        for q in out.iterdir():
            if own(q.name) or (new / q.name).exists() or q.name.startswith(f".{out.name}."):
                continue
            if q.is_dir() and not q.is_symlink():
                shutil.copytree(q, new / q.name, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(q, new / q.name)
    old = swap_dirs(new, out)
    if old is not None:
        remove_dir(old)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def recover_swap(out: str | os.PathLike) -> None:
    """After a kill between the two renames of a non-exchange :func:`swap_dirs`: put the old ``out`` back."""
    out = Path(out)
    if out.exists():
        return
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        os.rename(olds[-1], out)


def remove_dir(path: str | os.PathLike) -> None:
    """Remove a directory of gptlab's own files: renamed to a hidden name first, so a kill mid-way
    leaves a leftover that :func:`remove_leftovers` recognises rather than a half-deleted original."""
    p = Path(path)
    if not p.exists():
        return
    gone = temp_name(p, "del") if not p.name.startswith(".") else p
    if gone != p:
        os.rename(p, gone)
    shutil.rmtree(gone, ignore_errors=True)


# --------------------------------------------------------------------------- --out checks


def guard_out_dir(path: str | os.PathLike, flag: str, is_ours: Callable[[Path], bool], what: str) -> Path:
    """Refuse an ``--out`` that is ``/``, the home directory, a file, or a non-empty directory that
    ``is_ours`` does not recognise as a gptlab ``what``. Returns the path (expanded)."""
    p = Path(path).expanduser()
    real = p.resolve()
    if real == Path(real.anchor) or real == Path.home().resolve():
        raise GptlabError(f"{flag} {path}: refusing to use {'the root' if real == Path(real.anchor) else 'your home'} "
                          f"directory; choose a directory of its own, e.g. {flag} {Path(path) / 'out'}")
    if p.exists() and not p.is_dir():
        raise GptlabError(f"{flag} {path}: exists and is not a directory")
    if p.is_dir():
        visible = [q.name for q in p.iterdir()]
        if visible and not is_ours(p):
            shown = ", ".join(sorted(visible)[:4]) + (" ..." if len(visible) > 4 else "")
            raise GptlabError(f"{flag} {path}: directory is not empty and is not a gptlab {what} (it holds {shown}); "
                              f"choose a new or empty directory")
    return p


def same_or_inside(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when path ``a`` is ``b`` or lies inside it (after resolving links)."""
    ra, rb = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    return ra == rb or rb in ra.parents


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, Any]:
    """All tensors of a ``.safetensors`` file; a damaged or truncated file is one error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptlabError(f"{path}: cannot read the weights ({reason}); the file is damaged or incomplete: "
                          "restore it from another checkpoint or export it again") from None
