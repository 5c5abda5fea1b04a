"""Throughput at scale: sampling images/s against the batch size, and training steps/s, per path.

Run with ``pytest bench/bench_speed.py --benchmark-only`` (or ``pytest bench/ --benchmark-only``).

Groups (``benchmark.group``):

* ``sample_batch_<N>``: :func:`rgkern.tools.sampling.sample_images` in steady state (one batch of N
  per timed call: latents drawn on the CPU, decoded on the device, copied back as uint8),
  for N in 64, 256, 1024, 4096, 16384 on a GPU (``RGKERN_BENCH_SAMPLE_SIZES`` overrides).
  Paths: ``reference`` (float32, pure PyTorch), ``kernels`` (float32, Triton),
  ``kernels_bf16`` (bf16 autocast for the s/t networks), and on a GPU
  ``kernels_compiled_cuda_graphs`` (``compile=True, cuda_graphs=True``).
* ``train_step``: :meth:`rgkern.tools.trainer.Trainer.train_step` (preprocessing, forward, backward,
  clipping, AdamW and the NaN check's one host sync), batch 64 (``RGKERN_BENCH_BATCH``).
  Paths: ``reference``, ``reference_compiled`` (GPU), ``kernels``, ``kernels_bf16`` and
  ``kernels_compiled_cuda_graphs`` (GPU).

Model on a GPU: the paper's size (``RGFlow()`` defaults, L=32, C=3; 12.47 GFLOP per image per
pass, :func:`model_flops_per_image`). Every benchmark records in ``extra_info``:
``images_per_s``, ``model_flops_per_image``, ``tflop_per_s`` (model FLOPs per second),
``fraction_of_matmul_bf16`` and ``fraction_of_matmul_fp32`` (of a large ``torch.matmul``
measured in the same session: 8192^3 on a GPU, see ``bench/conftest.py``; 512^3 here on the
CPU), and on a GPU ``peak_memory_bytes`` (``torch.cuda.max_memory_allocated`` during the
benchmark).

Without a GPU the model is tiny (L=16, hidden 8), the batch sizes are 4 and 16, the kernels
run in Triton's CPU interpreter (at batch 4 only) and the compiled variants are skipped: it
proves the benchmarks run (about a minute), nothing about speed. ``RGKERN_BENCH_COMPILE=0``
skips the compiled variants on a GPU too (their compilation takes minutes).
"""
import copy
import os
import time

import pytest
import torch

from rgkern.core.model import default_n_layers
from rgkern.tools.presets import TrainConfig
from rgkern.tools.sampling import sample_images
from rgkern.tools.trainer import Trainer

HAS_CUDA = torch.cuda.is_available()
COMPILE = HAS_CUDA and os.environ.get("RGKERN_BENCH_COMPILE", "1") != "0"

if HAS_CUDA:
    MODEL = dict(image_size=32, channels=3)  # RGFlow() defaults: the paper's size
    SAMPLE_SIZES = [int(n) for n in os.environ.get("RGKERN_BENCH_SAMPLE_SIZES", "64,256,1024,4096,16384").split(",")]
    TRAIN_BATCH = int(os.environ.get("RGKERN_BENCH_BATCH", "64"))
    ROUNDS, WARMUP = 5, 2
else:
    MODEL = dict(image_size=16, channels=3, kernel_size=4, n_layers=1, hidden=8, n_res=1, n_mlp=0)
    SAMPLE_SIZES = [4, 16]
    TRAIN_BATCH = 4
    ROUNDS, WARMUP = 3, 1

SAMPLE_PATHS = ["reference", "kernels", "kernels_bf16"] + (["kernels_compiled_cuda_graphs"] if COMPILE else [])
TRAIN_PATHS = ["reference", "kernels", "kernels_bf16"] + (["reference_compiled", "kernels_compiled_cuda_graphs"] if COMPILE else [])


# --------------------------------------------------------------------------- FLOPs
def _per_level(value, levels):
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels


def model_flops_per_image(config) -> int:
    """FLOPs of the s/t networks' Linear layers in one pass (x -> z or z -> x) of one image.

    ``config``: an :class:`rgkern.RGFlow`'s ``config`` dict (or the keyword arguments it was
    built with; ``n_layers``, ``hidden``, ``n_res``, ``n_mlp`` may be ints or one per level,
    ``n_layers=None`` is the paper's default).

    ``2 * sum over RNVP half-steps of rows * MLP MACs``: with ``H = log2(L / k) + 1`` RG
    levels, level ``h`` has two sublayers (disentangler, decimator), each with
    ``P_h = (L / (k * 2**h))**2`` patches (rows) per image and ``n_layers[h]`` RNVP blocks,
    i.e. ``2 * n_layers[h]`` coupling half-steps; a half-step runs two residual MLPs (s and
    t), each ``n_res[h]`` blocks of Linear layers with widths ``D, hidden, ..., hidden, D``
    (``n_mlp[h]`` hidden widths, ``D = C * k * k``), so one MLP costs per row
    ``n_res * sum(w_in * w_out)`` multiply-adds. A FLOP is half a multiply-add. Elementwise
    work (Swish, the coupling, gather/scatter, weight norm) is not counted; it is small next
    to the GEMMs at the paper's size. A training step costs about 3x this (the backward runs
    two GEMMs of each forward GEMM's size). Paper size (``RGFlow()``): 12.47 GFLOP per image.
    """
    L, C, k = config.get("image_size", 32), config.get("channels", 3), config.get("kernel_size", 4)
    levels = (L // k).bit_length()  # log2(L / k) + 1 for L = k * 2**n
    n_layers = config.get("n_layers")
    n_layers = default_n_layers(levels) if n_layers is None else _per_level(n_layers, levels)
    hidden = _per_level(config.get("hidden", 512), levels)
    n_res = _per_level(config.get("n_res", 4), levels)
    n_mlp = _per_level(config.get("n_mlp", 2), levels)
    D = C * k * k
    macs = 0
    for h in range(levels):
        rows = (L // (k * 2**h)) ** 2
        widths = [D] + [hidden[h]] * n_mlp[h] + [D]
        mlp = n_res[h] * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        half_steps = 2 * n_layers[h]
        macs += 2 * rows * half_steps * 2 * mlp  # 2 sublayers, 2 MLPs (s, t) per half-step
    return 2 * macs


def _counted_linear_flops(model) -> int:
    """The same figure counted from the model's weights (a check of the formula).

    Each weight of a stacked linear (``networks.directions``) is one multiply-add per patch row.
    """
    total = 0
    for sublayer in model.sublayers:
        rows = model.geometry.sublayers[sublayer.index].num_patches
        total += sum(2 * v.numel() * rows for v in sublayer.networks.directions)
    return total


# --------------------------------------------------------------------------- fixtures and helpers
def _median_seconds(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@pytest.fixture(scope="module")
def matmul_rates(machine_limits, device):
    """Dense matmul rates (FLOP/s) of this device, measured in this session."""
    if device.type == "cuda":  # 8192^3 in bench/conftest.py
        return {"bf16": machine_limits["matmul_bf16_flop_per_s"], "fp32": machine_limits["matmul_fp32_flop_per_s"], "size": 8192}
    n = 512
    rates = {"size": n}
    for dtype, key in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        rates[key] = 2 * n**3 / _median_seconds(lambda: torch.matmul(a, b))
    return rates


@pytest.fixture(scope="module")
def base_model(make_base_model):
    model = make_base_model(MODEL)
    flops = model_flops_per_image(model.config)
    assert flops == _counted_linear_flops(model), "model_flops_per_image disagrees with the model's Linear layers"
    return model


_MODELS = {}


def model_for(base_model, path):
    """One model per path for the whole session (a compiled decoder stays compiled across batch sizes)."""
    if path not in _MODELS:
        model = copy.deepcopy(base_model)
        model.backend = "triton" if path.startswith("kernels") else "torch"
        _MODELS[path] = model
    return _MODELS[path]


def run(benchmark, fn, rounds, warmup):
    if HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

        def timed():
            result = fn()
            torch.cuda.synchronize()
            return result

        benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup)
    else:
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)


def record(benchmark, images, flops, rates, device):
    info = benchmark.extra_info
    info["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (tiny model; kernels interpreted: proves it runs, not speed)"
    info[f"machine_matmul_bf16_{rates['size']}_tflop_per_s"] = rates["bf16"] / 1e12
    info[f"machine_matmul_fp32_{rates['size']}_tflop_per_s"] = rates["fp32"] / 1e12
    if device.type == "cuda":
        info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    stats = getattr(benchmark, "stats", None)
    seconds = None if stats is None else stats.stats.median
    if not seconds:
        return
    info["images_per_s"] = images / seconds
    info["tflop_per_s"] = flops / seconds / 1e12
    info["fraction_of_matmul_bf16"] = flops / seconds / rates["bf16"]
    info["fraction_of_matmul_fp32"] = flops / seconds / rates["fp32"]


# --------------------------------------------------------------------------- sampling
def _sample_cases():
    for size in SAMPLE_SIZES:
        for path in SAMPLE_PATHS:
            interpreted = not HAS_CUDA and path.startswith("kernels")
            if interpreted and size != SAMPLE_SIZES[0]:
                continue  # the interpreter is slow; one size proves it runs
            yield pytest.param(size, path, id=f"{path}-{size}")


@pytest.mark.parametrize("size, path", list(_sample_cases()))
def test_sample(benchmark, size, path, base_model, matmul_rates, device):
    benchmark.group = f"sample_batch_{size}"
    model = model_for(base_model, path).eval()
    interpreted = not HAS_CUDA and path.startswith("kernels")
    rounds, warmup = (1, 0) if interpreted else (ROUNDS, WARMUP)
    options = dict(bf16=path.endswith("bf16"), compile="compiled" in path, cuda_graphs="cuda_graphs" in path)
    batches = sample_images(model, size * (rounds + warmup), batch_size=size, seed=0, progress=False, **options)
    run(benchmark, lambda: next(batches), rounds, warmup)
    benchmark.extra_info.update(batch_size=size, **options)
    record(benchmark, size, size * model_flops_per_image(model.config), matmul_rates, device)


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("path", TRAIN_PATHS)
def test_train_step(benchmark, path, base_model, matmul_rates, device, tmp_path):
    benchmark.group = "train_step"
    model = copy.deepcopy(base_model)
    model.backend = "triton" if path.startswith("kernels") else "torch"
    config = TrainConfig(
        model={k: v for k, v in model.config.items() if k not in ("image_size", "channels")},
        batch_size=TRAIN_BATCH, device=str(device), bf16=path.endswith("bf16"),
        compile="compiled" in path, cuda_graphs="cuda_graphs" in path,
    )
    C, L = model.channels, model.image_size
    generator = torch.Generator().manual_seed(1)
    train_images = torch.randint(0, 256, (4 * TRAIN_BATCH, C, L, L), dtype=torch.uint8, generator=generator)
    trainer = Trainer(model, train_images, train_images[:1], config, tmp_path, log=lambda line: None)
    interpreted = not HAS_CUDA and path.startswith("kernels")
    rounds, warmup = (1, 0) if interpreted else (ROUNDS, WARMUP)
    run(benchmark, trainer.train_step, rounds, warmup)
    benchmark.extra_info.update(batch_size=TRAIN_BATCH, bf16=config.bf16, compile=config.compile, cuda_graphs=config.cuda_graphs)
    record(benchmark, TRAIN_BATCH, 3 * TRAIN_BATCH * model_flops_per_image(model.config), matmul_rates, device)
