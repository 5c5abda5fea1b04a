"""The kernels the model launches compile for sm_80 and sm_90, checked without a GPU.

Launches are recorded from tiny models run with a GPU's block sizes, then compiled by
Triton's NVIDIA pipeline down to cubin (:mod:`rgkern.kernels.aot`). This is a fast subset:
a few specialisations per kernel and dtype; ``scripts/compile_kernels.py`` compiles them all.
"""
import importlib

import pytest
import torch
import triton
import triton.language as tl

from rgkern.kernels import aot, patches
from rgkern.kernels import launch as launch_helpers
from rgkern.kernels.coupling import GPU_TILES, TUNING_CONFIGS, WEIGHT_GRAD_MAX_ROWS
from rgkern.kernels.launch import GPU_TILE_ELEMENTS, gpu_block_sizes, launch_kernel, record_launches

from utils import random_images, tiny_model

pytestmark = [pytest.mark.interpreter, pytest.mark.slow]  # pyproject.toml registers the markers: -m "not slow" and the like select by them

INTERPRETED = launch_helpers.interpreter_requested()
KERNEL_MODULES = [
    "rgkern.kernels.patches",
    "rgkern.kernels.coupling",
]
FUSED = ("coupling_half_step", "coupling_weight_grad")  # the fused half-step's kernels
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def all_kernels() -> set:
    """Names of the launchable kernels (``*_kernel``) in the kernel modules."""
    names = set()
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        names |= {name for name in dir(module) if name.endswith("_kernel") and hasattr(getattr(module, name), "fn")}
    return names


def record_model(dtype, device) -> list:
    """Launches of a training forward + backward and a decode of a tiny model (L=8, C=3, k=4, D=48),
    and of its row path (``transform_rows``, as the incremental encoder runs it, between a
    stand-alone gather and scatter)."""
    model = tiny_model(8, 3, 4, dtype=dtype, backend="triton", n_mlp=2, hidden=24).to(device)
    x = random_images(model, batch=3).to(device)
    row_index = model.geometry.row_index(1, device)
    with record_launches() as launches, gpu_block_sizes():
        model.log_prob(x).sum().backward()
        with torch.no_grad():
            model.decode(x)
        image = x.clone().requires_grad_(True)
        patch_rows, logdet = model.sublayers[1].transform_rows(patches.gather_patches(image, row_index), False, "triton")
        (patches.scatter_patches(image, patch_rows, row_index).sum() + logdet.sum()).backward()
    return launches


@pytest.fixture(scope="module")
def recorded() -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {dtype: record_model(dtype, device) for dtype in DTYPES}


def constants(launch) -> dict:
    return dict(launch.kwargs)


def tile_setting(launch) -> tuple:
    """A fused launch's (rows per program, warps, stages)."""
    return tuple(constants(launch)[name] for name in ("BLOCK_ROWS", "num_warps", "num_stages"))


def tile_settings(dtype, kernel_name) -> list:
    """The (rows, warps, stages) of each tuning configuration of a fused kernel, the default first
    (the weight-gradient kernel's rows are its loop's step, capped)."""
    cap = WEIGHT_GRAD_MAX_ROWS if kernel_name == "coupling_weight_grad_kernel" else None
    return [(min(t.block_rows, cap or t.block_rows), t.num_warps, t.num_stages) for t in TUNING_CONFIGS[dtype]]


def test_recording_sees_every_kernel_with_gpu_block_sizes(recorded):
    """Every kernel, at a GPU's block sizes; the fused ones in every tuning configuration (the
    launches run the default, the others are recorded without running)."""
    for dtype, launches in recorded.items():
        assert {launch.name for launch in launches} == all_kernels(), dtype
        assert GPU_TILES[dtype] == TUNING_CONFIGS[dtype][0]
        for name in {launch.name for launch in launches if launch.name.startswith(FUSED)}:
            settings = {tile_setting(launch) for launch in launches if launch.name == name}
            assert settings == set(tile_settings(dtype, name)), (dtype, name)
        for launch in launches:
            if launch.name.startswith(FUSED):
                continue
            tile = constants(launch)["BLOCK_ROWS"] * constants(launch)["BLOCK_DIM"]
            assert tile == GPU_TILE_ELEMENTS // 2, (dtype, launch.name)
        tensors = [a for launch in launches for a in launch.args if isinstance(a, launch_helpers.TensorArgument)]
        assert {t.dtype for t in tensors} >= {dtype, torch.int64}


def test_launches_are_recorded_once_and_still_run(device):
    image = torch.randn(3, 1, 8, 8, dtype=torch.float64, device=device)
    row_index = torch.arange(64, device=device).view(16, 4)
    with record_launches() as launches:
        for _ in range(2):
            rows = patches.gather_patches_forward(image, row_index)
    assert len(launches) == 1 and launches[0].name == "gather_patches_kernel"
    torch.testing.assert_close(rows, image.reshape(3, 16, 4).reshape(48, 4), rtol=0, atol=0)


@pytest.mark.skipif(not INTERPRETED, reason="block sizes differ only under the interpreter")
def test_gpu_block_sizes_apply_only_inside_the_context():
    width = 64
    interpreted = launch_helpers.rows_per_block(width)
    with gpu_block_sizes():
        with gpu_block_sizes():
            assert launch_helpers.rows_per_block(width) == GPU_TILE_ELEMENTS // width
        assert launch_helpers.rows_per_block(width, GPU_TILE_ELEMENTS // 2) == GPU_TILE_ELEMENTS // 2 // width
    assert launch_helpers.rows_per_block(width) == interpreted == launch_helpers.INTERPRETER_TILE_ELEMENTS // width


MODES = ("GATHER", "SCATTER", "ACCUMULATE", "COPY")


def subset(recorded) -> tuple[list, list]:
    """``(both, sm_90 only)``: the first launch of each kernel and direction, for sm_80 and sm_90
    (all kernels in float32, the couplings in the others); and for sm_90, the H100/H200 the
    tuning set is for, the fused kernels in each other tuning configuration and (float32, the
    default configuration) in each of their image modes: the patch gather, scatter and copy,
    the log-det and gradient accumulation. ``scripts/compile_kernels.py`` compiles them all."""
    both, extra = {}, {}
    for dtype, launches in recorded.items():
        for launch in launches:
            if dtype != torch.float32 and not launch.name.startswith(FUSED):
                continue
            fused = launch.name.startswith(FUSED)
            if not fused or tile_setting(launch) == tile_settings(dtype, launch.name)[0]:
                both.setdefault((dtype, launch.name, constants(launch).get("INVERSE")), launch)
            if fused and tile_setting(launch) != tile_settings(dtype, launch.name)[0]:
                extra.setdefault((dtype, launch.name, tile_setting(launch)), launch)
            elif fused and dtype == torch.float32:
                extra.setdefault((dtype, launch.name, *(constants(launch).get(flag) for flag in MODES)), launch)
    both_launches = list(both.values())
    return both_launches, [launch for launch in extra.values() if launch not in both_launches]


def test_subset_compiles_for_sm80_and_sm90_without_spills(recorded):
    launches, sm90_only = subset(recorded)
    results = aot.compile_launches(launches, aot.ARCHITECTURES) + aot.compile_launches(sm90_only, (90,))
    assert len(results) >= len(launches) * len(aot.ARCHITECTURES) + len(sm90_only)
    assert [r.error for r in results if not r.ok] == []
    assert {(r.kernel, r.arch) for r in results} == {(k, a) for k in all_kernels() for a in aot.ARCHITECTURES}
    for r in results:
        assert 0 < r.registers <= 255 and r.seconds > 0, r
        # float64 included: its coupling tile is sized so that it does not spill either. The
        # fused half-step's float64 kernels (broadcast-and-sum matmuls, for the tests only) may.
        known = r.kernel.startswith(FUSED[0]) and "fp64" in r.pointer_dtypes
        if not known:
            assert not r.spills, f"{r.kernel} sm_{r.arch} {r.arguments} {r.constexprs}: {r.spill_stores} B spilled"
    float64 = [r for r in results if "fp64" in r.pointer_dtypes]
    assert float64 and max(r.registers for r in float64) < 255


def test_autocast_launches_read_float32_weights_and_compile_without_spills(device):
    """Under bfloat16 autocast (training with ``--bf16``) the fused kernels compute in bfloat16
    from the float32 weights, which they cast as they load them: launches of their own, with
    float32 weight pointers beside bfloat16 activations. Each compiles for sm_80 and sm_90
    without spilling, in every tuning configuration such launches may use (not the 32-row
    bfloat16 one, which spilled with them: ``TileConfig.wide_weights``)."""
    model = tiny_model(8, 3, 4, dtype=torch.float32, backend="triton", n_mlp=2, hidden=24).to(device)
    x = random_images(model, batch=3).to(device)
    with record_launches() as launches, gpu_block_sizes(), torch.autocast(device.type, dtype=torch.bfloat16):
        model.log_prob(x).sum().backward()
    fused = [launch for launch in launches if launch.name.startswith(FUSED)]
    mixed = [launch for launch in fused
             if {torch.float32, torch.bfloat16} <= {a.dtype for a in launch.args if isinstance(a, launch_helpers.TensorArgument)}]
    assert {launch.name for launch in mixed} == {launch.name for launch in fused} and len(fused) >= 3
    one_each = list({(launch.name, tile_setting(launch)): launch for launch in mixed}.values())
    wide = [t for t in TUNING_CONFIGS[torch.bfloat16] if t.wide_weights]
    assert {tile_setting(launch)[1:] for launch in one_each} == {(t.num_warps, t.num_stages) for t in wide}
    results = aot.compile_launches(one_each, aot.ARCHITECTURES)
    assert [r.error for r in results if not r.ok] == []
    assert len(results) == len(one_each) * len(aot.ARCHITECTURES)
    for r in results:
        assert not r.spills, f"{r.kernel} sm_{r.arch} {r.arguments} {r.constexprs}: {r.spill_stores} B spilled"


def test_saved_launches_compile_the_same_in_two_processes(recorded, tmp_path):
    """A recording kept in a file (compile it once per Triton) and the work shared by two
    compiler processes give the results of one process, in the same order."""
    launches = list({launch.name: launch for launch in recorded[torch.float32] if not launch.name.startswith(FUSED)}.values())
    assert len(launches) >= 3  # the patch gather, scatter and scatter backward
    aot.save_launches(launches, tmp_path / "launches.json")
    loaded = aot.load_launches(tmp_path / "launches.json")
    assert [(l.name, l.args, l.kwargs) for l in loaded] == [(l.name, l.args, l.kwargs) for l in launches]

    def figures(results):
        return [(r.kernel, r.arch, r.arguments, r.constexprs, r.registers, r.ok) for r in results]

    alone, shared = aot.compile_launches(launches, (80,)), aot.compile_launches(loaded, (80,), jobs=2)
    assert len(alone) == len(launches) and figures(shared) == figures(alone)
    assert {r.triton for r in alone + shared} == {triton.__version__}  # the children's Triton is this one
    with pytest.raises(ValueError, match="jobs must be a positive int, got 0"):
        aot.compile_launches(launches, (80,), jobs=0)

def test_fused_kernels_compile_with_one_row_per_image():
    """Batch 1 at a top-level sublayer of one patch: the row count and the patches per image
    are both 1, which Triton specialises to constants, so their quotient is a Python int and
    not a tensor (``.to()`` on it failed to compile; the interpreter ran it). The first
    half-step copies the image there (COPY), the last half-step's backward copies its gradient."""
    model = tiny_model(8, 3, 4, dtype=torch.float32, backend="triton", n_mlp=2, hidden=24)
    x = random_images(model, batch=1)
    with record_launches() as launches, gpu_block_sizes():
        model.log_prob(x).sum().backward()
    copying = {}
    for launch in launches:
        if (launch.name.startswith(FUSED[0]) and constants(launch).get("COPY")
                and tile_setting(launch) == tile_settings(torch.float32, launch.name)[0]):
            ints = [a for a in launch.args if isinstance(a, int) and not isinstance(a, bool)]
            copying.setdefault((launch.name, ints.count(1) >= 2), launch)
    assert {name for name, _ in copying} == {"coupling_half_step_fwd_kernel", "coupling_half_step_bwd_kernel"}
    assert any(ones for _, ones in copying), "no launch with one row of one patch was recorded"
    results = aot.compile_launches(list(copying.values()), aot.ARCHITECTURES)
    assert [r.error for r in results if not r.ok] == []

@triton.jit
def dtype_changing_loop_kernel(out_ptr, STEPS: tl.constexpr):
    total = 0  # an int32 ...
    for _ in range(STEPS):  # a loop for the compiler too (tl.static_range would unroll it)
        total += 0.5  # ... that becomes a float32 in the loop: the interpreter does not mind
    tl.store(out_ptr, total)


@pytest.mark.skipif(not INTERPRETED, reason="needs the interpreter to show what it accepts")
def test_compiling_catches_what_the_interpreter_runs():
    out = torch.zeros(1)
    with record_launches() as launches:
        launch_kernel(dtype_changing_loop_kernel, (1,), out, STEPS=5)
    assert out.item() == 2.5  # the interpreter ran it
    results = aot.compile_launches(launches, aot.ARCHITECTURES)
    assert len(results) == len(aot.ARCHITECTURES)
    for result in results:
        assert not result.ok and "Loop-carried variable total" in result.error, result.error


def test_parse_ptxas_log():
    log = """ptxas info    : Compiling entry function 'affine_coupling_bwd_kernel' for 'sm_80'
ptxas info    : Function properties for affine_coupling_bwd_kernel
    264 bytes stack frame, 260 bytes spill stores, 268 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 264 bytes cumulative stack size, 480 bytes cmem[0]
"""
    assert aot.parse_ptxas_log(log) == {"registers": 255, "stack": 264, "spill_stores": 260, "spill_loads": 268}
    assert aot.parse_ptxas_log("ptxas-blackwell info    : Used 40 registers, used 0 barriers")["spill_stores"] == 0
    assert aot.parse_ptxas_log("no log") == {}
