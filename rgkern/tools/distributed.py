"""Multi-process data-parallel training with ``torchrun`` (torch DistributedDataParallel).

``torchrun --nproc_per_node=N -m rgkern train ...`` starts N copies of the command; torchrun
tells each one its place through the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``). :func:`init_distributed` reads it,
starts the process group (``nccl`` on CUDA, ``gloo`` on the CPU) and gives each process its
device (``cuda:LOCAL_RANK`` on CUDA). Without those variables, or with ``WORLD_SIZE=1``,
everything here is a no-op and training runs in one process as before.

How a run is split (:class:`rgkern.tools.trainer.Trainer` does this):

* ``batch_size`` is the **global** batch. Every process computes the same global batch
  indices and the same dequantisation noise (all hold the same generator state, as one
  process would), and keeps the rows ``rank::world_size`` of it (:func:`shard`). That is
  exactly what ``torch.utils.data.DistributedSampler`` gives over the seeded permutation of
  an epoch, cut into per-process batches of ``batch_size / world_size``; so the global
  batches, their order and their noise are those of single-process training.
* Each process's loss is the mean over its shard; DDP averages the gradients over the
  processes, so the update is the one of the global mean, equal to single-process training
  up to float rounding (the all-reduce sums in another order).
* Rank 0 alone evaluates, logs, shows the progress bar and writes checkpoints; the others
  wait at a barrier. All ranks read the checkpoint on ``--resume`` (the output folder must
  be visible to all of them: one machine, or a shared file system).
"""
from __future__ import annotations

import os
import pickle
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Mapping

import torch

from ..core.errors import InputError

__all__ = [
    "DistributedContext",
    "DistributedSetupError",
    "launched_by_torchrun",
    "context_from_environment",
    "current_context",
    "resolve_device",
    "init_distributed",
    "shutdown_distributed",
    "check_global_batch_size",
    "shard",
    "barrier",
    "broadcast_object",
    "all_reduce_mean",
]

_ENV_KEYS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


class DistributedSetupError(InputError, RuntimeError):
    """torchrun asked for something this machine cannot give (e.g. more processes than GPUs)."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``world_size`` processes, this one ``rank`` (``local_rank`` on its machine)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs, evaluates and writes files."""
        return self.rank == 0


SINGLE_PROCESS = DistributedContext()


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` are set (as torchrun does)."""
    environ = os.environ if environ is None else environ
    return all(key in environ for key in _ENV_KEYS)


def _env_int(environ, key: str, default=None) -> int:
    text = environ.get(key)
    if text is None:
        if default is None:
            raise InputError(f"environment variable {key} is not set")
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"environment variable {key}={text!r} is not an integer") from None


def context_from_environment(environ: Mapping[str, str] | None = None) -> DistributedContext:
    """The :class:`DistributedContext` torchrun describes in the environment (single process without it)."""
    environ = os.environ if environ is None else environ
    if not launched_by_torchrun(environ):
        return SINGLE_PROCESS
    world_size = _env_int(environ, "WORLD_SIZE")
    rank = _env_int(environ, "RANK")
    local_rank = _env_int(environ, "LOCAL_RANK")
    local_world_size = _env_int(environ, "LOCAL_WORLD_SIZE", default=world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    if local_world_size < 1 or not 0 <= local_rank < local_world_size:
        raise InputError(f"inconsistent torchrun environment: LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world_size}")
    return DistributedContext(world_size, rank, local_rank, local_world_size)


def current_context() -> DistributedContext:
    """The context of the initialised process group (ranks from torch.distributed), else single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE_PROCESS
    world_size, rank = dist.get_world_size(), dist.get_rank()
    env = context_from_environment()
    local_rank = env.local_rank if env.world_size == world_size else rank
    local_world_size = env.local_world_size if env.world_size == world_size else world_size
    return DistributedContext(world_size, rank, local_rank, local_world_size)


def resolve_device(device: torch.device | str | None, context: DistributedContext) -> torch.device:
    """The training device of this process: ``cuda:LOCAL_RANK`` for CUDA under torchrun.

    ``device`` is ``None`` (CUDA when available, else the CPU), a string or a
    ``torch.device``. Raises :class:`DistributedSetupError` (a ``RuntimeError``) when more processes per machine were started
    than there are visible GPUs, and ``ValueError`` for an explicit ``cuda:i`` that is not
    this process's ``LOCAL_RANK``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda" or not context.enabled:
        return device
    visible = torch.cuda.device_count()
    if context.local_world_size > visible:
        raise DistributedSetupError(
            f"torchrun started {context.local_world_size} processes on this machine (--nproc_per_node / LOCAL_WORLD_SIZE="
            f"{context.local_world_size}) but only {visible} CUDA device(s) are visible; use --nproc_per_node={visible} "
            "or fewer, or train on the CPU (--device cpu, gloo)"
        )
    if device.index is not None and device.index != context.local_rank:
        raise InputError(
            f"device {str(device)!r} given, but under torchrun process LOCAL_RANK={context.local_rank} uses "
            f"cuda:{context.local_rank}; pass --device cuda"
        )
    return torch.device("cuda", context.local_rank)


def init_distributed(device: torch.device | str | None = None) -> tuple[DistributedContext, torch.device, bool]:
    """Start the process group torchrun asked for; returns ``(context, device, started)``.

    ``started`` is True when this call initialised the process group (its caller then ends
    it with :func:`shutdown_distributed`). A group initialised earlier (e.g. by a test using
    ``torch.multiprocessing``) is used as it is. Without torchrun or with ``WORLD_SIZE=1``:
    ``(single-process context, device, False)``.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        context = current_context()
        return context, resolve_device(device, context), False
    context = context_from_environment()
    device = resolve_device(device, context)
    if not context.enabled:
        return context, device, False
    if not dist.is_available():
        raise DistributedSetupError("torch.distributed is not available in this torch build; train in one process")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return context, device, True


def shutdown_distributed() -> None:
    """End the process group if one is running, once its threads hold none of our tensors."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _wait_until_backend_lets_go()
        dist.destroy_process_group()


def check_global_batch_size(batch_size: int, world_size: int) -> int:
    """Per-process batch size; ``ValueError`` when ``batch_size`` does not split evenly."""
    if batch_size % world_size:
        raise InputError(
            f"the global batch size {batch_size} is not divisible by the number of processes {world_size} "
            f"(torchrun --nproc_per_node x nodes); use a multiple of {world_size}, e.g. {batch_size - batch_size % world_size or world_size}"
        )
    return batch_size // world_size


def shard(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """This process's rows ``rank::world_size`` of a global batch, contiguous (the tensor itself in one process)."""
    if not context.enabled:
        return tensor
    return tensor[context.rank :: context.world_size].contiguous()


def barrier(context: DistributedContext) -> None:
    """Wait for every process (no-op in one process)."""
    if not context.enabled:
        return
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _backend_device() -> torch.device:
    """Where the process group's collectives take their tensors: the current GPU for nccl, else the CPU."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# The tensors of this module's latest collectives. A process must not exit while a backend
# thread still references one of them: torch ties a tensor's Python object to every extra
# C++ reference, so the thread that drops such a reference takes the GIL, and a gloo worker
# that tries while the interpreter shuts down aborts the process ("terminate called without
# an active exception"). Rank 1 exits right after the final broadcast of the history and met
# that race about one run in ten; :func:`shutdown_distributed` waits for the release.
_HANDED_TO_BACKEND: deque = deque(maxlen=4)


def _collective(operation, tensor: torch.Tensor, **kwargs) -> None:
    _HANDED_TO_BACKEND.append(tensor)
    operation(tensor, **kwargs)


def _wait_until_backend_lets_go(timeout: float = 10.0) -> None:
    """Sleep (the GIL released) until no backend thread references a tensor of :data:`_HANDED_TO_BACKEND`.

    After ``timeout`` seconds it gives up with a warning: the process may then abort at exit
    (see :func:`shutdown_distributed`), which is better than hanging in it.
    """
    deadline = time.monotonic() + timeout
    while any(tensor._use_count() > 1 for tensor in _HANDED_TO_BACKEND) and time.monotonic() < deadline:
        time.sleep(1e-3)
    held = sum(tensor._use_count() > 1 for tensor in _HANDED_TO_BACKEND)
    if held:
        warnings.warn(
            f"the process group's backend still holds {held} of the tensors of our last collectives after {timeout:g} s; "
            "ending the group anyway (a backend thread releasing them during interpreter shutdown aborts the process)",
            RuntimeWarning,
            stacklevel=2,
        )
    _HANDED_TO_BACKEND.clear()


def broadcast_object(value: object, context: DistributedContext, source: int = 0) -> object:
    """``value`` of rank ``source`` on every process (picklable objects)."""
    if not context.enabled:
        return value
    import torch.distributed as dist

    device = _backend_device()
    if context.rank == source:
        payload = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8).to(device)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=device)
    _collective(dist.broadcast, size, src=source)
    if context.rank != source:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    _collective(dist.broadcast, payload, src=source)
    if context.rank == source:
        return value
    return pickle.loads(payload.cpu().numpy().tobytes())


def all_reduce_mean(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Mean of ``tensor`` over the processes (a new tensor; the tensor itself in one process)."""
    if not context.enabled:
        return tensor
    import torch.distributed as dist

    total = tensor.detach().clone()
    _collective(dist.all_reduce, total, op=dist.ReduceOp.SUM)
    return total / context.world_size
