"""Launch helpers shared by the kernel files: block sizes, interpreter detection, ``wrap_triton``.

Not an op. Every host function in this package launches its kernels as
``wrap_triton(kernel)[grid](...)`` so that, inside a ``torch.library.triton_op``,
``torch.compile`` sees the kernel calls; outside tracing the wrapper launches the kernel
directly.
"""
import os

import torch
import triton

__all__ = [
    "wrap_triton",
    "is_interpreted",
    "interpreter_requested",
    "block_dim",
    "rows_per_block",
    "row_launch_shape",
]


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` function) runs in Triton's CPU interpreter.

    Triton decides this when the kernel is decorated (at import), from ``TRITON_INTERPRET``.
    """
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old triton
        return False
    return isinstance(kernel, InterpretedFunction)


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)`` where that exists and applies, else ``kernel``.

    Interpreted kernels (``TRITON_INTERPRET=1``) and torch builds without ``wrap_triton``
    (before 2.6) get the kernel itself: it launches the same way, only not traceably.
    """
    wrap = getattr(torch.library, "wrap_triton", None)
    if wrap is None or is_interpreted(kernel):
        return kernel
    return wrap(kernel)


def block_dim(dim: int) -> int:
    """Power-of-two tile width covering a patch row of ``dim`` values (``tl.arange`` needs it)."""
    return triton.next_power_of_2(int(dim))


def rows_per_block(block_width: int) -> int:
    """Rows per program for a row-wise kernel whose tile is ``block_width`` wide.

    Depends on the row width only (not on the number of rows) so that ``torch.compile``
    with dynamic batch sizes does not specialise on it. On a GPU a tile holds about 2K
    elements (several programs per SM even for small batches); in the interpreter, where
    each program costs Python overhead, about 16K.
    """
    target = 16384 if interpreter_requested() else 2048
    return max(1, target // block_width)


def row_launch_shape(n_rows: int, dim: int) -> tuple[int, int, int]:
    """``(BLOCK_DIM, BLOCK_ROWS, number of programs)`` for a row-wise kernel over ``(n_rows, dim)``."""
    width = block_dim(dim)
    block_rows = rows_per_block(width)
    return width, block_rows, triton.cdiv(n_rows, block_rows)

