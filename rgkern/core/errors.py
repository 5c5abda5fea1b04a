"""The exceptions rgkern raises for input a user can fix.

Every check of an argument, option, setting or file a user gives raises an
:class:`InputError` (a ``ValueError``), an :class:`InputTypeError` (also a ``TypeError``,
for a wrong type or dtype) or, for a file or folder that cannot be read or written, an
:class:`InputFileError` (also the matching ``OSError`` subclass, with its ``errno``; see
:func:`file_error`). The messages name the value received and what was expected.

The command line prints exactly these as one line ``rgkern <command>: error: ...`` and
exits with code 2; any other exception is a bug, or a problem rgkern did not diagnose, and
keeps its traceback. Subclasses elsewhere include ``CheckpointError``
(:mod:`rgkern.tools.checkpoint`), ``DistributedSetupError`` (:mod:`rgkern.tools.distributed`),
``DataNotFoundError`` (:mod:`rgkern.data`). A training run that diverges (a NaN or infinite
loss) is not an input error: it raises ``DivergenceError`` (:mod:`rgkern.tools.trainer`), a
``RuntimeError``, which the command line reports on its own line and exit code.

This module imports nothing from rgkern, so every layer may use it (the data loaders too).
"""
__all__ = [
    "InputError",
    "InputTypeError",
    "InputFileError",
    "InputFileNotFoundError",
    "InputFileExistsError",
    "InputPermissionError",
    "InputIsADirectoryError",
    "InputNotADirectoryError",
    "file_error",
    "TritonUnavailableError",
]


class InputError(ValueError):
    """An error the user can fix: a bad argument, option, setting or file, named in the message."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type or dtype (an :class:`InputError` that is also a ``TypeError``)."""


# OSError comes first in the bases below so that its constructor and str() apply:
# InputFileError(errno.ENOSPC, "cannot write ...") reads "[Errno 28] cannot write ...".
class InputFileError(OSError, InputError):
    """A file or folder the user named cannot be read or written (also an ``OSError``, ``errno`` kept)."""


class InputFileNotFoundError(FileNotFoundError, InputFileError):
    """A file or folder the user named does not exist (also a ``FileNotFoundError``)."""


class InputFileExistsError(FileExistsError, InputFileError):
    """A file the user's command would replace is already there (also a ``FileExistsError``)."""


class InputPermissionError(PermissionError, InputFileError):
    """A file or folder the user named may not be written or read (also a ``PermissionError``)."""


class InputIsADirectoryError(IsADirectoryError, InputFileError):
    """A folder where the user's command needs a file (also an ``IsADirectoryError``)."""


class InputNotADirectoryError(NotADirectoryError, InputFileError):
    """A file where the user's command needs a folder (also a ``NotADirectoryError``)."""


_BY_OS_ERROR = {
    FileNotFoundError: InputFileNotFoundError,
    FileExistsError: InputFileExistsError,
    PermissionError: InputPermissionError,
    IsADirectoryError: InputIsADirectoryError,
    NotADirectoryError: InputNotADirectoryError,
}


def file_error(code: int | None, message: str) -> InputFileError:
    """``OSError(code, message)`` as an :class:`InputFileError` of the same ``OSError`` subclass.

    ``OSError(errno.EACCES, ...)`` gives a ``PermissionError``; ``file_error(errno.EACCES,
    ...)`` gives an :class:`InputPermissionError`, which is one too. Codes ``OSError``
    keeps as a plain ``OSError`` (``ENOSPC``, ``EROFS``, ``None``, ...) give
    :class:`InputFileError`.
    """
    return _BY_OS_ERROR.get(type(OSError(code, message)), InputFileError)(code, message)


class TritonUnavailableError(InputError, RuntimeError):
    """The Triton kernels cannot run on the device given (a CPU without Triton's interpreter).

    An :class:`InputError` (the user can fix it: a GPU, another backend, or the interpreter)
    that is also a ``RuntimeError``.
    """
