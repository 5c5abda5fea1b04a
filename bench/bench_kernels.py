"""Kernel path against the reference path, side by side: ``pytest bench/ --benchmark-only``.

Groups (``benchmark.group``) put the paths of one operation next to each other:

* ``gather_patches`` / ``scatter_patches``: the data-movement kernels on the level-0
  disentangler (every pixel), reference indexing against the Triton kernel;
* ``coupling_op_fwd`` / ``coupling_op_fwd_bwd``: the coupling half-step alone (masks, tanh,
  scales, exp, log-det), reference elementwise chain against the fused kernel;
* ``coupling_layer_fwd`` / ``coupling_layer_fwd_bwd``: one coupling half-step with its s/t
  residual MLPs on the level-0 rows: the reference (batched GEMMs and elementwise ops), the
  reference under ``torch.compile`` (the peer to beat) and the fused kernel;
* ``sublayer_fwd`` / ``sublayer_fwd_bwd``: a whole sublayer (the level-0 disentangler, its
  blocks' half-steps with their MLPs) on the images: the reference, the Triton kernels with a
  separate gather and scatter around the half-steps (``rows``: ``transform_rows``, the path
  before they were fused), and the fused one (``fused``: ``Sublayer.forward_fused``);
* ``encode`` / ``decode`` / ``train_step``: the whole model, batch 64 at L=32 with the
  paper's size (``RGFlow()`` defaults); the training step is forward, backward, gradient
  clipping and AdamW. Paths: ``reference`` (eager), ``reference_compiled``
  (``torch.compile``), ``kernels`` (eager, Triton kernels), and with
  ``RGKERN_BENCH_COMPILE_KERNELS=1`` also ``kernels_compiled``.

On a GPU every benchmark records ``extra_info``: images/s, and the fraction of this
machine's measured copy bandwidth (memory-bound ops) or fp32/bf16 matmul rate (model
passes, from the Linear layers' FLOPs). Without a GPU, the kernels run in Triton's CPU
interpreter on a tiny model: those numbers prove the benchmarks run, not speed, and the
``torch.compile`` variants are skipped. ``RGKERN_BENCH_COMPILE=0`` skips them on a GPU too.
"""
import copy
import os

import pytest
import torch

import rgkern
from rgkern.core import ops

HAS_CUDA = torch.cuda.is_available()
COMPILE = HAS_CUDA and os.environ.get("RGKERN_BENCH_COMPILE", "1") != "0"
COMPILE_KERNELS = COMPILE and os.environ.get("RGKERN_BENCH_COMPILE_KERNELS", "0") == "1"

if HAS_CUDA:  # paper size (docs/design.md section 1)
    BATCH = int(os.environ.get("RGKERN_BENCH_BATCH", "64"))
    MODEL = dict(image_size=32, channels=3)
else:  # interpreter: prove it runs
    BATCH = 2
    MODEL = dict(image_size=16, channels=3, kernel_size=4, n_layers=1, hidden=8, n_res=1, n_mlp=0)

PATHS = ["reference", "kernels"] + (["reference_compiled"] if COMPILE else []) + (["kernels_compiled"] if COMPILE_KERNELS else [])
BACKEND = {"reference": "torch", "reference_compiled": "torch", "kernels": "triton", "kernels_compiled": "triton"}


# --------------------------------------------------------------------------- helpers
def timed(benchmark, fn):
    """Benchmark ``fn`` (synchronising the GPU inside the timed call)."""
    if HAS_CUDA:

        def run():
            result = fn()
            torch.cuda.synchronize()
            return result

        fn()  # warm-up (kernel compilation, torch.compile, cuBLAS heuristics)
        torch.cuda.synchronize()
        return benchmark(run)
    return benchmark.pedantic(fn, rounds=2, iterations=1, warmup_rounds=0)


def median_seconds(benchmark):
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.median


def record(benchmark, limits, images=None, bytes_moved=None, flops=None):
    """images/s, and on a GPU the fractions of the measured copy bandwidth / matmul rates."""
    seconds = median_seconds(benchmark)
    info = benchmark.extra_info
    info["device"] = limits.get("gpu", "cpu (Triton interpreter: proves it runs, not speed)")
    for key in ("copy_bytes_per_s", "matmul_fp32_flop_per_s", "matmul_bf16_flop_per_s", "tf32_matmul_allowed"):
        if key in limits:
            info["machine_" + key] = limits[key]
    if seconds is None or seconds <= 0:
        return
    if images is not None:
        info["images_per_s"] = images / seconds
    if bytes_moved is not None:
        info["bytes_moved"] = bytes_moved
        info["gb_per_s"] = bytes_moved / seconds / 1e9
        if "copy_bytes_per_s" in limits:
            info["fraction_of_copy_bandwidth"] = bytes_moved / seconds / limits["copy_bytes_per_s"]
    if flops is not None:
        info["linear_flops"] = flops
        info["tflop_per_s"] = flops / seconds / 1e12
        for key in ("matmul_fp32_flop_per_s", "matmul_bf16_flop_per_s"):
            if key in limits:
                info["fraction_of_" + key.replace("_flop_per_s", "")] = flops / seconds / limits[key]


def linear_flops(model: rgkern.RGFlow, batch: int) -> int:
    """FLOPs of the s/t MLP linears in one x -> z pass (2 * in * out per row and linear).

    Every half-step (``2 * num_blocks`` per sublayer) runs the s and t networks of its pair:
    ``directions[j][pair]`` is ``(n_res, 2, w_out, w_in)``.
    """
    total = 0
    for sublayer in model.sublayers:
        rows = batch * model.geometry.sublayers[sublayer.index].num_patches
        per_half_step = sum(2 * v[0].numel() for v in sublayer.networks.directions)
        total += per_half_step * 2 * sublayer.num_blocks * rows
    assert total > 0, "no linear FLOPs counted: the parameter layout changed under this function"
    return total


def maybe_compile(fn, path):
    return torch.compile(fn) if path.endswith("_compiled") else fn


@pytest.fixture(scope="module")
def base_model(make_base_model):
    return make_base_model(MODEL)


@pytest.fixture(scope="module")
def images(device):
    C, L = MODEL["channels"], MODEL["image_size"]
    return torch.randn(BATCH, C, L, L, device=device, generator=torch.Generator(device).manual_seed(1))


def model_for(base_model, path):
    model = copy.deepcopy(base_model)
    model.backend = BACKEND[path]
    return model


# --------------------------------------------------------------------------- memory-bound ops
@pytest.mark.parametrize("path", ["reference", "kernels"])
@pytest.mark.parametrize("op", ["gather_patches", "scatter_patches"])
def test_patches(benchmark, op, path, base_model, images, machine_limits):
    benchmark.group = op
    backend = BACKEND[path]
    row_index = base_model.geometry.row_index(0, images.device)
    rows = ops.gather_patches(images, row_index, "torch")
    if op == "gather_patches":
        fn = lambda: ops.gather_patches(images, row_index, backend)
        moved = 2 * rows.numel() * rows.element_size()
    else:
        fn = lambda: ops.scatter_patches(images, rows, row_index, backend)
        moved = (2 * images.numel() + 2 * rows.numel()) * rows.element_size()  # copy + rows
    timed(benchmark, fn)
    record(benchmark, machine_limits, images=BATCH, bytes_moved=moved)


@pytest.mark.parametrize("path", ["reference", "kernels"] + (["reference_compiled"] if COMPILE else []))
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_coupling_layer(benchmark, direction, path, base_model, images, machine_limits):
    benchmark.group = f"coupling_layer_{direction}"
    backend = BACKEND[path]
    sublayer = base_model.sublayers[0]
    geometry = base_model.geometry
    # Each backend's row layout (Sublayer.coupling): row order for the kernels, the two
    # checkerboard halves for the torch path.
    index = geometry.row_index if backend == "triton" else geometry.checkerboard_row_index
    rows = ops.gather_patches(images, index(0, images.device), "torch")
    rows = rows.detach().requires_grad_(direction == "fwd_bwd")
    coupling = maybe_compile(sublayer.coupling, path)

    def forward():
        return coupling(rows if backend == "triton" else rows.split(geometry.patch_dim // 2, dim=1), 0, False, backend)

    def forward_backward():
        y, logdet = forward()
        parts = (y,) if isinstance(y, torch.Tensor) else y
        (sum(part.square().sum() for part in parts) + logdet.sum()).backward()
        sublayer.zero_grad(set_to_none=True)
        rows.grad = None

    timed(benchmark, forward if direction == "fwd" else forward_backward)
    # Both networks (s and t) of one half-step: 2 * w_in * w_out FLOPs per row and linear (the
    # fused kernels' work; the torch path skips the zero half of the first linear's inputs and
    # the unused half of the last one's outputs).
    per_row = sum(2 * v.shape[2] * v.shape[-2] * v.shape[-1] for v in sublayer.networks.directions) * sublayer.networks.n_res
    flops = per_row * rows.shape[0]
    record(benchmark, machine_limits, images=BATCH, flops=flops * (1 if direction == "fwd" else 3))


@pytest.mark.parametrize("path", ["reference", "rows", "fused"])
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_sublayer(benchmark, direction, path, base_model, images, machine_limits):
    benchmark.group = f"sublayer_{direction}"
    sublayer = base_model.sublayers[0]
    row_index = base_model.geometry.row_index(0, images.device)
    x = images.detach().clone().requires_grad_(direction == "fwd_bwd")

    def forward():
        if path == "fused":
            return sublayer.forward_fused(x)
        backend = "torch" if path == "reference" else "triton"
        rows, logdet = sublayer.transform_rows(ops.gather_patches(x, row_index, backend), False, backend)
        return ops.scatter_patches(x, rows, row_index, backend), logdet.view(x.shape[0], -1).sum(dim=1)

    def forward_backward():
        out, logdet = forward()
        (out.square().sum() + logdet.sum()).backward()
        sublayer.zero_grad(set_to_none=True)
        x.grad = None

    timed(benchmark, forward if direction == "fwd" else forward_backward)
    per_row = sum(2 * v.shape[2] * v.shape[-2] * v.shape[-1] for v in sublayer.networks.directions) * sublayer.networks.n_res
    flops = per_row * BATCH * base_model.geometry.sublayers[0].num_patches * 2 * sublayer.num_blocks
    record(benchmark, machine_limits, images=BATCH, flops=flops * (1 if direction == "fwd" else 3))


# --------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("path", PATHS)
def test_encode(benchmark, path, base_model, images, machine_limits):
    benchmark.group = "encode"
    model = model_for(base_model, path)
    encode = maybe_compile(model.encode, path)
    with torch.no_grad():
        timed(benchmark, lambda: encode(images))
    record(benchmark, machine_limits, images=BATCH, flops=linear_flops(model, BATCH))


@pytest.mark.parametrize("path", PATHS)
def test_decode(benchmark, path, base_model, images, machine_limits):
    benchmark.group = "decode"
    model = model_for(base_model, path)
    with torch.no_grad():
        z, _ = model.encode(images)
        decode = maybe_compile(model.decode, path)
        timed(benchmark, lambda: decode(z))
    record(benchmark, machine_limits, images=BATCH, flops=linear_flops(model, BATCH))


@pytest.mark.parametrize("path", PATHS)
def test_train_step(benchmark, path, base_model, images, machine_limits):
    benchmark.group = "train_step"
    model = model_for(base_model, path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-5)

    def loss_fn(x):
        return -model.log_prob(x).mean() / model.num_dims

    loss_fn = maybe_compile(loss_fn, path)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(images)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss

    timed(benchmark, step)
    # backward of a Linear costs two GEMMs of the forward's size
    record(benchmark, machine_limits, images=BATCH, flops=3 * linear_flops(model, BATCH))
