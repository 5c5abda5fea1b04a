"""``torch.compile`` for rgkern's passes: one helper shared by training and sampling."""
from __future__ import annotations

import os
from typing import Callable

import torch

from ..core.errors import InputError

__all__ = ["compile_function", "COMPILE_BACKEND_ENV"]

#: Environment variable naming the ``torch.compile`` backend of :func:`compile_function`
#: (default ``"inductor"``; ``"aot_eager"`` traces forward and backward without code
#: generation, which the CPU tests use to stay fast).
COMPILE_BACKEND_ENV = "RGKERN_COMPILE_BACKEND"


def compile_function(fn: Callable, device: torch.device | str, cuda_graphs: bool = False,
                     backend: str | None = None) -> Callable:
    """``torch.compile(fn, fullgraph=True)``, with CUDA graphs when ``cuda_graphs``.

    ``cuda_graphs`` selects ``mode="reduce-overhead"`` (inductor captures the compiled code
    in CUDA graphs and replays them: no per-kernel launch cost for small batches); it needs a
    CUDA ``device`` and raises ``ValueError`` otherwise. ``backend``: a torch.compile
    backend, default ``$RGKERN_COMPILE_BACKEND`` or ``"inductor"``. ``fullgraph=True`` makes
    a graph break an error rather than a silent slow-down; the model's forward and inverse
    have no host synchronisation (its input-finite check is skipped while compiling).
    """
    device = torch.device(device)
    if cuda_graphs and device.type != "cuda":
        raise InputError(f"CUDA graphs need a CUDA device, got device {str(device)!r}; drop --cuda-graphs (--compile works on the CPU)")
    backend = backend or os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
    if cuda_graphs and backend != "inductor":
        raise InputError(f"CUDA graphs (mode='reduce-overhead') need the inductor backend, got backend {backend!r}")
    return torch.compile(fn, fullgraph=True, backend=backend, mode="reduce-overhead" if cuda_graphs else None)
