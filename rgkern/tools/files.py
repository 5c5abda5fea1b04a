"""Writing files so that a failure or a kill leaves the previous file as it was; run-folder locks.

* :func:`atomic_write` writes through a temporary file beside the target and renames it into
  place; :func:`atomic_write_many` does the same for several files that belong together
  (all written before the first rename). Every file the command line writes goes through
  one of them: checkpoints, ``model.json``, ``history.json``, pictures, ``inpaint.json``.
  A temporary file is named ``.NAME.HOST-PID-TOKEN.tmp`` (``HOST`` a short hash of the host
  name), is created with the mode a plain ``open`` would give (``0666`` less the umask),
  is flushed to disk before the rename, and the folder is flushed after it.
* :func:`remove_orphans` removes the temporary files of processes of this host that no
  longer run (a run killed while writing); :func:`atomic_write` does it for its own target
  before writing, the trainer for its whole run folder when it starts.
* :func:`run_lock` holds an advisory lock (``fcntl.flock``) on ``FOLDER/.rgkern.lock`` for
  as long as a command writes into a run folder: a second process asking for the same
  folder is refused with :class:`RunFolderBusyError`, naming the holder (pid, host,
  command, start time). The kernel releases the lock when its holder exits, however it
  exits, so a lock file left by a killed process is free and is taken over (and reported
  as stale); a normal release removes the file.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..core.errors import InputError, file_error

__all__ = [
    "atomic_write",
    "atomic_write_many",
    "remove_orphans",
    "run_lock",
    "RunLock",
    "RunFolderBusyError",
    "LOCK_NAME",
    "process_alive",
    "describe_holder",
    "create_temporary",
]

LOCK_NAME = ".rgkern.lock"

# errno values that mean "this place cannot take the file": reported with the path.
_WRITE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
# .NAME.HOST-PID-TOKEN.tmp (and .probe for the write checks)
_TEMP = re.compile(r"^\.(?P<target>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.(?:tmp|probe)$")
# What tempfile.mkstemp made in rgkern before the names above carried the process id.
_LEGACY_TEMP = re.compile(r"^\.(?:.+\.[a-z0-9_]{8}\.(?:tmp|probe)|write-test\.[a-z0-9_]{8})$")


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh temporary path beside ``path``: ``.NAME.HOST-PID-TOKEN.tmp`` (not created)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def create_temporary(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """Create an empty temporary file beside ``path`` (mode ``0666`` less the umask); returns its path."""
    for _ in range(100):
        tmp = temporary_name(path)
        if suffix != ".tmp":
            tmp = tmp.with_name(tmp.name[: -len(".tmp")] + suffix)
        try:
            # O_EXCL (with O_CREAT) never follows a link: a planted one is a name taken, not a target.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {str(path)!r}")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (``os.kill(pid, 0)``)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _orphan(name: str, legacy: bool) -> bool:
    match = _TEMP.match(name)
    if match is not None:
        return match["host"] == _HOST and not process_alive(int(match["pid"]))
    return legacy and _LEGACY_TEMP.match(name) is not None


def remove_orphans(folder: str | os.PathLike, target: str | None = None, legacy: bool = False) -> list:
    """Remove temporary files that processes of this host left in ``folder`` when they died.

    ``target``: only those of that file name (``None``: of every name). ``legacy``: also the
    ``mkstemp`` names older versions used (``.NAME.XXXXXXXX.tmp``); only safe where no other
    process can be writing, i.e. under :func:`run_lock`. Returns ``[(path, bytes), ...]`` of
    what was removed; files that vanish or cannot be removed meanwhile are skipped.
    """
    folder = Path(folder)
    prefix = "." if target is None else f".{target}."
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix) or not _orphan(entry.name, legacy):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            size = entry.stat(follow_symlinks=False).st_size
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append((Path(entry.path), size))
    return removed


def _os_errno(error: BaseException):
    """The errno of an OSError, or of an I/O error a native writer reports as text.

    safetensors (Rust) raises ``SafetensorError('... No space left on device (os error 28)')``
    rather than ``OSError``; the code in its message is the errno.
    """
    if isinstance(error, OSError):
        return error.errno
    match = re.search(r"\(os error (\d+)\)", str(error))
    return int(match.group(1)) if match else None


def _fsync_file(path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_folder(folder) -> None:
    """Make a rename in ``folder`` durable (where the OS lets a folder be opened and synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _reported(error: BaseException, path: Path):
    """``error`` as the :class:`InputFileError` to raise for ``path``, or None to re-raise it."""
    code = _os_errno(error)
    if code not in _WRITE_ERRORS:
        return None
    kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
    return file_error(code, f"cannot write {str(path)!r}: {_WRITE_ERRORS[code]} ({type(error).__name__}: {error}); {kept}")


def atomic_write_many(items: Iterable[tuple[str | os.PathLike, Callable[[str], object]]]) -> list:
    """Write several files as :func:`atomic_write` does, all before the first is replaced.

    ``items``: ``[(path, write), ...]``; ``write(tmp)`` writes one file's content to the path
    ``tmp``. Every temporary file is written and flushed first; only then are they renamed
    into place, in the order given (put the file that counts first: a kill between two
    renames leaves the later ones one version behind, and nothing half-written). On any
    failure before the renames every temporary file is removed and every target is left
    as it was. Errors as for :func:`atomic_write`. Returns the paths written.
    """
    items = [(Path(path), write) for path, write in items]
    temporaries: list = []
    current = None
    try:
        for path, write in items:
            current = path
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_orphans(path.parent, path.name)
            tmp = create_temporary(path)
            temporaries.append(tmp)
            mode = os.stat(tmp).st_mode & 0o777  # 0666 less the umask, as created
            write(str(tmp))
            if os.stat(tmp).st_mode & 0o777 != mode:  # writers that recreate the file (safetensors: 0600)
                os.chmod(tmp, mode)
            _fsync_file(tmp)
        for (path, _), tmp in zip(items, temporaries):
            current = path
            os.replace(tmp, path)
        for folder in {path.parent for path, _ in items}:
            _fsync_folder(folder)
    except BaseException as error:
        for tmp in temporaries:
            _unlink_quietly(tmp)
        reported = None if current is None else _reported(error, current)
        if reported is None:
            raise
        raise reported from error
    return [path for path, _ in items]


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Write ``path`` through ``write(tmp)`` into a temporary file beside it, then rename it.

    On any failure the temporary file is removed and ``path`` is left as it was. A full
    disk, a read-only file system or a folder without write permission (``ENOSPC``,
    ``EDQUOT``, ``EROFS``, ``EACCES``, ``EPERM``, also when reported by safetensors as
    text) raise ``OSError`` with that errno (``PermissionError`` for the permission cases)
    and a message naming ``path`` and saying the previous file is unchanged. Temporary
    files of ``path`` that dead processes left behind are removed first.
    """
    atomic_write_many([(path, write)])


# ----------------------------------------------------------------------------- run-folder lock
class RunFolderBusyError(InputError):
    """Another process holds the lock of the run folder (``holder``: its lock record, a dict)."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


def describe_holder(record: dict) -> str:
    """``process PID on host H (COMMAND, since TIME)`` from a lock record."""
    if not record:
        return "a process whose lock record is not written (yet, or the disk is full)"
    started = record.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"process {record.get('pid', '?')} on host {record.get('host', '?')} ({record.get('command', '?')}, since {when})"


def _read_record(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        record = json.loads(data.decode()) if data.strip() else {}
        return record if isinstance(record, dict) else {"unreadable": True}
    except (OSError, ValueError, UnicodeDecodeError):
        return {"unreadable": True}


def _command_line() -> str:
    """This process's command line as a person typed it (``rgkern train ...`` for ``python -m rgkern``)."""
    argv = list(sys.argv) or ["python"]
    if argv[0].endswith(("__main__.py", "rgkern")):
        argv[0] = "rgkern"
    text = " ".join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


_HELD: dict = {}  # realpath of a folder -> [RunLock, depth]: re-entrant within a process


class RunLock:
    """The lock of one run folder; use :func:`run_lock`.

    Attributes after :meth:`acquire`: ``path`` (the lock file), ``stale`` (the record of a
    previous holder that ended without releasing it, e.g. killed; ``None`` otherwise).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd = None
        self.stale = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not a POSIX system: the record alone, as on file systems without flock
            fcntl = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise file_error(
                error.errno, f"output folder {str(self.folder)!r} is not writable ({error.strerror or error}); choose another one"
            ) from None
        for _ in range(50):
            try:
                # O_NOFOLLOW: a link planted at the lock's path is refused, never written through.
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o666)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise file_error(
                        error.errno,
                        f"run folder {str(self.folder)!r}: its lock file {str(self.path)!r} is a symbolic link; "
                        "remove it (rgkern never writes through a link there)",
                    ) from None
                raise file_error(
                    error.errno,
                    f"output folder {str(self.folder)!r} is not writable: cannot create its lock file "
                    f"{str(self.path)!r} ({error.strerror or error}); choose another one",
                ) from None
            try:
                if fcntl is None:
                    raise OSError(errno.ENOSYS, "no fcntl")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = _read_record(fd)
                os.close(fd)
                raise RunFolderBusyError(
                    f"run folder {str(self.folder)!r} is in use by {describe_holder(record)}: it holds the lock "
                    f"{str(self.path)!r}; wait for it to end, stop it, or choose another folder",
                    record,
                ) from None
            except OSError as error:  # a file system without flock: fall back on the record alone
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
                    os.close(fd)
                    raise
                record = _read_record(fd)
                pid = record.get("pid")
                if record.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and process_alive(pid):
                    os.close(fd)
                    raise RunFolderBusyError(
                        f"run folder {str(self.folder)!r} is in use by {describe_holder(record)} (its lock file "
                        f"{str(self.path)!r}); wait for it to end, stop it, or choose another folder",
                        record,
                    ) from None
            # The file may have been removed (and another created) between open and flock by a
            # holder releasing it: only a lock on the file at the path counts.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read_record(fd)
            self.stale = previous or None
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": _command_line(),
                "started": round(time.time(), 1),
            }
            try:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, (json.dumps(record) + "\n").encode())
            except OSError:  # a full disk: the lock holds without its record
                pass
            self.fd = fd
            return self
        raise RunFolderBusyError(f"run folder {str(self.folder)!r}: its lock file {str(self.path)!r} keeps changing; try again")

    def release(self) -> None:
        if self.fd is None:
            return
        # Remove the file while still holding the lock, then let go: a process that opened
        # the old file meanwhile sees that it is no longer at the path and starts over.
        _unlink_quietly(self.path)
        os.close(self.fd)
        self.fd = None


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[RunLock]:
    """Hold the lock of run folder ``folder`` (created if needed) for the ``with`` block.

    Yields the :class:`RunLock`. Raises :class:`RunFolderBusyError` (an ``InputError``)
    naming the other process when one holds it, and ``OSError`` (``PermissionError`` for
    permissions) naming the folder when the lock file cannot be created. Re-entrant within
    a process: a nested ``run_lock`` of the same folder yields the same lock.
    """
    key = os.path.realpath(folder)
    held = _HELD.get(key)
    if held is not None:
        held[1] += 1
        try:
            yield held[0]
        finally:
            held[1] -= 1
        return
    lock = RunLock(folder).acquire()
    _HELD[key] = [lock, 1]
    try:
        yield lock
    finally:
        del _HELD[key]
        lock.release()
