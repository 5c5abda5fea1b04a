"""Where the Triton kernels can run: the one rule, without importing triton.

The kernels run on CUDA devices, and on the CPU only in Triton's interpreter, which
``TRITON_INTERPRET=1`` turns on; it must be set before triton is first imported (triton
decides when it decorates a kernel). :func:`triton_can_run` is that rule for a device and
:func:`require_triton` refuses a device with one message; every layer asks them (through
:mod:`rgkern.core.ops` above the kernels).
"""
import os

import torch

from rgkern.core.errors import TritonUnavailableError

__all__ = ["interpreter_requested", "triton_can_run", "require_triton"]


def interpreter_requested() -> bool:
    """True when ``TRITON_INTERPRET`` asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_can_run(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA, or the CPU under the interpreter."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and interpreter_requested())


def require_triton(device: torch.device | str, what: str = "the Triton kernels") -> None:
    """Raise :class:`~rgkern.core.errors.TritonUnavailableError` naming ``what`` unless
    :func:`triton_can_run` on ``device``."""
    if not triton_can_run(device):
        raise TritonUnavailableError(
            f"{what} needs a CUDA device for the Triton kernels, got {torch.device(device)}; move the model and "
            "data to a GPU, use backend 'auto' or 'torch', or set TRITON_INTERPRET=1 before importing triton "
            "(Triton's CPU interpreter, slow)"
        )
