"""The Triton kernel path against the pure-PyTorch reference.

Runs the kernels in Triton's CPU interpreter when there is no GPU (tests/conftest.py sets
TRITON_INTERPRET) and with the real compiler on CUDA (the ``device`` fixture). Every
comparison is by relative error; outputs of the host functions are written into NaN-filled
buffers so that an element a kernel forgets to write fails the test.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rgkern
from rgkern.core import functions as triton_ops
from rgkern.core import ops, reference
from rgkern.core.geometry import get_geometry
from rgkern.core.precision import accumulator_dtype
from rgkern.kernels.affine_coupling import affine_coupling_backward, affine_coupling_forward
from rgkern.kernels.gather_patches import gather_patches_backward, gather_patches_forward
from rgkern.kernels.scatter_patches import scatter_patches_backward, scatter_patches_forward

from utils import random_scales

HAS_CUDA = torch.cuda.is_available()

# Relative tolerances of results that go through exp/tanh (data movement must be exact).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
GEOMETRIES = [(L, C, k) for L in (8, 16, 32) for C in (1, 3) for k in (2, 4)]
DTYPES = [torch.float32, torch.float64]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest error relative to the largest reference value (0 for two zero tensors)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert not torch.isnan(actual).any(), "NaN in the kernel result: an element was not written"
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    return error / scale if scale > 0 else error


def assert_close(actual, expected, tol, what=""):
    error = relative_error(actual, expected)
    assert error <= tol, f"{what}: relative error {error:.3g} > {tol:.1g}"


def poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def geometry_id(params):
    L, C, k = params
    return f"L{L}-C{C}-k{k}"


# --------------------------------------------------------------------------- gather / scatter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
def test_gather_patches_matches_reference(geometry, dtype, device):
    L, C, k = geometry
    geo = get_geometry(L, k, C)
    x = torch.randn(2, C, L, L, dtype=dtype, device=device)
    for sublayer in range(len(geo.sublayers)):
        row_index = geo.row_index(sublayer, device)
        expected = reference.gather_patches(x, row_index)
        out = poisoned(expected.shape, dtype, device)
        assert gather_patches_forward(x, row_index, out=out) is out
        assert torch.equal(out, expected), f"sublayer {sublayer}"
        assert torch.equal(triton_ops.gather_patches(x, row_index), expected)
    # a subset of the patches, as the incremental encoder passes
    subset = geo.row_index(len(geo.sublayers) - 2, device)[torch.arange(0, geo.sublayers[-2].num_patches, 2, device=device)]
    assert torch.equal(triton_ops.gather_patches(x, subset), reference.gather_patches(x, subset))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
def test_scatter_patches_matches_reference(geometry, dtype, device):
    L, C, k = geometry
    geo = get_geometry(L, k, C)
    x = torch.randn(2, C, L, L, dtype=dtype, device=device)
    x_before = x.clone()
    for sublayer in range(len(geo.sublayers)):
        row_index = geo.row_index(sublayer, device)
        rows = torch.randn(2 * row_index.shape[0], row_index.shape[1], dtype=dtype, device=device)
        expected = reference.scatter_patches(x, rows, row_index)
        out = poisoned(x.shape, dtype, device)
        assert scatter_patches_forward(x, rows, row_index, out=out) is out
        assert torch.equal(out, expected), f"sublayer {sublayer}"
        assert torch.equal(triton_ops.scatter_patches(x, rows, row_index), expected)
        assert torch.equal(x, x_before), "x must not be modified"
    patches = torch.randperm(geo.sublayers[0].num_patches, device=device)[: max(1, geo.sublayers[0].num_patches // 3)]
    subset = geo.row_index(0, device)[patches]
    rows = torch.randn(2 * subset.shape[0], subset.shape[1], dtype=dtype, device=device)
    assert torch.equal(triton_ops.scatter_patches(x, rows, subset), reference.scatter_patches(x, rows, subset))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=geometry_id)
def test_gather_scatter_gradients(geometry, dtype, device):
    """Backward kernels are data movement too: equal to the reference gradients exactly."""
    L, C, k = geometry
    geo = get_geometry(L, k, C)
    for sublayer in (0, len(geo.sublayers) - 1):  # level 0 covers every pixel, the top level few
        row_index = geo.row_index(sublayer, device)
        n_rows = 2 * row_index.shape[0]
        grad_rows = torch.randn(n_rows, row_index.shape[1], dtype=dtype, device=device)
        grad_image = torch.randn(2, C, L, L, dtype=dtype, device=device)

        x = torch.randn(2, C, L, L, dtype=dtype, device=device, requires_grad=True)
        (expected,) = torch.autograd.grad(reference.gather_patches(x, row_index), x, grad_rows)
        out = poisoned(x.shape, dtype, device)
        assert torch.equal(gather_patches_backward(grad_rows, row_index, x.shape, out=out), expected)
        (actual,) = torch.autograd.grad(triton_ops.gather_patches(x, row_index), x, grad_rows)
        assert torch.equal(actual, expected)

        rows = torch.randn(n_rows, row_index.shape[1], dtype=dtype, device=device, requires_grad=True)
        expected = torch.autograd.grad(reference.scatter_patches(x, rows, row_index), (x, rows), grad_image)
        buffers = (poisoned(x.shape, dtype, device), poisoned(rows.shape, dtype, device))
        host = scatter_patches_backward(grad_image, row_index, out=buffers)
        actual = torch.autograd.grad(triton_ops.scatter_patches(x, rows, row_index), (x, rows), grad_image)
        for got in (host, actual):
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_empty_patch_subset(device):
    """No dirty patches: zero rows out, the image unchanged, no launch with an empty grid."""
    geo = get_geometry(8, 2, 1)
    x = torch.randn(2, 1, 8, 8, device=device)
    empty = geo.row_index(0, device)[:0]
    rows = triton_ops.gather_patches(x, empty)
    assert rows.shape == (0, 4)
    assert torch.equal(triton_ops.scatter_patches(x, rows, empty), x)
    y, logdet = triton_ops.affine_coupling(rows, rows, rows, torch.ones(4, device=device), torch.ones(4, device=device), geo.coupling_mask(device), False)
    assert y.shape == (0, 4) and logdet.shape == (0,)


# --------------------------------------------------------------------------- affine coupling
def coupling_inputs(n_rows, dim, dtype, device, generator=None, requires_grad=False):
    """Random rows whose s arguments span 1e-6 .. 1e2 in magnitude (both tanh branches, saturation)."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).to(device)

    magnitude = torch.logspace(-6, 2, n_rows * dim, dtype=torch.float64)[torch.randperm(n_rows * dim, generator=generator)]
    s_raw = (randn(n_rows, dim).sign() * magnitude.view(n_rows, dim).to(dtype).to(device))
    tensors = [randn(n_rows, dim), s_raw, randn(n_rows, dim), 1 + randn(dim).abs(), randn(dim)]
    if requires_grad:
        tensors = [t.requires_grad_() for t in tensors]
    return tensors


COUPLING_SHAPES = [(37, 4), (37, 12), (37, 16), (37, 48), (1000, 48), (3000, 4)]


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", COUPLING_SHAPES, ids=lambda s: f"N{s[0]}-D{s[1]}")
def test_affine_coupling_matches_reference(shape, dtype, inverse, device):
    n_rows, dim = shape
    g = torch.Generator().manual_seed(n_rows * dim)
    x, s_raw, t_raw, s_scale, t_scale = coupling_inputs(n_rows, dim, dtype, device, g)
    k = 2 if dim in (4, 12) else 4
    mask = get_geometry(4 * k, k, dim // (k * k)).coupling_mask(device, dtype, flipped=inverse)
    y_ref, logdet_ref = reference.affine_coupling(x, s_raw, t_raw, s_scale, t_scale, mask, inverse)
    y = poisoned((n_rows, dim), dtype, device)
    logdet = poisoned((n_rows,), accumulator_dtype(dtype), device)
    affine_coupling_forward(x, s_raw, t_raw, s_scale, t_scale, mask, inverse, out=(y, logdet))
    assert logdet.dtype == logdet_ref.dtype
    assert_close(y, y_ref, TOLERANCE[dtype], "y")
    assert_close(logdet, logdet_ref, TOLERANCE[dtype], "logdet")
    # the public function, and the round trip through the inverse
    y2, logdet2 = triton_ops.affine_coupling(x, s_raw, t_raw, s_scale, t_scale, mask, inverse)
    assert torch.equal(y2, y) and torch.equal(logdet2, logdet)
    back, logdet_back = triton_ops.affine_coupling(y, s_raw, t_raw, s_scale, t_scale, mask, not inverse)
    assert_close(back, x, 10 * TOLERANCE[dtype], "round trip")
    assert_close(logdet_back, -logdet, TOLERANCE[dtype], "round-trip logdet")


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 4), (37, 48), (1000, 48), (3000, 4)], ids=lambda s: f"N{s[0]}-D{s[1]}")
def test_affine_coupling_gradients(shape, dtype, inverse, device):
    n_rows, dim = shape
    g = torch.Generator().manual_seed(7 + n_rows * dim)
    inputs = coupling_inputs(n_rows, dim, dtype, device, g, requires_grad=True)
    mask = get_geometry(8, 2 if dim == 4 else 4, 1 if dim in (4, 16) else 3).coupling_mask(device, dtype)
    grad_y = torch.randn(n_rows, dim, generator=g, dtype=torch.float64).to(dtype).to(device)
    grad_logdet = torch.randn(n_rows, generator=g, dtype=torch.float64).to(accumulator_dtype(dtype)).to(device)
    expected = torch.autograd.grad(reference.affine_coupling(*inputs, mask, inverse), inputs, (grad_y, grad_logdet))
    actual = torch.autograd.grad(triton_ops.affine_coupling(*inputs, mask, inverse), inputs, (grad_y, grad_logdet))
    buffers = tuple(poisoned((n_rows, dim), dtype, device) for _ in range(3))
    host = affine_coupling_backward(grad_y, grad_logdet, *[t.detach() for t in inputs], mask, inverse, out=buffers)
    for name, got, want, direct in zip(("x", "s_raw", "t_raw", "s_scale", "t_scale"), actual, expected, host):
        assert got.dtype == dtype
        assert_close(got, want, TOLERANCE[dtype], f"grad {name}")
        assert torch.equal(got, direct)


def test_affine_coupling_scale_gradients_are_deterministic(device):
    """The (D,) scale gradients are reduced without atomics: bit-identical run to run."""
    inputs = coupling_inputs(3000, 48, torch.float32, device, torch.Generator().manual_seed(3), requires_grad=True)
    mask = get_geometry(8, 4, 3).coupling_mask(device)
    grads = [
        torch.autograd.grad(triton_ops.affine_coupling(*inputs, mask, False)[1].sum(), inputs[3:])
        for _ in range(2)
    ]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_tanh_relative_precision(device):
    """With mask 0, x = 0, t = 0 and D = 1 the log-det is tanh(s_scale * s_raw) itself."""
    a = torch.logspace(-9, 1.5, 400, dtype=torch.float64, device=device)
    a = torch.cat([a, -a, torch.tensor([0.0, 0.04, 0.25, 30.0, 1e4], dtype=torch.float64, device=device)])
    for dtype, tol in ((torch.float64, 1e-14), (torch.float32, 1e-6)):
        s_raw = a.to(dtype)[:, None]
        zeros = torch.zeros_like(s_raw)
        one = torch.ones(1, dtype=dtype, device=device)
        _, logdet = affine_coupling_forward(zeros, s_raw, zeros, one, one, torch.zeros(1, dtype=dtype, device=device))
        expected = torch.tanh(s_raw.double()[:, 0])
        relative = ((logdet.double() - expected).abs() / expected.abs().clamp_min(1e-300)).max().item()
        assert relative <= tol, (dtype, relative)


def test_tanh_derivative_relative_precision(device):
    """The gradient through tanh keeps its relative precision where tanh saturates.

    With mask 0, x = 0, t = 0, D = 1 and s_scale 1, the log-det's gradient wrt s_raw is
    ``1 - tanh(a)**2`` itself. Computed as ``1 - t*t`` from a float32 tanh it is off by 26 eps
    relative at |a| = 2, 370 eps at 3.3 and 100% beyond 8.3 (tanh rounds to 1).
    """
    a = torch.cat([torch.linspace(-30, 30, 601, dtype=torch.float64), torch.tensor([0.0, 0.04, 0.25, -0.25])]).to(device)
    for dtype, tol in ((torch.float64, 1e-14), (torch.float32, 1e-6)):
        s_raw = a.to(dtype)[:, None]
        zeros = torch.zeros_like(s_raw)
        one = torch.ones(1, dtype=dtype, device=device)
        grad_logdet = torch.ones(len(a), dtype=accumulator_dtype(dtype), device=device)
        _, grad_s_raw, _, _, _ = affine_coupling_backward(zeros, grad_logdet, zeros, s_raw, zeros, one, one, one * 0)
        expected = 1 / torch.cosh(s_raw.double()[:, 0]) ** 2
        relative = ((grad_s_raw.double()[:, 0] - expected).abs() / expected).max().item()
        assert relative <= tol, (dtype, relative)


def test_affine_coupling_bfloat16(device):
    """bfloat16 data: math in float32 inside the kernel, float32 log-det."""
    x, s_raw, t_raw, s_scale, t_scale = coupling_inputs(64, 48, torch.bfloat16, device, torch.Generator().manual_seed(1))
    mask = get_geometry(8, 4, 3).coupling_mask(device, torch.bfloat16)
    y, logdet = triton_ops.affine_coupling(x, s_raw, t_raw, s_scale, t_scale, mask, False)
    y_ref, logdet_ref = reference.affine_coupling(*(t.float() for t in (x, s_raw, t_raw, s_scale, t_scale, mask)), False)
    assert y.dtype == torch.bfloat16 and logdet.dtype == torch.float32
    assert_close(y, y_ref, 1e-2, "y")
    assert_close(logdet, logdet_ref, 1e-5, "logdet")


def test_affine_coupling_promotes_narrow_network_outputs(device):
    """bf16 s/t network outputs (autocast) with float32 rows: promoted like the reference."""
    x, s_raw, t_raw, s_scale, t_scale = coupling_inputs(32, 48, torch.float32, device, torch.Generator().manual_seed(2))
    mask = get_geometry(8, 4, 3).coupling_mask(device, torch.float32)
    s_half, t_half = s_raw.bfloat16(), t_raw.bfloat16()
    y, logdet = triton_ops.affine_coupling(x, s_half, t_half, s_scale, t_scale, mask, False)
    y_ref, logdet_ref = reference.affine_coupling(x, s_half, t_half, s_scale, t_scale, mask, False)
    assert y.dtype == torch.float32 and y_ref.dtype == torch.float32
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(logdet, logdet_ref, 1e-5, "logdet")


# --------------------------------------------------------------------------- gradcheck
def test_gradcheck_gather_and_scatter(device):
    geo = get_geometry(8, 2, 1)
    row_index = geo.row_index(2, device)  # disentangler of level 1: covers a quarter of the pixels
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, device=device, requires_grad=True)
    rows = torch.randn(row_index.shape[0], 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: triton_ops.GatherPatchesFunction.apply(x, row_index), (x,))
    assert torch.autograd.gradcheck(lambda x, r: triton_ops.ScatterPatchesFunction.apply(x, r, row_index), (x, rows))


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_gradcheck_affine_coupling(inverse, device):
    g = torch.Generator().manual_seed(5)
    inputs = [t.detach().clone() for t in coupling_inputs(6, 4, torch.float64, device, g)]
    inputs[1] = inputs[1].clamp(-3, 3)  # keep tanh away from saturation so finite differences see it
    inputs = [t.requires_grad_() for t in inputs]
    mask = get_geometry(8, 2, 1).coupling_mask(device, torch.float64)
    assert torch.autograd.gradcheck(lambda *a: triton_ops.AffineCouplingFunction.apply(*a, mask, inverse), inputs)


def test_backward_is_once_differentiable(device):
    inputs = coupling_inputs(6, 4, torch.float64, device, requires_grad=True)
    mask = get_geometry(8, 2, 1).coupling_mask(device, torch.float64)
    y, logdet = triton_ops.affine_coupling(*inputs, mask, False)
    (grad_x,) = torch.autograd.grad(y.square().sum() + logdet.sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError):
        grad_x.sum().backward()


# --------------------------------------------------------------------------- whole model
MODEL_CASES = [
    # (L, C, k, dtype, n_mlp, variant)
    (8, 1, 2, torch.float64, 1, "paper"),
    (16, 3, 4, torch.float64, 0, "paper"),
    (16, 3, 4, torch.float32, 1, "paper"),
    (32, 1, 4, torch.float32, 0, "paper"),
    (16, 1, 2, torch.float32, 0, "paper"),
    (16, 3, 4, torch.float64, 1, "authors"),
    (16, 1, 2, torch.float32, 0, "authors"),
]


def model_pair(L, C, k, dtype, n_mlp, device, seed=0, variant="paper"):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = dict(image_size=L, channels=C, kernel_size=k, n_layers=1, hidden=8, n_res=1, n_mlp=n_mlp, variant=variant)
    reference_model = rgkern.RGFlow(**config, backend="torch")
    random_scales(reference_model, g)
    kernel_model = rgkern.RGFlow(**config, backend="triton")
    kernel_model.load_state_dict(reference_model.state_dict())
    return reference_model.to(device, dtype), kernel_model.to(device, dtype), g


@pytest.mark.parametrize("L,C,k,dtype,n_mlp,variant", MODEL_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_model_triton_matches_torch(L, C, k, dtype, n_mlp, variant, device):
    reference_model, kernel_model, g = model_pair(L, C, k, dtype, n_mlp, device, variant=variant)
    tol = TOLERANCE[dtype]
    x = torch.randn(2, C, L, L, generator=g, dtype=torch.float64).to(dtype).to(device)

    z_ref, logdet_ref = reference_model.encode(x)
    z, logdet = kernel_model.encode(x)
    assert logdet.dtype == logdet_ref.dtype
    assert_close(z, z_ref, tol, "z")
    assert_close(logdet, logdet_ref, tol, "logdet")
    assert relative_error(z_ref, x) > 1e-3, "the couplings should not be the identity"
    assert_close(kernel_model.decode(z_ref), reference_model.decode(z_ref), tol, "decode")

    loss_ref = reference_model.log_prob(x).sum()
    loss = kernel_model.log_prob(x).sum()
    assert_close(loss, loss_ref, tol, "log_prob")
    loss_ref.backward()
    loss.backward()
    for (name, p_ref), (_, p) in zip(reference_model.named_parameters(), kernel_model.named_parameters()):
        assert_close(p.grad, p_ref.grad, tol, f"grad of {name}")


def test_transform_rows_on_a_patch_subset(device):
    """Sublayer.transform_rows (used by the incremental encoder) on a few dirty patches."""
    reference_model, kernel_model, g = model_pair(16, 3, 4, torch.float64, 0, device)
    x = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64).to(device)
    sublayer = 1
    row_index = reference_model.geometry.row_index(sublayer, device)[torch.tensor([0, 3], device=device)]
    rows = ops.gather_patches(x, row_index, "triton")
    for inverse in (False, True):
        out_ref, logdet_ref = reference_model.sublayers[sublayer].transform_rows(rows, inverse, "torch")
        out, logdet = kernel_model.sublayers[sublayer].transform_rows(rows, inverse, "triton")
        assert_close(out, out_ref, 1e-10, "rows")
        assert_close(logdet, logdet_ref, 1e-10, "logdet")


# --------------------------------------------------------------------------- torch.library
def test_operators_registered():
    expected = "custom_op" if triton_ops._INTERPRETED else "triton_op"
    assert triton_ops.REGISTRATION == {name: expected for name in triton_ops._OPERATORS}, triton_ops.REGISTRATION


def test_opcheck(device):
    geo = get_geometry(8, 2, 1)
    row_index = geo.row_index(0, device)
    x = torch.randn(2, 1, 8, 8, device=device)
    rows = torch.randn(2 * row_index.shape[0], 4, device=device)
    scale = torch.randn(4, device=device)
    mask = geo.coupling_mask(device)
    cases = {
        "gather_patches": (x, row_index),
        "gather_patches_backward": (rows, row_index, list(x.shape)),
        "scatter_patches": (x, rows, row_index),
        "scatter_patches_backward": (x, row_index),
        "affine_coupling": (rows, rows.sin(), rows.cos(), scale, scale.exp(), mask, True),
        "affine_coupling_backward": (rows, rows[:, 0], rows, rows.sin(), rows.cos(), scale, scale, mask, False),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.rgkern, name).default, args)


def test_torch_compile_traces_the_kernel_path(device):
    """fullgraph=True: the autograd Functions and the registered operators trace without breaks."""
    geo = get_geometry(8, 2, 1)
    row_index = geo.row_index(0, device)
    mask = geo.coupling_mask(device)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 1, 8, 8, generator=g).to(device).requires_grad_()
    s_raw, t_raw = (torch.randn(32, 4, generator=g).to(device).requires_grad_() for _ in range(2))
    s_scale, t_scale = (torch.randn(4, generator=g).to(device).requires_grad_() for _ in range(2))

    def step(op_module, x, s_raw, t_raw, s_scale, t_scale):
        rows = op_module.gather_patches(x, row_index)
        y, logdet = op_module.affine_coupling(rows, s_raw, t_raw, s_scale, t_scale, mask, False)
        return op_module.scatter_patches(x, y, row_index).square().sum() + logdet.sum()

    torch._dynamo.reset()
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(lambda *a: step(triton_ops, *a), backend=backend, fullgraph=True)
    inputs = (x, s_raw, t_raw, s_scale, t_scale)
    got = torch.autograd.grad(compiled(*inputs), inputs)
    want = torch.autograd.grad(step(reference, *inputs), inputs)
    for a, b in zip(got, want):
        assert_close(a, b, 1e-5, "compiled gradient")


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU test_torch_compile_traces_the_kernel_path covers triton_op with inductor")
def test_triton_op_decomposes_into_kernels_without_interpreter():
    """Without TRITON_INTERPRET the operators are triton_ops whose kernels AOTAutograd sees.

    Traced with fake CUDA tensors in a fresh process (no GPU needed to trace).
    """
    script = textwrap.dedent(
        """
        import logging, torch
        logging.disable(logging.WARNING)  # no GPU: torch warns it cannot analyse kernel mutations
        from torch._functorch.aot_autograd import aot_function
        from torch._subclasses.fake_tensor import FakeTensorMode
        from rgkern.core import functions as triton_ops
        assert set(triton_ops.REGISTRATION.values()) == {"triton_op"}, triton_ops.REGISTRATION
        graphs = []
        def keep(gm, _):
            graphs.append(gm.code)
            return gm
        def f(x, index, s_raw, t_raw, s_scale, t_scale, mask):
            rows = torch.ops.rgkern.gather_patches(x, index)
            y, logdet = torch.ops.rgkern.affine_coupling(rows, s_raw, t_raw, s_scale, t_scale, mask, False)
            return torch.ops.rgkern.scatter_patches(x, y, index), logdet
        with FakeTensorMode():
            args = [torch.empty(2, 3, 8, 8, device="cuda"), torch.zeros(4, 48, dtype=torch.long, device="cuda")]
            args += [torch.empty(8, 48, device="cuda") for _ in range(2)] + [torch.empty(48, device="cuda") for _ in range(3)]
            try:
                aot_function(f, fw_compiler=keep)(*args)
            except RuntimeError:
                pass  # running the traced graph needs CUDA; the trace is what we check
        code = graphs[0]
        assert code.count("triton_kernel_wrapper_functional(") == 3, code
        print("ok")
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


# --------------------------------------------------------------------------- bad input
def test_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setattr(triton_ops, "_INTERPRETED", False)
    geo = get_geometry(8, 2, 1)
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(RuntimeError, match="CUDA.*TRITON_INTERPRET"):
        triton_ops.gather_patches(x, geo.row_index(0))
    with pytest.raises(RuntimeError, match="cpu"):
        triton_ops.affine_coupling(torch.ones(2, 4), torch.ones(2, 4), torch.ones(2, 4), torch.ones(4), torch.ones(4), geo.coupling_mask())


def test_mismatched_dtypes_and_devices(device):
    geo = get_geometry(8, 2, 1)
    args = [torch.randn(8, 4, device=device) for _ in range(3)] + [torch.randn(4, device=device) for _ in range(2)]
    mask = geo.coupling_mask(device)
    bad = list(args)
    bad[3] = bad[3].double()
    with pytest.raises(TypeError, match=r"s_scale has dtype torch.float64 but x has dtype torch.float32"):
        triton_ops.affine_coupling(*bad, mask)
    with pytest.raises(TypeError, match="mask has dtype torch.float64"):
        triton_ops.affine_coupling(*args, mask.double())
    bad = list(args)
    bad[4] = bad[4].to("meta")
    with pytest.raises(ValueError, match=r"t_scale is on meta but x is on"):
        triton_ops.affine_coupling(*bad, mask)
    x = torch.randn(2, 1, 8, 8, device=device)
    row_index = geo.row_index(0, device)
    rows = triton_ops.gather_patches(x, row_index)
    with pytest.raises(TypeError, match="rows has dtype torch.float64 but x has dtype torch.float32"):
        triton_ops.scatter_patches(x, rows.double(), row_index)
    with pytest.raises(ValueError, match="row_index is on meta"):
        triton_ops.gather_patches(x, row_index.to("meta"))
    with pytest.raises(TypeError, match="row_index has dtype torch.float32"):
        triton_ops.gather_patches(x, row_index.float())
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        triton_ops.gather_patches(x.long(), row_index)


def test_bad_shapes(device):
    geo = get_geometry(8, 2, 1)
    x = torch.randn(2, 1, 8, 8, device=device)
    row_index = geo.row_index(0, device)
    with pytest.raises(ValueError, match=r"x must be 4-D"):
        triton_ops.gather_patches(x[0], row_index)
    with pytest.raises(ValueError, match=r"row_index must be 2-D"):
        triton_ops.gather_patches(x, row_index.flatten())
    with pytest.raises(ValueError, match=r"rows has shape \(31, 4\), expected \(B\*P, D\) = \(32, 4\)"):
        triton_ops.scatter_patches(x, torch.randn(31, 4, device=device), row_index)
    rows = torch.randn(8, 4, device=device)
    scale = torch.randn(4, device=device)
    with pytest.raises(ValueError, match=r"t_raw has shape \(8, 3\)"):
        triton_ops.affine_coupling(rows, rows, rows[:, :3], scale, scale, geo.coupling_mask(device))
    with pytest.raises(ValueError, match=r"s_scale has shape \(3,\), expected \(D,\) = \(4,\)"):
        triton_ops.affine_coupling(rows, rows, rows, scale[:3], scale, geo.coupling_mask(device))
    with pytest.raises(ValueError, match="mask requires grad"):
        triton_ops.affine_coupling(rows, rows, rows, scale, scale, geo.coupling_mask(device).clone().requires_grad_())


def test_non_contiguous_inputs_give_correct_results(device):
    geo = get_geometry(8, 2, 1)
    row_index = geo.row_index(1, device)
    x = torch.randn(2, 1, 8, 8, device=device).transpose(2, 3)
    assert not x.is_contiguous()
    assert torch.equal(triton_ops.gather_patches(x, row_index), reference.gather_patches(x, row_index))
    wide_index = torch.cat([row_index, row_index], dim=1)[:, :4]  # a non-contiguous view of the table
    assert not wide_index.is_contiguous()
    assert torch.equal(triton_ops.gather_patches(x, wide_index), reference.gather_patches(x, row_index))
    rows = torch.randn(4, 2 * row_index.shape[0], device=device).t()
    assert torch.equal(triton_ops.scatter_patches(x, rows, row_index), reference.scatter_patches(x, rows, row_index))
    inputs = [torch.randn(4, 10, device=device).t() for _ in range(3)]
    scale = torch.randn(8, device=device)[::2]
    mask = geo.coupling_mask(device)
    assert_close(
        triton_ops.affine_coupling(*inputs, scale, scale, mask, False)[0],
        reference.affine_coupling(*inputs, scale, scale, mask, False)[0],
        1e-5,
        "strided",
    )


def test_out_of_range_index_reads_nan_not_memory(device):
    """Indices are not range-checked on the host (that needs a sync); the kernel masks them."""
    x = torch.randn(1, 1, 8, 8, device=device)
    row_index = torch.tensor([[0, 1, 64, -1]], device=device)
    rows = triton_ops.gather_patches(x, row_index)
    assert torch.equal(rows[0, :2], x.flatten()[:2]) and torch.isnan(rows[0, 2:]).all()
