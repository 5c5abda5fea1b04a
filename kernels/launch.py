"""Launch helpers shared by the kernel files: block sizes, interpreter detection, the launch itself.

Not an op. Every host function in this package launches its kernels through
:func:`launch_kernel`, which launches ``wrap_triton(kernel)[grid](...)`` so that, inside a
``torch.library.triton_op``, ``torch.compile`` sees the kernel calls (outside tracing the
wrapper launches the kernel directly), and which :func:`record_launches` can watch: that is
how :mod:`.aot` learns which specialisations to compile for a GPU.

Block sizes: a GPU tile holds about ``GPU_TILE_ELEMENTS`` values (a kernel may ask for fewer);
under the interpreter every tile holds about ``INTERPRETER_TILE_ELEMENTS`` (each program costs
Python overhead there), unless :func:`gpu_block_sizes` asks for the GPU's, as the AOT
recording does.
"""
import contextlib
import dataclasses
from typing import Callable, Iterator

import torch
import triton

from .runtime import interpreter_requested

__all__ = [
    "wrap_triton",
    "is_interpreted",
    "interpreter_requested",
    "block_dim",
    "rows_per_block",
    "row_launch_shape",
    "GPU_TILE_ELEMENTS",
    "INTERPRETER_TILE_ELEMENTS",
    "MAX_BLOCK_ROWS",
    "gpu_block_sizes",
    "launch_kernel",
    "record_launches",
    "recording",
    "record_only",
    "watch_launches",
    "Launch",
    "TensorArgument",
]

# Elements of one row-wise tile on a GPU: 16 per thread at 4 warps, several programs per SM
# even for small batches.
GPU_TILE_ELEMENTS = 2048
# Rows of a tile on a GPU at most: its per-row values (int64 row offsets, masks, log-dets) grow
# with the rows, so narrow rows (D = 4) would cost more registers per element; at 512 rows of
# 4 the bfloat16 coupling backward spills 8 bytes on sm_80 (Triton 3.9), at 256 nothing does.
MAX_BLOCK_ROWS = 256
# Elements of a tile under the interpreter, where every program costs Python overhead.
INTERPRETER_TILE_ELEMENTS = 16384

_gpu_block_requests = 0  # > 0 inside gpu_block_sizes()
_recorders: list[dict] = []  # one ordered set of Launch per active record_launches()
_record_only = 0  # > 0 inside record_only()
_watchers: list = []  # the callbacks of the active watch_launches()


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` function) runs in Triton's CPU interpreter.

    Triton decides this when the kernel is decorated (at import), from ``TRITON_INTERPRET``.
    """
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old triton
        return False
    return isinstance(kernel, InterpretedFunction)


def wrap_triton(kernel: object) -> object:
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


def rows_per_block(block_width: int, tile_elements: int = GPU_TILE_ELEMENTS) -> int:
    """Rows per program for a row-wise kernel whose tile is ``block_width`` wide.

    Depends on the row width only (not on the number of rows) so that ``torch.compile``
    with dynamic batch sizes does not specialise on it. On a GPU a tile holds about
    ``tile_elements`` values (a kernel whose values take two registers each, such as the
    float64 coupling, asks for fewer so as not to spill), in at most ``MAX_BLOCK_ROWS`` rows;
    in the interpreter ``INTERPRETER_TILE_ELEMENTS`` whatever is asked, unless inside
    :func:`gpu_block_sizes`.
    """
    if interpreter_requested() and _gpu_block_requests == 0:
        return max(1, INTERPRETER_TILE_ELEMENTS // block_width)
    return max(1, min(MAX_BLOCK_ROWS, tile_elements // block_width))


def row_launch_shape(n_rows: int, dim: int, tile_elements: int = GPU_TILE_ELEMENTS) -> tuple[int, int, int]:
    """``(BLOCK_DIM, BLOCK_ROWS, number of programs)`` for a row-wise kernel over ``(n_rows, dim)``."""
    width = block_dim(dim)
    block_rows = rows_per_block(width, tile_elements)
    return width, block_rows, triton.cdiv(n_rows, block_rows)


@contextlib.contextmanager
def gpu_block_sizes() -> Iterator[None]:
    """Inside this, the launch helpers pick a GPU's block sizes even under the interpreter.

    For recording what a GPU would compile (:mod:`.aot`); the interpreted tests keep the
    larger, faster blocks outside it. Nests; not thread-local.
    """
    global _gpu_block_requests
    _gpu_block_requests += 1
    try:
        yield
    finally:
        _gpu_block_requests -= 1


@dataclasses.dataclass(frozen=True)
class TensorArgument:
    """What a kernel specialises on for a tensor argument: its dtype and 16-byte alignment."""

    dtype: torch.dtype
    aligned: bool  # data_ptr() % 16 == 0


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as :func:`record_launches` keeps it (hashable: equal launches are one).

    ``kernel`` is the ``@triton.jit`` function (an ``InterpretedFunction`` under
    ``TRITON_INTERPRET``); ``args`` the positional arguments with tensors as
    :class:`TensorArgument` and scalars as passed; ``kwargs`` the sorted ``(name, value)``
    pairs of the keyword arguments (constexprs and launch options such as ``num_warps``).
    The grid is left out: it does not change what is compiled.
    """

    kernel: object
    args: tuple
    kwargs: tuple

    @property
    def name(self) -> str:
        return self.kernel.__name__


def _describe(value):
    if not isinstance(value, torch.Tensor):
        return value
    try:
        aligned = value.data_ptr() % 16 == 0
    except RuntimeError:  # a fake tensor while torch.compile traces has no data: taken as a fresh allocation
        aligned = True
    return TensorArgument(value.dtype, aligned)


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Record every :func:`launch_kernel` launch made inside; yields the list, filled on exit.

    The list holds each distinct :class:`Launch` once, in the order first launched. The
    launches still run. Combine with :func:`gpu_block_sizes` to record a GPU's block sizes
    under the interpreter.
    """
    seen: dict = {}
    launches: list = []
    _recorders.append(seen)
    try:
        yield launches
    finally:
        _recorders.remove(seen)
        launches.extend(seen)


def recording() -> bool:
    """True inside :func:`record_launches`."""
    return bool(_recorders)


@contextlib.contextmanager
def record_only() -> Iterator[None]:
    """Inside this, :func:`launch_kernel` records its launches and does not run them.

    For the launches a GPU might make instead of the one made (the other tile configurations a
    kernel is tuned over), so that the ahead-of-time compile covers them. Nests; not thread-local.
    """
    global _record_only
    _record_only += 1
    try:
        yield
    finally:
        _record_only -= 1


@contextlib.contextmanager
def watch_launches(watcher: Callable[[object, tuple, dict], contextlib.AbstractContextManager]) -> Iterator[None]:
    """Inside this, every :func:`launch_kernel` launch runs inside ``watcher(kernel, args, kwargs)``.

    ``watcher`` returns a context manager that is entered just before the launch and left just
    after it (a launch not run, inside :func:`record_only`, enters it too): how
    :mod:`rgkern.tools.profile` counts the Triton launches of a pass. Nests; not thread-local.
    """
    _watchers.append(watcher)
    try:
        yield
    finally:
        _watchers.remove(watcher)


def launch_kernel(kernel: object, grid: tuple[int, ...] | Callable[[dict], tuple[int, ...]], *args: object,
                  **kwargs: object) -> object:
    """``wrap_triton(kernel)[grid](*args, **kwargs)``, recorded when a :func:`record_launches` is
    active (and only recorded inside :func:`record_only`), watched by every :func:`watch_launches`."""
    if _recorders:
        launch = Launch(kernel, tuple(_describe(a) for a in args), tuple(sorted((k, _describe(v)) for k, v in kwargs.items())))
        for seen in _recorders:
            seen.setdefault(launch, None)
    with contextlib.ExitStack() as watched:
        for watcher in _watchers:
            watched.enter_context(watcher(kernel, args, kwargs))
        if _record_only:
            return None
        return wrap_triton(kernel)[grid](*args, **kwargs)
