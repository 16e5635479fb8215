"""Files of a run folder, written so that nothing is ever written outside it and no file is ever half written.

Every file is written to a fresh temporary file created in its folder (never an existing name opened for
writing), flushed to disk, then renamed over its name: a crash or a full disk leaves the previous file as it
was, and a symlink planted at the name is replaced, not followed. A folder on the way that is a symlink leading
out of the run folder is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from ..errors import LoraclError


class WriteError(LoraclError):
    """A file of a run that could not be written (full disk, read-only folder, a path leading out of the run)."""


def check_inside(root: Path, path: Path) -> None:
    """Refuse `path` when its folder, followed through any symlink, is not inside `root`."""
    root_r, folder = Path(root).resolve(), Path(path).parent.resolve()
    if folder != root_r and root_r not in folder.parents:
        raise WriteError(f"refusing to write {path}: its folder leads out of {root} (a symlink to {folder}); "
                         f"remove the link")


def write_file(path: Path, data: bytes | str, root: Path | None = None) -> None:
    """`data` at `path`, atomically, without following a symlink at `path`; `root`: the folder it must stay in."""
    path = Path(path)
    if root is not None:
        check_inside(root, path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        raise WriteError(f"cannot write {path}: {why}") from None
