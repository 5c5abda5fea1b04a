"""Writing files so that a failure leaves the previous file as it was.

:func:`atomic_write` writes through a temporary file beside the target and renames it into
place; checkpoints, history files and sample grids all go through it.
"""
from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

from ..core.errors import file_error

__all__ = ["atomic_write"]

# errno values that mean "this place cannot take the file": reported with the path.
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def _os_errno(error: BaseException):
    """The errno of an OSError, or of an I/O error a native writer reports as text.

    safetensors (Rust) raises ``SafetensorError('... No space left on device (os error 28)')``
    rather than ``OSError``; the code in its message is the errno.
    """
    if isinstance(error, OSError):
        return error.errno
    match = re.search(r"\(os error (\d+)\)", str(error))
    return int(match.group(1)) if match else None


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``write(tmp)`` into a temporary file beside it, then rename it.

    On any failure the temporary file is removed and ``path`` is left as it was. A full
    disk, a read-only file system or a folder without write permission (``ENOSPC``,
    ``EDQUOT``, ``EROFS``, ``EACCES``, ``EPERM``, also when reported by safetensors as
    text) raise ``OSError`` with that errno (``PermissionError`` for the permission cases)
    and a message naming ``path`` and saying the previous file is unchanged.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        code = _os_errno(error)
        if code not in _WRITE_ERRORS:
            raise
        kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
        raise file_error(
            code, f"cannot write {str(path)!r}: {_WRITE_ERRORS[code]} ({type(error).__name__}: {error}); {kept}"
        ) from error
