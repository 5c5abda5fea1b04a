"""Benchmark set-up: collect ``bench_*.py``, run the kernels in Triton's interpreter without a GPU,
and measure the machine's limits (copy bandwidth, matmul rate) once per session on a GPU.

TRITON_INTERPRET must be set before triton is first imported, so this runs at collection.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collect_file(file_path, parent):
    """``pytest bench/`` collects ``bench_*.py`` (explicitly named files are collected anyway)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def make_base_model(device):
    """``make_base_model(config)``: an ``RGFlow(**config, backend="torch")`` on ``device``, seeded,
    with non-identity couplings (the learned scales start at zero; here they are drawn from N(0, 0.1))."""
    import rgkern

    def make(config: dict):
        torch.manual_seed(0)
        model = rgkern.RGFlow(**config, backend="torch").to(device)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("_scale"):
                    param.normal_(0, 0.1)
        return model

    return make


def _cuda_seconds(fn, repeats: int) -> float:
    """Median seconds of ``fn`` on the GPU, timed with CUDA events after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


@pytest.fixture(scope="session")
def machine_limits(device) -> dict:
    """Measured copy bandwidth (bytes/s) and dense matmul rates (FLOP/s) of this GPU.

    Empty on the CPU: interpreter timings prove the benchmarks run, nothing about speed.
    """
    if device.type != "cuda":
        return {}
    limits = {"gpu": torch.cuda.get_device_name()}
    source = torch.empty(256 * 2**20, dtype=torch.float32, device=device)  # 1 GiB
    target = torch.empty_like(source)
    seconds = _cuda_seconds(lambda: target.copy_(source), 10)
    limits["copy_bytes_per_s"] = 2 * source.numel() * source.element_size() / seconds
    source = target = None  # 2 GiB freed before the matmuls
    n = 8192
    for dtype, key in ((torch.float32, "matmul_fp32_flop_per_s"), (torch.bfloat16, "matmul_bf16_flop_per_s")):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        seconds = _cuda_seconds(lambda: torch.matmul(a, b), 10)
        limits[key] = 2 * n**3 / seconds
    limits["tf32_matmul_allowed"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return limits
