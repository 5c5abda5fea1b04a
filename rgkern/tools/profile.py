"""Count the work a pass issues: kernels, host syncs, FLOPs and bytes (docs/design.md section 9).

On machines without a GPU nothing can time a GPU kernel, but the work a pass issues can be
counted exactly on the CPU, and at this model's sizes the count is what bounds the speed
on a GPU: every GEMM of the paper-size model is shorter than one kernel launch.

:class:`WorkCounter` is a ``TorchDispatchMode`` that tallies every aten op that is neither a
view nor an allocation (each becomes at least one kernel on a device), every Triton launch,
and the host synchronisations (``item``, ``_local_scalar_dense``, ``nonzero``,
``is_nonzero``, ``equal``). Per op it also adds the matrix-product FLOPs (``mm``, ``addmm``,
``bmm``, ``baddbmm``, ``addbmm``) and the bytes of its tensor inputs and outputs (an upper
estimate of the memory traffic of an unfused op). The counts depend on the model's
structure, not on its hidden size or batch.

``python -m rgkern profile`` prints the table of a paper-structured model per pass and
backend, with a roofline estimate for a named GPU.
"""
from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from ..core.model import RGFlow

__all__ = ["WorkCounter", "Work", "count_work", "saved_activation_bytes", "GPUS", "GPU", "roofline_seconds"]

_aten = torch.ops.aten

#: Ops that allocate or only relabel memory: no kernel on a device.
_FREE_OPS = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view",
    "lift_fresh", "detach", "alias", "set_", "resize_", "_reshape_alias", "view", "_to_copy_noop",
    "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_has_compatible_shallow_copy_type",
}
#: Ops that make the host wait for the device.
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal"}
_MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "addbmm"}


def _is_view(func) -> bool:
    schema = func._schema
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def _matmul_flops(name: str, args, out) -> int:
    if name == "mm":
        a, b = args[0], args[1]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if name == "addmm":
        a, b = args[1], args[2]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if name == "bmm":
        a, b = args[0], args[1]
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if name in ("baddbmm", "addbmm"):
        a, b = args[1], args[2]
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    return 0


def _tensor_bytes(values) -> int:
    total = 0
    for value in values:
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, (list, tuple)):
            total += _tensor_bytes(value)
    return total


@dataclass
class Work:
    """What one counted region issued.

    Attributes:
        kernels: aten kernels (ops that are neither views nor allocations) plus Triton launches.
        gemms: the matrix products among them; triton: the Triton launches among them.
        syncs: host synchronisations; flops: matrix-product FLOPs; bytes: tensor bytes read
            and written by the counted ops (unfused upper estimate).
        by_op: kernels per op name; bytes_by_op: bytes per op name.
    """

    kernels: int = 0
    gemms: int = 0
    triton: int = 0
    syncs: int = 0
    by_op: Counter = field(default_factory=Counter)
    flops: int = 0
    bytes: int = 0
    bytes_by_op: Counter = field(default_factory=Counter)
    per_kernel: list = field(default_factory=list, repr=False)

    @property
    def other(self) -> int:
        return self.kernels - self.gemms - self.triton


class WorkCounter(TorchDispatchMode):
    """Context manager that fills :attr:`work` (a :class:`Work`) with what runs inside it."""

    def __init__(self):
        super().__init__()
        self.work = Work()
        self._in_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._in_triton:
            return out
        name = func._schema.name.split("::")[-1]
        work = self.work
        if name in SYNC_OPS:
            work.syncs += 1
        if name in _FREE_OPS or _is_view(func):
            return out
        flops = _matmul_flops(name, args, out) if name in _MATMUL_OPS else 0
        moved = _tensor_bytes(args) + _tensor_bytes(kwargs.values()) + _tensor_bytes(out if isinstance(out, (list, tuple)) else [out])
        work.kernels += 1
        work.gemms += name in _MATMUL_OPS
        work.flops += flops
        work.bytes += moved
        work.by_op[name] += 1
        work.bytes_by_op[name] += moved
        work.per_kernel.append((flops, moved))
        return out

    @contextlib.contextmanager
    def triton_launch(self, nbytes: int) -> Iterator[None]:
        """Count one Triton launch (its bytes: ``nbytes``); aten ops inside it are not counted."""
        self.work.kernels += 1
        self.work.triton += 1
        self.work.bytes += nbytes
        self.work.by_op["triton"] += 1
        self.work.per_kernel.append((0, nbytes))
        self._in_triton += 1
        try:
            yield
        finally:
            self._in_triton -= 1


@contextlib.contextmanager
def _counted_triton_launches(counter: WorkCounter, run_kernels: bool = True):
    """Count every rgkern Triton kernel launch in ``counter``, through the launch hook of
    :func:`rgkern.core.ops.watch_kernel_launches`; with ``run_kernels`` False the launches are
    counted but not run."""
    from ..core.ops import watch_kernel_launches

    def watcher(kernel, args, kwargs):
        return counter.triton_launch(_tensor_bytes(args) + _tensor_bytes(kwargs.values()))

    with watch_kernel_launches(watcher, run_kernels):
        yield


def count_work(fn: Callable, *args: object, run_kernels: bool = True, **kwargs: object) -> tuple[Work, object]:
    """Run ``fn(*args, **kwargs)`` once and return ``(Work, its result)``.

    ``run_kernels=False`` counts the Triton launches without running them (their outputs
    keep whatever their buffers held, so the result is meaningless): under the interpreter a
    launch of the fused half-step costs about 0.1 s, and a pass without host syncs (which
    the same count checks) launches the same kernels whatever the values.
    """
    counter = WorkCounter()
    with _counted_triton_launches(counter, run_kernels), counter:
        result = fn(*args, **kwargs)
    return counter.work, result


def saved_activation_bytes(fn: Callable, *args: object, **kwargs: object) -> tuple[int, object]:
    """Bytes autograd saves for the backward of ``fn(*args, **kwargs)``; returns ``(bytes, result)``.

    Counted with ``torch.autograd.graph.saved_tensors_hooks`` once per storage (a tensor saved
    by several ops, or views of one tensor, count once), leaving out the parameters and
    their views (leaf tensors that require grad), which exist whether or not anything is
    saved.
    """
    seen: dict = {}

    def pack(tensor):
        base = tensor if tensor._base is None else tensor._base  # a view of a parameter is the parameter
        if not (base.is_leaf and base.requires_grad):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn(*args, **kwargs)
    return sum(seen.values()), result


# ----------------------------------------------------------------------------- roofline
@dataclass(frozen=True)
class GPU:
    """Peak rates of a device for a roofline estimate."""

    name: str
    bf16_flops: float  # dense bf16 tensor-core FLOP/s
    tf32_flops: float
    bandwidth: float  # bytes/s of HBM
    launch_seconds: float  # host-side cost of one eager kernel launch


GPUS = {
    "h100": GPU("H100 SXM", 989e12, 495e12, 3.35e12, 4e-6),
    "h200": GPU("H200 SXM", 989e12, 495e12, 4.8e12, 4e-6),
}


def roofline_seconds(work: Work, gpu: GPU, scale_flops: float = 1.0, scale_bytes: float = 1.0) -> dict:
    """Estimated seconds of ``work`` on ``gpu``: launch-bound, FLOP-bound and bandwidth-bound.

    Each kernel costs ``max(launch, flops / bf16 rate, bytes / bandwidth)``; ``scale_*``
    rescale the counted FLOPs and bytes (e.g. from a small counting model to paper size).
    """
    total = 0.0
    for flops, nbytes in work.per_kernel:
        total += max(gpu.launch_seconds, flops * scale_flops / gpu.bf16_flops, nbytes * scale_bytes / gpu.bandwidth)
    return {
        "launches": work.kernels * gpu.launch_seconds,
        "flops": work.flops * scale_flops / gpu.bf16_flops,
        "bytes": work.bytes * scale_bytes / gpu.bandwidth,
        "estimate": total,
    }


# ----------------------------------------------------------------------------- the table
PAPER_STRUCTURE = dict(image_size=32, channels=3, kernel_size=4, n_layers=(8, 6, 4, 2), hidden=512, n_res=4, n_mlp=2)


def pass_functions(model: RGFlow, batch: int, seed: int = 0) -> dict:
    """The passes to count, as functions of no arguments: name -> fn.

    ``train``: ``log_prob``, mean, backward (what a training step runs before clipping and
    the optimiser); ``train-bf16``: the same under bfloat16 autocast; ``encode`` and
    ``decode`` under ``torch.no_grad()``; ``sample(16)``: ``model.sample(16)``.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.channels, model.image_size, model.image_size, generator=generator)
    x = x.to(next(model.parameters()))

    def train():
        model.zero_grad(set_to_none=True)
        (-model.log_prob(x).mean()).backward()

    def train_bf16():
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            train()

    def encode():
        with torch.no_grad():
            return model.encode(x)

    def decode():
        with torch.no_grad():
            return model.decode(x)

    return {
        "train": train,
        "train-bf16": train_bf16,
        "encode": encode,
        "decode": decode,
        "sample(16)": lambda: model.sample(16, generator=torch.Generator().manual_seed(seed)),
    }


_COUNT_BATCHES = (2, 3)


def _extrapolate(one: Work, two: Work, batch: int) -> Work:
    """Per-kernel FLOPs and bytes at ``batch`` from counts at two batch sizes (linear in the batch).

    (At batch 1 some reductions over the batch vanish, so the counts use 2 and 3.)
    """
    low, high = _COUNT_BATCHES
    if len(one.per_kernel) != len(two.per_kernel):
        raise RuntimeError(f"the pass issued different kernels at batch {low} and {high}; cannot extrapolate")
    scaled = [
        (f1 + (f2 - f1) * (batch - low), b1 + (b2 - b1) * (batch - low))
        for (f1, b1), (f2, b2) in zip(one.per_kernel, two.per_kernel)
    ]
    work = Work(kernels=one.kernels, gemms=one.gemms, triton=one.triton, syncs=one.syncs, by_op=one.by_op)
    work.per_kernel = scaled
    work.flops = sum(f for f, _ in scaled)
    work.bytes = sum(b for _, b in scaled)
    return work


def profile_passes(config: dict | None = None, batch: int = 64, backends: Sequence[str] = ("torch",),
                   passes: Sequence[str] | None = None, progress: Callable[[str], object] | None = None) -> list[dict]:
    """Count every pass of ``config`` (default: the paper's model) per backend, at ``batch``.

    Counts run on the CPU at batch 2 and 3 with the full model (kernel counts do not depend
    on the batch; FLOPs and bytes are extrapolated linearly to ``batch``). The ``triton``
    backend needs ``TRITON_INTERPRET=1`` on a machine without a GPU. Returns one dict per
    (backend, pass): ``backend``, ``pass``, ``work`` (a :class:`Work`).
    """
    from ..core.model import RGFlow

    config = dict(PAPER_STRUCTURE if config is None else config)
    rows = []
    for backend in backends:
        torch.manual_seed(0)
        model = RGFlow(**config, backend=backend)
        model.check_inputs = False
        with torch.no_grad():  # no identity couplings: the counts must not depend on it, but the FLOPs are real
            for name, param in model.named_parameters():
                if name.endswith("_scale"):
                    param.normal_(0, 0.1)
        per_batch = [pass_functions(model, b) for b in _COUNT_BATCHES]
        for name in passes or per_batch[0]:
            per_batch[0][name]()  # warm up: geometry tables and masks are built and cached on first use
            works = [count_work(fns[name])[0] for fns in per_batch]
            if progress:
                progress(f"{backend} {name}: {works[0].kernels} kernels")
            rows.append({"backend": backend, "pass": name, "work": _extrapolate(works[0], works[1], batch)})
    return rows


def format_table(rows: list[dict], gpu: GPU, batch: int) -> str:
    """A Markdown table of :func:`profile_passes` rows with a roofline estimate on ``gpu``."""
    lines = [
        f"Per pass at batch {batch}; roofline on {gpu.name}: bf16 {gpu.bf16_flops / 1e12:.0f} TFLOP/s, "
        f"{gpu.bandwidth / 1e12:.2f} TB/s, {gpu.launch_seconds * 1e6:.0f} us per launch; each kernel costs "
        "max(launch, FLOPs / rate, bytes / bandwidth).",
        "",
        "| backend | pass | kernels | GEMM | Triton | other | host syncs | GFLOP | GB moved | launches ms | FLOPs ms | bytes ms | estimate ms | estimate / FLOP bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        work = row["work"]
        t = roofline_seconds(work, gpu)
        bound = t["estimate"] / t["flops"] if t["flops"] > 0 else math.inf
        lines.append(
            f"| {row['backend']} | {row['pass']} | {work.kernels:,} | {work.gemms:,} | {work.triton:,} | {work.other:,} | "
            f"{work.syncs} | {work.flops / 1e9:,.1f} | {work.bytes / 1e9:,.2f} | {t['launches'] * 1e3:.2f} | "
            f"{t['flops'] * 1e3:.2f} | {t['bytes'] * 1e3:.2f} | {t['estimate'] * 1e3:.2f} | {bound:.1f}x |"
        )
    return "\n".join(lines)
