"""Writing files safely: ``write_atomically``, ``write_folder_atomically`` and ``FileLock``; and where
the package caches what it builds (``default_cache_dir``).

The one home for every write that must never be seen half-done, and for the advisory lock that keeps two
processes from writing the same folder (an activation cache, an export) at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def default_cache_dir() -> Path:
    """``$GEMMA_SCOPE_PZ_CACHE`` or ``~/.cache/gemma_scope_pz``: the one root of every cache."""
    return Path(os.environ.get("GEMMA_SCOPE_PZ_CACHE", Path.home() / ".cache" / "gemma_scope_pz"))


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _no_space_error(exc: OSError, path: Path) -> OSError:
    """Rewords ENOSPC/EDQUOT as a one-line error naming the file; other errors pass through."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(exc.errno, f"no space left on device while writing {path}")
    return exc


def write_atomically(path: str | os.PathLike, data: str | bytes) -> Path:
    """Writes ``data`` to a temporary file next to ``path``, then renames it into place.

    The file gets the usual permissions (``0o666`` less the umask, not ``mkstemp``'s ``0o600``); on any
    error (a full disk included: ``OSError`` "no space left on device while writing PATH") the temporary
    file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        mode = "w" if isinstance(data, str) else "wb"
        kwargs = {"encoding": "utf-8"} if isinstance(data, str) else {}
        with os.fdopen(fd, mode, **kwargs) as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _no_space_error(exc, path) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_folder_atomically(
    folder: str | os.PathLike, fill: Callable[[Path], None], *, overwrite: bool = True
) -> Path:
    """Builds a folder in a temporary sibling with ``fill(tmp_dir)``, then swaps it into place.

    Readers see either the old folder or the complete new one, never a mix. With ``overwrite=False`` an
    existing ``folder`` is an error. On any error the temporary folder is removed and ``folder`` is left
    as it was.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists (pass overwrite=True to replace it)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    old = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        fill(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():
            os.replace(old, folder)
        raise _no_space_error(exc, folder) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not folder.exists():
            os.replace(old, folder)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


class LockHeld(RuntimeError):
    """Another process holds the lock."""


class FileLock:
    """An exclusive advisory lock on ``path`` (``fcntl.flock``), holding the owner's pid in the file.

    ``with FileLock(folder / ".lock", what="activation cache"):`` raises ``LockHeld`` at once, naming the
    holder's pid, when another process has it. The lock dies with its process, so a crash never leaves a
    folder locked for good.

    Attributes:
      path: The lock file.
      what: What the lock protects, for the error message.
    """

    def __init__(self, path: str | os.PathLike, what: str = "folder"):
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockHeld(
                f"{self.what} {self.path.parent} is in use by another process (pid {holder}); "
                f"wait for it to finish or use another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def locked(path: str | os.PathLike, what: str = "folder") -> Iterator[FileLock]:
    """``with locked(path, what):`` — shorthand for ``FileLock``."""
    lock = FileLock(path, what)
    with lock:
        yield lock
