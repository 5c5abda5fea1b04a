"""Incremental update vs full pass, and one inpainting step cone vs all latents.

Run: ``pytest bench/bench_incremental.py --benchmark-only`` (groups put the two paths of
each size side by side; ``extra_info`` holds the patch evaluations per image).

* ``encode L=...``: re-encode after a fixed 10x10 central region changed, at L = 32 .. 512:
  ``full`` is ``model.encode``; ``incremental`` is ``IncrementalEncoder.update`` with
  ``check_region=False``; ``incremental+check`` adds the O(L**2) outside-region check.
  Patch evaluations: 60, 85, 110, 135, 160 against 170, 682, 2730, 10922, 43690.
* ``inpaint step L=...``: one Adam step (decode, fill, encode, log-likelihood, gradient,
  update) over the cone's latents with cone-restricted passes against all latents with
  full passes.

On the CPU the model is tiny (hidden 16, n_res 1, n_mlp 1, one RNVP block per sublayer,
C = 3, batch 1, float32) and torch runs one thread (the development machines are shared;
two threads make these small ops far slower there). With CUDA the paper-size model runs.
At small L both paths are bound by the fixed per-sublayer overhead of the couplings (the
same number of sublayer calls either way), so the ratio only opens up as L grows.
"""
import pytest
import torch

import rgkern
from rgkern.locality.incremental import IncrementalEncoder
from rgkern.locality.inpaint import InpaintProblem

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SIZES = (32, 64, 128, 256, 512)
INPAINT_SIZES = (32, 128)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def make_model(L):
    torch.manual_seed(0)
    if CUDA:
        model = rgkern.RGFlow(L, 3, 4)  # the paper's size
    else:
        model = rgkern.RGFlow(L, 3, 4, n_layers=1, hidden=16, n_res=1, n_mlp=1, backend="torch")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("s_scale") or name.endswith("t_scale"):
                param.normal_(0, 0.1)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.to(DEVICE)


def central_region(L, size=10):
    region = torch.zeros(L, L, dtype=torch.bool)
    start = (L - size) // 2
    region[start : start + size, start : start + size] = True
    return region


_SETUPS: dict = {}


def setup(L):
    """Model, two images differing in the central region, and an encoder cached on one."""
    if L not in _SETUPS:
        model = make_model(L)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 3, L, L, generator=g).to(DEVICE)
        region = central_region(L)
        x_other = x.clone()
        x_other[:, :, region.to(DEVICE)] = torch.randn(1, 3, 100, generator=g).to(DEVICE)
        _SETUPS[L] = (model, x, x_other, region, IncrementalEncoder(model, x))
    return _SETUPS[L]


def rounds_for(L):
    return {32: 30, 64: 20, 128: 15, 256: 10, 512: 6}[L]


@pytest.mark.parametrize("L", SIZES)
@pytest.mark.parametrize("method", ["full", "incremental", "incremental+check"])
def test_encode_after_local_change(benchmark, L, method):
    model, x, x_other, region, encoder = setup(L)
    benchmark.group = f"encode L={L}"
    geometry = model.geometry
    total = sum(s.num_patches for s in geometry.sublayers)
    dirty = sum(len(p) for p in geometry.inference_patches(region))
    benchmark.extra_info.update(L=L, method=method, total_patches=total, dirty_patches=dirty, device=str(DEVICE))
    state = {"flip": False}

    def next_image():
        state["flip"] = not state["flip"]
        return x_other if state["flip"] else x

    if method == "full":
        benchmark.extra_info["patch_evals"] = total

        def run():
            with torch.no_grad():
                out = model.encode(next_image())
            sync()
            return out
    else:
        check = method == "incremental+check"

        def run():
            out = encoder.update(next_image(), region, check_region=check)
            sync()
            return out

    benchmark.pedantic(run, rounds=rounds_for(L), iterations=1, warmup_rounds=1)
    if method != "full":
        assert encoder.last_patch_evals == dirty and not encoder.last_update_was_full
        benchmark.extra_info["patch_evals"] = encoder.last_patch_evals


@pytest.mark.parametrize("L", INPAINT_SIZES)
@pytest.mark.parametrize("method", ["all latents (full passes)", "cone (incremental)"])
def test_inpaint_step(benchmark, L, method):
    model = make_model(L)
    g = torch.Generator().manual_seed(2)
    restarts = 4
    x = torch.randn(1, 3, L, L, generator=g).to(DEVICE)
    unknown = central_region(L)
    incremental = method.startswith("cone")
    problem = InpaintProblem(model, x, unknown, incremental=incremental)
    draws = model.sample_latents(restarts, generator=torch.Generator(device=DEVICE).manual_seed(3), device=DEVICE)
    free = problem.free_from_latents(draws).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([free], lr=0.05)
    benchmark.group = f"inpaint step L={L}"
    benchmark.extra_info.update(
        L=L, method=method, restarts=restarts, free_latents=problem.num_free,
        patch_evals_per_restart=problem.patch_evals_per_step, device=str(DEVICE),
    )

    def step():
        loss = -problem.log_prob(free)
        (grad,) = torch.autograd.grad(loss.sum(), [free])
        free.grad = grad
        optimiser.step()
        sync()

    benchmark.pedantic(step, rounds=15 if L <= 32 else 8, iterations=1, warmup_rounds=1)
