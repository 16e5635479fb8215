"""One run per output folder: the lock file `.loracl.lock` holds the pid and host of the run writing there."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from ..errors import LoraclError

LOCK = ".loracl.lock"


def _lock_holder(path: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file, or None when it cannot be read (a run killed while writing it)."""
    try:
        pid, host = path.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _busy(out: Path, path: Path, holder: tuple[int, str] | None) -> LoraclError:
    if holder is None:
        return LoraclError(f"{out} is in use by another loracl run (lock file {path}); wait for it, or use another "
                           f"--out")
    where = "" if holder[1] == socket.gethostname() else f" on host {holder[1]}"
    return LoraclError(f"{out} is in use by another loracl run (pid {holder[0]}{where}, lock file {path}); wait for "
                       f"it, or use another --out. If that run is gone, delete the lock file")


@contextlib.contextmanager
def run_lock(out: Path):
    """One run per output folder. The lock is an OS lock (`flock`) on `out/.loracl.lock`, held for the run's life
    and released by the OS when its process dies, so taking it is atomic: of two runs started together exactly
    one gets it. The file also names the holder's pid and host, for the message and for runs of older versions:
    a named live process on this host, or any process on another host, keeps the folder; a dead one's lock is
    taken over. Under torchrun only rank 0 holds it."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LoraclError(f"cannot create the output folder {out}: {e.strerror or e}") from None
    path, me = out / LOCK, f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise LoraclError(f"cannot write the lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _busy(out, path, _lock_holder(path)) from None
        try:  # the file we locked may have been released and removed meanwhile: then lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise LoraclError(f"could not take the lock {path}: another run keeps taking it")
    try:
        holder = _lock_holder(path)
        if holder is not None and (holder[1] != socket.gethostname() or (holder[0] != os.getpid()
                                                                         and _alive(holder[0]))):
            raise _busy(out, path, holder)
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                if path.read_text() == me:
                    path.unlink()
    finally:
        os.close(fd)  # releases the OS lock
