"""Tiles of the fused coupling kernels: the configurations, their narrowing, and timing them on a GPU."""
import os
from typing import Callable, NamedTuple

import torch
import triton

from rgkern.core.cache import BoundedCache

from .. import launch as _launch
from ..launch import interpreter_requested

# The narrowest tile over any width (``tl.dot`` needs every tile dimension >= 16).
MIN_TILE = 16


class TileConfig(NamedTuple):
    """Block sizes and launch options of the half-step kernels: rows per program, tile widths
    over D and H, warps, software-pipeline stages."""

    block_rows: int
    block_d: int
    block_h: int
    num_warps: int
    num_stages: int = 3
    #: The narrowest hidden tile this configuration may be narrowed to (:func:`tile_candidates`):
    #: a launch whose hidden width would need a narrower one does not use it.
    min_block_h: int = MIN_TILE
    #: Whether launches whose weights are wider than the compute dtype (float32 weights under
    #: autocast, cast as they are loaded) may use this configuration.
    wide_weights: bool = True


#: The configurations each fused kernel is tuned over on a CUDA device (:func:`choose_tiles`),
#: by compute dtype; the first is the default, used wherever nothing is timed. Rows per program
#: 32 or 16 (more programs for the few rows of the top levels and small batches); tiles 64 wide
#: over D and H (32 over H in bfloat16 and float16), narrowed to the widths (``tl.dot`` needs
#: every tile dimension >= 16). The defaults came from a sweep of register use on one half-step
#: (D = 48, H = 70) and from the compiles; none of these is timed (no GPU was available).
TUNING_CONFIGS = {
    # Rows per program, tiles over D and H, warps, stages. Compiled for sm_80 and sm_90 under
    # Triton 3.6 and 3.9 (bench/RESULTS.md): 32 rows on 4 warps spilled in bfloat16 under 3.6
    # once the first half-step gathered from the image, so bfloat16 takes 8 warps as float32
    # does; bfloat16 with 64-wide hidden tiles spilled up to 24 B under 3.6, 32-wide ones none;
    # 64 rows on 8 warps spilled 40-880 B on sm_80 under both, so the set has no 64-row one.
    # float32 on 16 rows spilled 8-16 B on sm_80 under 3.9 on 4 warps (14 of 96 with 32-wide
    # hidden tiles), none on 8 warps (at most 200 registers under either Triton).
    torch.float32: (TileConfig(32, 64, 64, 8, 3), TileConfig(16, 64, 64, 8, 3)),
    # bfloat16 on 32 rows with 16-wide hidden tiles (hidden widths up to 16) spilled 24-32 B in
    # the forward kernels that gather from the image under 3.6 (255 registers; 4 or 16 warps,
    # 1 or 2 stages, or a 32-wide tile over 8 hidden columns spilled too), so such launches
    # take the 16-row configuration (164-220 registers, no spills under either Triton). With
    # float32 weights under autocast the 32-row one spilled 4-28 B (forward at hidden 24 on
    # sm_90, backward at 70 gathering from the image, Triton 3.9); the 16-row one spilled none.
    torch.bfloat16: (TileConfig(32, 64, 32, 8, 3, min_block_h=32, wide_weights=False), TileConfig(16, 64, 32, 4, 3)),
    torch.float16: (TileConfig(32, 64, 32, 8, 3, min_block_h=32, wide_weights=False), TileConfig(16, 64, 32, 4, 3)),
    # float64 multiplies by broadcast-and-sum (for the exactness tests, not for speed): one config.
    torch.float64: (TileConfig(16, 16, 16, 4, 3),),
}
#: The default GPU configuration per compute dtype (the first of :data:`TUNING_CONFIGS`).
GPU_TILES = {dtype: configs[0] for dtype, configs in TUNING_CONFIGS.items()}
# Registers a thread may use (PTX .maxnreg). Without it ptxas picked 64 to 128 for some fused
# specialisations and spilled 4 to 36 B (scripts/compile_kernels.py, 22 of 360 in float32 and
# bfloat16); with it they use what they need (e.g. 92) and none spills. Not timed on a GPU:
# fewer resident programs per SM is the price where a kernel needs many registers.
MAX_REGISTERS = 255
# Under the interpreter each program and loop iteration costs Python time: one tile per width.
INTERPRETER_MAX_TILE = 128
#: Environment variable: "0" turns the timing off, so that every process uses the defaults
#: (and so the same floating-point summation order: bit-identical runs on one GPU model).
AUTOTUNE_ENV = "RGKERN_AUTOTUNE"
# Rows per step of the weight-gradient kernel's loop (the K of its ``g^T @ a`` products) at
# most: at 64 its float32 IEEE specialisations spilled 284-304 B on sm_80 and sm_90 (the FMA
# path of tl.dot holds both operand tiles in registers).
WEIGHT_GRAD_MAX_ROWS = 32


def tile_candidates(n_rows: int, dim: int, hidden: int, dtype: torch.dtype, weight_dtype: torch.dtype | None = None) -> tuple:
    """The :class:`TileConfig`\\ s a launch may use, the default first.

    On a GPU :data:`TUNING_CONFIGS` of the compute ``dtype``, narrowed to the widths ``dim`` and
    ``hidden`` (equal ones once; those whose hidden tile would fall below their
    ``min_block_h`` left out, and where the weights' ``weight_dtype`` is wider than ``dtype``
    those not made for ``wide_weights``); never dependent on ``n_rows`` (``torch.compile`` with dynamic
    batch sizes must not specialise on it). Under the interpreter (outside
    :func:`~rgkern.kernels.launch.gpu_block_sizes`) one configuration, as wide as the data
    allows up to :data:`INTERPRETER_MAX_TILE`.
    """
    def width(w, cap):
        return max(MIN_TILE, min(cap, triton.next_power_of_2(int(w))))

    if interpreter_requested() and _launch._gpu_block_requests == 0:
        cap = INTERPRETER_MAX_TILE
        return (TileConfig(width(n_rows, cap), width(dim, cap), width(hidden, cap), 4),)
    narrowed = (t._replace(block_d=width(dim, t.block_d), block_h=width(hidden, t.block_h)) for t in TUNING_CONFIGS[dtype])
    wide = weight_dtype is not None and weight_dtype.itemsize > dtype.itemsize
    return tuple(dict.fromkeys(t for t in narrowed if t.block_h >= t.min_block_h and (t.wide_weights or not wide)))


def tile_config(n_rows: int, dim: int, hidden: int, dtype: torch.dtype, weight_dtype: torch.dtype | None = None) -> TileConfig:
    """The default block sizes for ``n_rows`` rows of width ``dim``, hidden width ``hidden``,
    compute ``dtype`` (weights in ``weight_dtype``): the first of :func:`tile_candidates`."""
    return tile_candidates(n_rows, dim, hidden, dtype, weight_dtype)[0]


# Size of the cache (rgkern.core.cache) of the tiles timed fastest, per kernel, dtype, widths and device.
TUNED_CACHE_SIZE = 256
_TUNED = BoundedCache(TUNED_CACHE_SIZE)  # (kernel, dtype, widths, device) -> the TileConfig timed fastest


def _is_fake(tensor: torch.Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - very old torch
        return False
    return is_fake(tensor)


def tuning_enabled(tensor: torch.Tensor) -> bool:
    """Whether a launch on ``tensor``'s device may time the configurations: a real CUDA tensor,
    not while ``torch.compile`` traces, a CUDA graph is captured or launches are recorded, and
    not under the interpreter or with ``RGKERN_AUTOTUNE=0``."""
    if interpreter_requested() or os.environ.get(AUTOTUNE_ENV, "1") == "0" or _launch.recording():
        return False
    if not tensor.is_cuda or torch.compiler.is_compiling() or _is_fake(tensor):
        return False
    return not torch.cuda.is_current_stream_capturing()


def choose_tiles(key: tuple, candidates: tuple, trial: Callable[[TileConfig], object], tensor: torch.Tensor) -> TileConfig:
    """The configuration of the launches ``key`` names (kernel, dtype, widths; not the rows).

    Where :func:`tuning_enabled`, the first launch of a key times every candidate with
    ``trial(tiles)`` (a launch that writes only scratch buffers: the timing runs each several
    times, and some kernels accumulate into their outputs) and keeps the fastest for the
    process. Elsewhere the one kept earlier, or the default (the first candidate).
    """
    if len(candidates) == 1:
        return candidates[0]
    key = (*key, str(tensor.device))
    choice = _TUNED.get(key)
    if choice is None and tuning_enabled(tensor):
        from triton.testing import do_bench

        times = [do_bench(lambda tiles=tiles: trial(tiles), warmup=5, rep=25) for tiles in candidates]
        choice = _TUNED[key] = candidates[times.index(min(times))]
    return candidates[0] if choice is None else choice


def launch_with_candidates(launch: Callable[[TileConfig], object], tiles: TileConfig, candidates: tuple) -> None:
    """``launch(tiles)``; while launches are recorded (:func:`~rgkern.kernels.launch.record_launches`)
    the other candidates are recorded too, not run: the ahead-of-time compile covers them all."""
    if _launch.recording():
        with _launch.record_only():
            for other in candidates:
                if other != tiles:
                    launch(other)
    launch(tiles)


def dot_tf32(compute_dtype: torch.dtype) -> bool:
    return compute_dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"


def dot_upcast(compute_dtype: torch.dtype) -> bool:
    """Half-precision dots as float32 under the interpreter, except while launches are being
    recorded for the ahead-of-time compile, which must compile what a GPU runs."""
    return compute_dtype in (torch.bfloat16, torch.float16) and interpreter_requested() and not _launch.recording()

