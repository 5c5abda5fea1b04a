"""The work counter of rgkern.tools.profile: what it counts and what it leaves out."""
import torch

from rgkern.core.geometry import get_geometry
from rgkern.kernels import patches as functions
from rgkern.tools.profile import GPUS, Work, count_work, format_table, profile_passes, roofline_seconds


def test_kernels_views_gemm_flops_and_syncs_are_counted_exactly():
    a = torch.randn(4, 5)
    b = torch.randn(5, 3)

    def f():
        c = a @ b  # one GEMM, 2*4*5*3 FLOPs
        d = c.view(12).t() if False else c.view(12)  # a view: no kernel
        e = (d * 2).sum()  # two kernels
        return e.item()  # a host sync

    work, value = count_work(f)
    assert isinstance(value, float)
    assert work.gemms == 1 and work.flops == 2 * 4 * 5 * 3
    assert work.syncs == 1
    assert work.kernels == 4  # mm, mul, sum, _local_scalar_dense
    assert work.by_op["mm"] == 1 and "view" not in work.by_op
    assert work.bytes > 0


def test_triton_launches_are_counted_once_each_and_not_their_internals(device):
    geometry = get_geometry(8, 4, 1)
    x = torch.randn(2, 1, 8, 8, device=device)
    row_index = geometry.row_index(0, device)
    work, rows = count_work(functions.gather_patches, x, row_index)
    assert work.triton == 1
    assert rows.shape == (2 * 4, 16)
    assert work.kernels == 1  # the launch only: nothing the interpreter does inside is counted


def test_roofline_takes_the_largest_of_launch_flops_and_bytes():
    gpu = GPUS["h200"]
    work = Work(kernels=2, gemms=1, flops=int(1e12), bytes=10)
    work.per_kernel = [(int(1e12), 0), (0, 10)]
    t = roofline_seconds(work, gpu)
    assert t["estimate"] == 1e12 / gpu.bf16_flops + gpu.launch_seconds
    assert t["launches"] == 2 * gpu.launch_seconds


def test_profile_table_of_a_small_model():
    config = dict(image_size=8, channels=1, kernel_size=4, n_layers=1, hidden=4, n_res=1, n_mlp=0)
    rows = profile_passes(config, batch=16, passes=("encode", "train"))
    assert [row["pass"] for row in rows] == ["encode", "train"]
    encode, train = (row["work"] for row in rows)
    assert 0 < encode.kernels < train.kernels
    assert encode.syncs == train.syncs == 0
    text = format_table(rows, GPUS["h100"], 16)
    assert "| torch | encode |" in text and "H100" in text
